#!/usr/bin/env bash
# The CUDA path, checked in one go on a machine with an NVIDIA GPU (no CPU run can show it):
#   1. the CUDA tests (kernels in fp32/bf16 against float64, the sampler, a tiny pipeline with
#      bf16 autocast and --compile, --resume on CUDA, fp32 sampler logits under autocast);
#   2. the kernel and sampler benchmark in bf16 on the GPU (with Cut Cross-Entropy's rows if
#      it is installed);
#   3. one seed of the mirror grid on the GPU, then the quick-start command's wall time there.
# Usage: bash gpu_check.sh [logs folder, default out/gpu] [runs folder, default <logs>/runs].
# Each step has a time limit, so one slow step cannot starve the others.
set -uo pipefail
cd "$(dirname "$0")"
logs=${1:-out/gpu}
runs=${2:-$logs/runs}
mkdir -p "$logs" "$runs"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$logs/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$logs/gpu.txt"
timeout 200 python -m pytest -q tests/test_cuda.py tests/test_model.py tests/test_runtime.py 2>&1 | tee "$logs/tests.log"
timeout 160 python bench.py --device cuda --dtype bfloat16 2>&1 | tee "$logs/bench.log"
timeout 140 python eval.py --grid --seeds 1 --jobs 4 --out-dir "$runs/grid" --train-args "--device cuda" 2>&1 \
    | tee "$logs/grid.log"
start=$SECONDS
timeout 80 python train.py --mode onpolicy --device cuda --out-dir "$runs/quickstart" 2>&1 | tail -n 9 \
    | tee "$logs/quickstart.log"
echo "wall $((SECONDS - start)) s" | tee -a "$logs/quickstart.log"
