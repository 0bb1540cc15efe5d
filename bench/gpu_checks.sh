#!/usr/bin/env bash
# The GPU checks in one run, for a session lent a GPU machine (see bench/RESULTS.md, "GPU"):
# the GPU-marked tests, then each benchmark on CUDA. Logs go to $OUT (the device tool's folder) or /tmp/vf-gpu.
#   bash bench/gpu_checks.sh          # ~8 minutes on one H200, most of it torch.compile
# Wheels the machine lacks (diffusers for bench_unet and the UNet parity tests) are installed from .whl/ if present.
set -u
out=${OUT:-/tmp/vf-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$out/env.log" 2>&1
step() {  # step NAME SECONDS COMMAND...: one log per step, cut at its time limit
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >> "$out/env.log"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? after ${SECONDS}s in all" >> "$out/env.log"
}
step tests 180 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rs
step attention 60 bash -c "python3 bench/bench_attention.py --device cuda && python3 bench/bench_attention.py --device cuda --dtype bf16"
step vision 90 python3 bench/bench_vision.py --device cuda --batch 64 --runs 10
step unet 80 python3 bench/bench_unet.py --device cuda --batch 64 --runs 10
step text 60 python3 bench/bench_text.py --device cuda --repeats 5
step compile 100 python3 bench/bench_vision.py --device cuda --batch 64 --runs 10 --compile --no-train
