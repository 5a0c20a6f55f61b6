#!/usr/bin/env bash
# Install what the tests need (CPU build of torch first, from the local wheel where one exists)
# into .venv, then run the linter, the import contracts and the test suite. pytest's exit code 5 (no test collected)
# is a failure here like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" \
  || .venv/bin/python -m pip install --quiet "torch>=2.1" --index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/ruff check src tests benchmarks examples scripts
.venv/bin/lint-imports  # the layers of docs/architecture.md (contracts in pyproject.toml)
.venv/bin/python -m pytest "$@"
