#!/usr/bin/env bash
# The GPU check, one command: smoke steps, bench.tune, the CUDA tests, the benchmarks, the report, on a machine with torch,
# Triton, pytest and pytest-benchmark already installed and no network. Installs nothing; runs from
# the source tree (PYTHONPATH). Every phase has a time limit; a failing phase is reported and the
# next ones still run. Writes everything to ${OUT:-bench/results}/<date>-<device>-<commit>/.
#
#   bash bench/gpu_check.sh
#
# Environment: GPU_CHECK_BUDGET_S (what the benchmarks get is what is left of it, default 540), GPU_CHECK_TUNE_S (bench.tune, default 75;
# 0 skips it), GPU_CHECK_TUNE_VARIANTS (bench.tune's --variants; its default: the variants without a tuning variable), GPU_CHECK_TUNE_SHAPES (its --shapes), GPU_CHECK_BREAKDOWN_S (bench.breakdown, default 60; 0 skips it), GPU_CHECK_TESTS_S (tests, default 160; 0 skips them), GPU_CHECK_TESTS_SELECT (a pytest -k expression for the
# CUDA tests, default all),
# GPU_CHECK_BENCH_SELECT (a pytest -k expression for the benchmarks, default all; the issue's target
# groups run first, so a run the budget cuts short still has them), GPU_CHECK_MAX_TIME (pytest-benchmark
# seconds per benchmark, default 0.25), BENCH_COMMIT (the commit measured, where the tree has no .git).

set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
TUNE_S=${GPU_CHECK_TUNE_S:-75}
TUNE_VARIANTS=${GPU_CHECK_TUNE_VARIANTS:-}
TUNE_SHAPES=${GPU_CHECK_TUNE_SHAPES:-}
BREAKDOWN_S=${GPU_CHECK_BREAKDOWN_S:-60}
TESTS_S=${GPU_CHECK_TESTS_S:-160}
TESTS_SELECT=${GPU_CHECK_TESTS_SELECT:-}
SELECT=${GPU_CHECK_BENCH_SELECT:-}
MAX_TIME=${GPU_CHECK_MAX_TIME:-0.25}
REPORT_RESERVE_S=30
START=$(date +%s)

elapsed() { echo $(( $(date +%s) - START )); }

commit=${BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export BENCH_COMMIT=$commit
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
device_slug=$(echo "${device:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
RUN_DIR="${OUT:-$ROOT/bench/results}/$(date -u +%Y-%m-%d)-${device_slug}-${commit:0:7}"
mkdir -p "$RUN_DIR"
SUMMARY="$RUN_DIR/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

note "gpu_check: ${device:-no GPU found} | commit $commit | results in $RUN_DIR"
{
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import importlib.metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
for name in ("triton", "pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "matplotlib", "numpy"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "not installed")
print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$RUN_DIR/environment.txt" 2>&1
grep -E "^(python|triton|pytest|matplotlib|cuda)" "$RUN_DIR/environment.txt" | sed 's/^/  /' | tee -a "$SUMMARY"

# 0. Smoke: one small training step per time-loop mode, each under a time limit. A grid barrier that
# never completes hangs its process; the tests and benchmarks that follow then run without that mode
# (the tests that name it are left out).
failed=""
: > "$RUN_DIR/tests.log"
for mode in steps persistent resident auto "auto tf32"; do
    # into tests.log, which the tests phase appends to: at most 8 files come back from $OUT
    # ("auto tf32": auto's TF32 plans at the H512 layer, a resident forward whose programs walk two row tiles)
    # shellcheck disable=SC2086
    timeout -k 5 120 "$PYTHON" -m bench.smoke ${mode/ / cuda } >> "$RUN_DIR/tests.log" 2>&1
    rc=$?
    line=$(grep "^smoke $mode" "$RUN_DIR/tests.log" | tail -n 1)
    case $rc in
        0) ;;
        124 | 137) line="smoke $mode: TIMED OUT after 120s (a grid barrier that never completes?)" ;;
        *) line=${line:-"smoke $mode: FAILED (exit code $rc, see tests.log)"} ;;
    esac
    note "$line"
    # (auto's step, at another size, only reports: its loops are among the three modes')
    (( rc == 0 )) || [[ $mode == auto* ]] || failed="$failed $mode"
done
if [[ $failed == *persistent* ]]; then
    export FUSED_RNN_RECURRENCE=steps
elif [[ $failed == *resident* ]]; then
    export FUSED_RNN_RECURRENCE=persistent
fi
[ -n "${FUSED_RNN_RECURRENCE:-}" ] && note "tests and benchmarks run with FUSED_RNN_RECURRENCE=$FUSED_RNN_RECURRENCE"

# 0b. Tuning data: one layer's forward and backward loops in each mode that passed its smoke step, by
# warps, beside cuDNN and a barrier-only launch (bench/tune.py). Its table goes into the summary.
if (( TUNE_S > 0 )); then
    modes=steps
    for mode in persistent resident; do
        [[ $failed == *$mode* ]] || modes="$modes,$mode"
    done
    note "tune (one layer, fp16, every recurrence regularizer; limit ${TUNE_S}s):"
    timeout -k 5 "$TUNE_S" "$PYTHON" -m bench.tune --modes "$modes" ${TUNE_VARIANTS:+--variants "$TUNE_VARIANTS"} \
        ${TUNE_SHAPES:+--shapes "$TUNE_SHAPES"} \
        2>> "$RUN_DIR/tests.log" | tee -a "$SUMMARY"
    rc=${PIPESTATUS[0]}
    (( rc == 0 )) || note "tune: stopped (exit code $rc; 124: the ${TUNE_S}s limit, what it measured is above)"
fi

# 0c. Where a training step's time goes: each kernel's GPU time beside the wall time, fused_rnn and
# cuDNN at the benchmark shapes, and fused_rnn's host calls (bench/breakdown.py). Wall well above the
# kernels' sum: the GPU waited for the host.
if (( BREAKDOWN_S > 0 )); then
    note "breakdown (fp16, forward + backward; limit ${BREAKDOWN_S}s):"
    timeout -k 5 "$BREAKDOWN_S" "$PYTHON" -m bench.breakdown --providers fused_rnn,nn_lstm --host 2>> "$RUN_DIR/tests.log" \
        | grep -v "^USDT" | tee -a "$SUMMARY"
    rc=${PIPESTATUS[0]}
    (( rc == 0 )) || note "breakdown: stopped (exit code $rc)"
fi

# 1. CUDA tests. Exit code 5: no test carries the cuda marker yet, which is not a failure. Four
# processes share the GPU where pytest-xdist is installed: most of the time goes to compiling kernels.
workers=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 4")
# the cases that name a mode whose smoke step failed would hang or fail the same way: left out
tests_k=${TESTS_SELECT:+($TESTS_SELECT)}
for mode in $failed; do
    tests_k="${tests_k:+$tests_k and }not $mode"
done
if (( TESTS_S > 0 )); then
    [ -n "$tests_k" ] && note "tests: -k \"$tests_k\""
    tests_start=$(date +%s)
    timeout -k 10 "$TESTS_S" "$PYTHON" -m pytest tests -m cuda $workers -q -p no:cacheprovider ${tests_k:+-k "$tests_k"} \
        --continue-on-collection-errors --tb=short >> "$RUN_DIR/tests.log" 2>&1
    rc=$?
    case $rc in
        0) status="passed" ;;
        5) status="no test marked cuda was collected" ;;
        124 | 137) status="TIMED OUT after ${TESTS_S}s" ;;
        *) status="FAILED (pytest exit code $rc)" ;;
    esac
    note "tests (-m cuda): $status in $(( $(date +%s) - tests_start ))s; $(grep -E ' in [0-9.]+s' "$RUN_DIR/tests.log" | tail -n 1)"
    grep -E "^(FAILED|ERROR)" "$RUN_DIR/tests.log" | head -n 20 | sed 's/^/  /' | tee -a "$SUMMARY"
