#!/usr/bin/env bash
# normlab on a GPU in at most 8 minutes: `bash scripts/gpu-check.sh OUTDIR`
#
# For anyone lent a CUDA GPU (H100/H200) for a few minutes, with torch (CUDA build), pandas,
# scipy, matplotlib and scikit-learn installed; installs nothing and needs no network. Runs in
# the repository it belongs to, with PYTHONPATH=src (no pip install); $PYTHON picks the python.
# Parts, each with its own timeout (a failure or timeout in one does not stop the others; the
# exit status is 1 if any failed):
#   nvidia-smi, versions   the GPU, and the python / torch / CUDA / cuDNN versions
#   tests       NORMLAB_TEST_DEVICE=cuda python -m pytest -m device -q (skipped, and said so,
#               when pytest is not importable)
#   throughput  benchmarks/train_throughput.py --quick (plain loop, normlab eager, CUDA graph;
#               ResNet-20 and ResNet-110 at batch 128)
#   packed, packed110, packed_small   benchmarks/packed.py for ResNet-20 (K = 1 2 4 8 16),
#               ResNet-110, and ResNet-20 at R1's batch sizes 2-64 (K = 1 8); the rows are
#               recorded in src/normlab/execute/packing_throughput.json (a copy goes to OUTDIR)
#   estimate    normlab run paper --scale reduced --dry-run --device cuda (the device-hours)
#   paper       normlab run paper --scale smoke --device cuda, with the time that is left of the
#               8 minutes less 110 s (the store keeps finished runs: rerunning resumes it)
#   per_example, hessian, thr_nhwc   the probe benchmarks (per_example at B = 128, hessian
#               with --quick), and ResNet-20's throughput with --channels-last
# Everything goes to OUTDIR: one log per part, the benchmarks' rows as JSON, summary.txt
# (status and wall time per part) and targets.txt (scripts/gpu-targets.py: issues 9 and 10's
# GPU targets, each met, missed or not measured). The smoke study's target needs 180-300 s of
# its own: with a 10-minute lease, GPU_CHECK_BUDGET_S=560 gives it about that.
set -u
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu-check.sh OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
# 8 minutes less margins for kills (--kill-after), start-up and the summary; a shorter lease:
# GPU_CHECK_BUDGET_S=300 bash scripts/gpu-check.sh OUTDIR (the paper study gets what is left
# after the parts before it and AFTER_PAPER_S for those after it).
BUDGET_S=${GPU_CHECK_BUDGET_S:-440}
START=$(date +%s)
SUMMARY=()

# part NAME TIMEOUT_S COMMAND...: run COMMAND with a timeout, log to OUT/NAME.log, record status.
# The timeout never reaches past the budget, so the whole script keeps to it whatever each
# part takes; a part with under 5 s left is skipped.
part() {
    local name=$1 limit=$2
    shift 2
    local begin end rc status left
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [ "$left" -lt 5 ]; then
        skip "$name" "the ${BUDGET_S}s budget is spent"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*" | tee "$OUT/$name.log"
    begin=$(date +%s.%N)
    # Straight to the file, not through a pipe: a killed command's children cannot hang the script.
    timeout --kill-after=5 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    tail -n 25 "$OUT/$name.log" | sed "s/^/  [$name] /"
    case $rc in
        0) status=passed ;;
        124|137) status="TIMEOUT (${limit}s)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    SUMMARY+=("$(printf '%-12s %-22s %8.1f' "$name" "$status" "$(awk "BEGIN {print $end - $begin}")")")
}

skip() {  # skip NAME REASON
    echo "== $1: SKIPPED: $2" | tee "$OUT/$1.log"
    SUMMARY+=("$(printf '%-12s %-22s %8s' "$1" "SKIPPED" "-")  ($2)")
}

part nvidia-smi 20 nvidia-smi
part versions 30 "$PY" -c "
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'cudnn', torch.backends.cudnn.version(), 'available', torch.cuda.is_available())
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"

if "$PY" -c "import pytest" 2>/dev/null; then
    # pytest-xdist, where installed, spreads the tests over processes sharing the GPU
    workers=()
    if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n 8); fi
    part tests 120 env NORMLAB_TEST_DEVICE=cuda "$PY" -m pytest -m device -q "${workers[@]}" \
        --continue-on-collection-errors -p no:cacheprovider
else
    skip tests "pytest is not importable here; nothing is installed from the network"
fi

part throughput 80 "$PY" benchmarks/train_throughput.py --quick --device cuda \
    --json "$OUT/throughput.json"
# packed rows are recorded in src/normlab/execute/packing_throughput.json (copied to OUTDIR)
part packed 70 "$PY" benchmarks/packed.py --device cuda --packs 1 2 4 8 16 --steps 10 \
    --repeats 2 --record --json "$OUT/packed.json"
part packed110 50 "$PY" benchmarks/packed.py --device cuda --depth 110 --packs 1 4 8 16 \
    --steps 5 --warmup 5 --repeats 1 --record --json "$OUT/packed110.json"
# the small batch sizes of the batch-size study (R1), which dominate the plan's device-hours
part packed_small 75 "$PY" benchmarks/packed.py --device cuda --batch 2 4 8 16 32 64 \
    --packs 1 8 --steps 20 --repeats 1 --record --json "$OUT/packed_small.json"
cp src/normlab/execute/packing_throughput.json "$OUT/"
# the reduced plan's device-hours from the rows just recorded (a dry run: nothing is trained)
part estimate 30 "$PY" -m normlab.cli run paper --scale reduced --dry-run --device cuda \
    --out "$OUT/reduced"

AFTER_PAPER_S=110  # per_example, hessian and the channels-last throughput run after the study
left=$(( BUDGET_S - ($(date +%s) - START) - AFTER_PAPER_S ))
if [ "$left" -lt 30 ]; then
    skip paper "only ${left}s of the ${BUDGET_S}s budget left"
else
    part paper "$left" "$PY" -m normlab.cli run paper --scale smoke --device cuda \
        --out "$OUT/paper"
    done_runs=$(find "$OUT/paper" -name result.json 2>/dev/null | wc -l)
    echo "paper: $done_runs runs finished (result.json files under $OUT/paper)" \
        | tee -a "$OUT/paper.log"
fi

part per_example 45 "$PY" benchmarks/per_example.py --batch 128 --repeats 1 --chunks 128 \
    --device cuda --json "$OUT/per_example.json"
part hessian 30 "$PY" benchmarks/hessian.py --quick --device cuda --json "$OUT/hessian.json"
part thr_nhwc 30 "$PY" benchmarks/train_throughput.py --quick --device cuda --depth 20 \
    --channels-last

{
    echo "normlab gpu-check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    printf '%-12s %-22s %8s\n' part status wall_s
    printf '%s\n' "${SUMMARY[@]}"
    echo "total $(( $(date +%s) - START )) s; logs in $OUT"
} | tee "$OUT/summary.txt"
echo
"$PY" scripts/gpu-targets.py "$OUT"  # issues 9 and 10's targets: OUT/targets.txt
case "${SUMMARY[*]}" in
    *FAILED*|*TIMEOUT*) exit 1 ;;
esac
