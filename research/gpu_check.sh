#!/usr/bin/env bash
# The CUDA path, checked in one go on a machine with an NVIDIA GPU (no CPU run can show it):
#   1. the kernel and sampler benchmark in bf16 on the GPU, alone on the machine (with Cut
#      Cross-Entropy's rows if it is installed);
#   2. the quick-start command's wall time, alone;
#   3. side by side: the CUDA tests (kernels through kernels.py's dispatch and forced to PyTorch's,
#      the Triton ones too, in fp32/bf16 against float64, the dispatch and input checks,
#      the sampler, a tiny pipeline with bf16 autocast and --compile, --resume on CUDA) and one
#      seed of the mirror grid on the GPU (and $EXTRA, a script of your own, if set).
# Usage: bash research/gpu_check.sh [logs folder, default out/gpu] [runs folder, default <logs>/runs]
# Each step has a time limit, so one slow step cannot starve the others (at most 9.5 minutes in
# all); the exit status is 1 if any step failed or ran out of time, and the last line names them.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-out/gpu}
runs=${2:-$logs/runs}
py=${PYTHON:-python3}
mkdir -p "$logs" "$runs"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$logs/gpu.txt"
$py -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cpus', os.cpu_count())" \
    | tee -a "$logs/gpu.txt"
clock() { local label=$1 t=$SECONDS rc; shift; "$@"; rc=$?; echo "[$label: $((SECONDS - t)) s, exit $rc]"; return $rc; }
xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 6")  # pytest-xdist, where installed

failed=()
clock bench timeout 200 $py -m research.bench --device cuda --dtype bfloat16 > "$logs/bench.log" 2>&1 || failed+=(bench)
clock quickstart timeout 70 $py train.py --mode onpolicy --device cuda --out-dir "$runs/quickstart" > "$logs/quickstart.log" 2>&1 \
    || failed+=(quickstart)

pids=() names=(tests grid)
(clock tests timeout 240 $py -m pytest -q -p no:cacheprovider $xdist \
    tests/test_cuda.py tests/test_kernels_triton.py tests/test_kernels.py tests/test_model.py tests/test_runtime.py > "$logs/tests.log" 2>&1) & pids+=($!)
(clock grid timeout 300 $py -m research.experiments --grid --seeds 1 --jobs 4 --out-dir "$runs/grid" --train-args "--device cuda" \
    > "$logs/grid.log" 2>&1) & pids+=($!)
if [ -n "${EXTRA:-}" ]; then  # a script of your own (a path from the repository root), given <logs> <runs>
    (clock extra timeout 250 bash "$EXTRA" "$logs" "$runs" > "$logs/extra.log" 2>&1) & pids+=($!) names+=(extra)
fi
for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed+=("${names[$i]}"); done
cp "$runs/grid/report.md" "$logs/grid-report.md" 2>/dev/null
for f in bench quickstart tests grid; do echo "== $f"; tail -n 25 "$logs/$f.log"; done
if [ ${#failed[@]} -gt 0 ]; then echo "failed or stopped at their time limit: ${failed[*]}"; exit 1; fi
