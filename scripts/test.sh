#!/usr/bin/env bash
# Install what the tests need (CPU build of torch first, from the local wheel where one exists)
# into .venv, start the one-node SLURM cluster where this machine allows it (root or
# password-less sudo, Debian's packages; NORMLAB_TEST_SLURM=0 skips it), then run the linter,
# the import contracts and the test suite. The SLURM tests are skipped, with their reason, when
# no cluster could be started. pytest's exit code 5 (no test collected) is a failure here like
# any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" \
  || .venv/bin/python -m pip install --quiet "torch>=2.1" --index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install --quiet -e ".[test]"
if [ "${NORMLAB_TEST_SLURM:-1}" != "0" ]; then
  if [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; then
    bash scripts/slurm-cluster.sh \
      || echo "test.sh: the SLURM cluster did not start; the SLURM tests will be skipped" >&2
  else
    echo "test.sh: no root or password-less sudo to start SLURM; the SLURM tests will be skipped" >&2
  fi
fi
.venv/bin/ruff check src tests benchmarks examples scripts
.venv/bin/lint-imports  # the layers of docs/architecture.md (contracts in pyproject.toml)
.venv/bin/python -m pytest "$@"
