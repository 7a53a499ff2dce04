#!/usr/bin/env bash
# Every full-size GPU check in one run (CogVideoX-5b-I2V config, random weights, bf16, one H100/H200):
#   pip download --no-deps diffusers -d .whl      # here; .whl/ is git-ignored, pass it in the device's carry
#   bash bench/gpu.sh > $OUT/gpu.txt 2>&1         # there (the device machine has torch, transformers, peft)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d .whl ] && pip install -q --no-deps .whl/*
nvidia-smi --query-gpu=name,memory.total --format=csv
python bench/backbone.py --full              # DiT forward (CFG batch 2) and VAE decode vs diffusers
python bench/lora.py --full                  # LoRA path overhead, hypernet latency, no recompiles
python bench/train_bench.py --full           # training step time / peak memory vs diffusers + peft
python bench/sample_bench.py --full --steps 10   # sampling: time, peak memory, with/without --offload --tile-vae vs diffusers
