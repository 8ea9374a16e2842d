#!/usr/bin/env bash
# The GPU check, one script, under 5 minutes on one GPU (run from anywhere in the checkout):
#   1. CPU and GPU give the same captions: a tiny fitted captioner through generate() (greedy,
#      beam 3) and through the TorchServe handler on cuda:0 (bench/gpu_check.py; exit 1 if not);
#   2. what the `base` preset costs there (bench/train_speed.py, random weights, no download):
#      encode ms/image, train ms/step (bf16 autocast), caption ms/image at beam 3, peak memory;
#   3. serving there (bench/serving.py: TorchServe with one GPU worker, batching off and on at
#      batch 16, 1/16/64 clients; the trained archive in model-store/ if there is one).
# Without CUDA it still runs, short and on the CPU (small batches, one repeat): a check that
# the script works, not numbers to quote.
#   bench/gpu.sh                 PYTHON=/path/to/python bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 OMP_WAIT_POLICY=PASSIVE

if "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    device=cuda
    short=()
    serving=(--device cuda --batch-size 16 --concurrency 1 16 64 --rounds 2)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    device=cpu
    short=(--batch-size 4 --encode-batch 2 --eval-batch 2 --repeats 1 --max-length 8)
    serving=(--batch-size 4 --concurrency 1 4 --rounds 1 --min-requests 4 --max-length 8)
    echo "no CUDA here: a short run on the CPU (checks the script; the numbers are not a GPU's)"
fi
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")'

"$PY" bench/gpu_check.py --device "$device"
"$PY" bench/train_speed.py --preset base --device "$device" --num-beams 3 "${short[@]}"
"$PY" bench/serving.py "${serving[@]}"
