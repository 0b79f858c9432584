#!/usr/bin/env bash
# Nsight Compute on the first launch of a layer's forward and of its backward time loop, at the benchmark
# layers: where a resident or persistent step's time goes (stall reasons, memory traffic, occupancy),
# beside bench.tune's timings. One bench.tune process per layer, loop and variant.
#
#   bash bench/profile.sh [SHAPES] [VARIANT]   # defaults: long_h768,ptb_awd,h512 and "resident w4"
#
# Writes ${OUT:-bench/results/profile}/profile.txt (ncu's details page per launch, each block headed by
# the layer and loop). ncu replays each profiled launch several times, restoring device memory between
# passes, so the grid barrier's counter starts from zero each time. PROFILE_S limits each process (default 90).

set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SHAPES=${1:-long_h768,ptb_awd,h512}
VARIANT=${2:-resident w4}
DIR=${OUT:-bench/results/profile}
REPORT="$DIR/profile.txt"
mkdir -p "$DIR"
: > "$REPORT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
[ -n "$NCU" ] || { echo "profile: ncu not found" | tee -a "$REPORT"; exit 1; }
status=0
for shape in ${SHAPES//,/ }; do
    for loop in forward backward; do
        echo "=== $shape, $VARIANT, first $loop loop launch" >> "$REPORT"
        timeout -k 5 "${PROFILE_S:-90}" "$NCU" --target-processes all --clock-control none \
            --kernel-name regex:"^${loop}_(resident|persistent|step)_kernel" --launch-count 1 \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
            --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \
            "${PYTHON:-python}" -m bench.tune --shapes "$shape" --variants "$VARIANT" --no-reference --reps 1 >> "$REPORT" 2>&1
        rc=$?
        echo "profile: $shape $loop: exit code $rc" | tee -a "$REPORT"
        (( rc == 0 )) || status=$rc
    done
done
exit $status