else
    note "tests: SKIPPED (GPU_CHECK_TESTS_S=0)"
fi

# 2. Benchmarks: results are appended to the .jsonl as each one finishes, so a time limit keeps what ran.
bench_s=$(( BUDGET - $(elapsed) - REPORT_RESERVE_S ))
if (( bench_s < 30 )); then
    note "benchmarks: SKIPPED, ${bench_s}s left of the ${BUDGET}s budget"
else
    rm -f "$RUN_DIR/benchmarks.jsonl"
    bench_start=$(date +%s)
    timeout -k 10 "$bench_s" "$PYTHON" -m pytest bench -q -p no:cacheprovider --tb=short ${SELECT:+-k "$SELECT"} \
        --bench-jsonl="$RUN_DIR/benchmarks.jsonl" --benchmark-max-time="$MAX_TIME" --benchmark-min-rounds=3 \
        > "$RUN_DIR/bench.log" 2>&1
    rc=$?
    measured=$(wc -l < "$RUN_DIR/benchmarks.jsonl" 2>/dev/null || echo 0)
    case $rc in
        0) status="done" ;;
        124 | 137) status="STOPPED by the ${bench_s}s limit (the results measured so far are kept)" ;;
        *) status="some FAILED (pytest exit code $rc, see bench.log)" ;;
    esac
    note "benchmarks: $status; $measured measured in $(( $(date +%s) - bench_start ))s; $(grep -E ' in [0-9.]+s' "$RUN_DIR/bench.log" | tail -n 1)"
    grep -E "^(FAILED|ERROR)" "$RUN_DIR/bench.log" | head -n 20 | sed 's/^/  /' | tee -a "$SUMMARY"
    # each distinct error once, with how many benchmarks it stopped
    grep -E "^E +[A-Za-z_.]*(Error|Exception)" "$RUN_DIR/bench.log" | sort | uniq -c | sort -rn | head -n 5 | cut -c 1-300 \
        | sed 's/^/  /' | tee -a "$SUMMARY"
fi

# 3. Report: markdown tables and targets (and a plot where matplotlib is installed).
# benchmarks.json (written by the report) holds every entry of benchmarks.jsonl; at most 8 files come back from $OUT.
if [ -s "$RUN_DIR/benchmarks.jsonl" ]; then
    report=$(timeout -k 5 60 "$PYTHON" -m bench.report "$RUN_DIR/benchmarks.jsonl" --out "$RUN_DIR" 2>&1)
    rc=$?
    note "report: $( [ $rc -eq 0 ] && echo "written" || echo "FAILED" ): $(echo "$report" | tr '\n' ' ')"
    if [ $rc -eq 0 ]; then
        rm -f "$RUN_DIR/benchmarks.jsonl"
    fi
    if [ -f "$RUN_DIR/results.md" ]; then
        sed -n '/^## Targets/,/^## Results/p' "$RUN_DIR/results.md" | sed '$d' | tee -a "$SUMMARY"
    fi
else
    note "report: no benchmark results to report"
fi
note "gpu_check: finished in $(elapsed)s"
