#!/usr/bin/env bash
# The GPU checks in one run, for a session lent a GPU machine (figures go to bench/RESULTS.md with the card's name):
# the GPU-marked tests, then each benchmark's GPU mode (bf16 autocast, regional torch.compile, counted-FLOP MFU
# against an H100's 989 TFLOP/s; pass PEAK_TFLOPS for another card). Logs go to $OUT (the device tool's folder)
# or /tmp/vf-gpu, one per step, each cut at its time limit; the limits add up to ~10 minutes on one H100.
#   bash bench/gpu_checks.sh
# Wheels the machine lacks (diffusers, timm) are installed from .whl/ if present.
set -u
out=${OUT:-/tmp/vf-gpu}
peak=${PEAK_TFLOPS:-989}
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
gpu="--device cuda --dtype bf16 --compile --peak_tflops $peak"
step tests 90 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rs
# DiT-XL/2 and DiT-B/2 training steps vs diffusers' DiTTransformer2DModel, + ours checkpointed at 2x the batch
step dit_train 200 python3 bench/bench_diffusion_train.py $gpu --models dit_xl_2 dit_b_2 --batch 32 --runs 10 --grad_ckpt
# DiT-XL/2 sampling: 50 DDIM steps with classifier-free guidance
step dit_sample 70 python3 bench/bench_diffusion_train.py $gpu --models --sample_steps 50 --sample_batch 32 --runs 4
# the DDPM CIFAR-10 UNet at 32 px vs UNet2DModel
step unet 90 python3 bench/bench_unet.py $gpu --channels-last --batch 128 --runs 10 --skip-sampling
# ViT-B/16 fine-tuning at 224 vs timm (and torchvision)
step vision 100 python3 bench/bench_vision.py $gpu --model vit --batch 64 --runs 10
step attention 30 python3 bench/bench_attention.py --device cuda --dtype bf16
