#!/usr/bin/env bash
# The full-size GPU checks (CogVideoX-5b-I2V config, random weights, bf16, one H100/H200), in two parts so
# each fits one device command (10 min):
#   pip download --no-deps diffusers accelerate -d .whl   # here; .whl/ is git-ignored, pass it in carry
#   bash bench/gpu.sh core > $OUT/core.txt 2>&1           # there: backbone, LoRA overhead, training step
#   bash bench/gpu.sh sample > $OUT/sample.txt 2>&1       # there: the whole sampling pipeline (writes ~21 GB once)
#   bash bench/gpu.sh fast > $OUT/fast.txt 2>&1           # there: eager / compiled / + step cache, ours and diffusers'
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d .whl ] && pip install -q --no-deps .whl/*
nvidia-smi --query-gpu=name,memory.total --format=csv
case "${1:-core}" in
  core)
    python bench/backbone.py --full        # DiT forward (CFG batch 2) and VAE decode vs diffusers
    python bench/lora.py --full            # LoRA path overhead, hypernet latency, no recompiles
    python bench/train_bench.py --full ;;  # training step time / peak memory vs diffusers + peft
  sample)
    python bench/sample_bench.py --full --steps 10 ;;  # time, peak memory, plain and --offload --tile-vae
  fast)
    python bench/fast_bench.py gpu --steps 10 ;;  # per-step and end-to-end time, peak memory (bench/FAST.md)
  *) echo "usage: bash bench/gpu.sh core|sample|fast" >&2; exit 2 ;;
esac
