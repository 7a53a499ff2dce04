"""Training-step time and peak memory: train.py's step (frozen DiT + Video2LoRA, bf16 autocast, activation
checkpointing per block) vs diffusers + peft with a rank-1 LoRA on the same layers (to_q/to_k/to_v/to_out.0).
Random weights built on the meta device and filled on the target device (timing only).

    python bench/train_bench.py            # CPU: reduced DiT (D=384, 2 blocks, latents 3x10x16), fp32
    python bench/train_bench.py --full     # GPU: CogVideoX-5b-I2V, 49x480x720 (latents 13x60x90), batch 1, bf16

Both sides take the same latents, text and timestep and do forward, v-MSE, backward, grad clipping and an
AdamW step; the median of --steps after --warmup is reported. Ours also reports the per-step image-condition
VAE encode (one noisy first frame) that train.py adds when it reads latents from a cache. Peak memory is
torch.cuda.max_memory_allocated per side (on CPU only the time is meaningful).
"""
import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from dataclasses import asdict

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import vae as vae_lib  # noqa: E402
from hypernet import Video2LoRA  # noqa: E402

LAYERS = ["to_q", "to_k", "to_v", "to_out.0"]


def randomise(module, device, dtype):
    module = module.to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, device=device).mul_(0.02))
    return module.requires_grad_(False)


def measure(name, step, args, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    med = statistics.median(times[args.warmup:])
    print(f"{name:<28} {med:7.3f} s/step   peak {mem:6.2f} GiB   (steps: {', '.join(f'{t:.3f}' for t in times)})")
    return med, mem


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true", help="CogVideoX-5b-I2V at 49x480x720 on the GPU, bf16")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--skip-diffusers", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if args.full else "cpu")
    dtype = torch.bfloat16 if args.full else torch.float32
    amp = torch.autocast(device.type, torch.bfloat16, enabled=dtype == torch.bfloat16)
    if args.full:
        cfg_dict, (Fr, H, W), hcfg = asdict(model.presets["5b-i2v"]), (13, 60, 90), "default"
    else:  # the 5b layout (RoPE, any size) with 6 heads and 2 blocks
        cfg_dict = dict(asdict(model.presets["5b"]), num_attention_heads=6, num_layers=2, in_channels=32)
        (Fr, H, W), hcfg = (3, 10, 16), "tiny"
    cfg = model.DiTConfig(**cfg_dict)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, Fr, cfg.in_channels, H, W, generator=g).to(device, dtype)
    text = torch.randn(1, 226, cfg.text_embed_dim, generator=g).to(device, dtype)
    ref = torch.randn(1, Fr, cfg.out_channels, H, W, generator=g).to(device)
    v = torch.randn(1, Fr, cfg.out_channels, H, W, generator=g).to(device)
    t = torch.tensor([500], device=device)
    print(f"DiT D={cfg.inner_dim} x {cfg.num_layers} blocks, latents {list(x.shape)}, {dtype} on {device}, "
          f"checkpointing {not args.no_checkpointing}")

    # ---- ours: the step of train.py -------------------------------------------------------------------------
    with torch.device("meta"):
        dit = model.DiT(cfg)
    dit = randomise(dit, device, dtype).eval()
    if not args.no_checkpointing:
        for blk in dit.transformer_blocks:
            blk.forward = functools.partial(torch.utils.checkpoint.checkpoint, blk.forward, use_reentrant=False)
    v2l = Video2LoRA(dit, hcfg).to(device).train()
    opt = torch.optim.AdamW(v2l.parameters(), lr=1e-4, weight_decay=0.03)
    print(f"Video2LoRA {sum(p.numel() for p in v2l.parameters()) / 1e6:.2f} M trainable, {v2l.lora.n_layers} layers")

    def ours():
        with amp:
            pred = dit(x, text, t, lora=v2l(ref))
        F.mse_loss(pred.float(), v).backward()
        torch.nn.utils.clip_grad_norm_(v2l.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ours_t, ours_m = measure("ours (DiT + Video2LoRA)", ours, args, device)
    del dit, v2l, opt
    vcfg = vae_lib.VAEConfig() if args.full else vae_lib.presets["tiny"]
    with torch.device("meta"):
        vae = vae_lib.VAE(vcfg)
    vae = randomise(vae, device, dtype)
    frame = torch.randn(1, 3, 1, H * 8, W * 8, generator=g).to(device, dtype)
    measure("ours: image-condition encode", lambda: vae.encode(frame), args, device)
    del vae
    if args.skip_diffusers:
        return
    torch.cuda.empty_cache() if device.type == "cuda" else None

    # ---- diffusers + peft, rank-1 LoRA on the same layers ------------------------------------------------------
    from diffusers import CogVideoXTransformer3DModel
    from peft import LoraConfig
    with torch.device("meta"):
        tr = CogVideoXTransformer3DModel(**cfg_dict)
    tr = randomise(tr, device, dtype).train()
    tr.add_adapter(LoraConfig(r=1, lora_alpha=1, init_lora_weights=True, target_modules=LAYERS))
    params = [q for q in tr.parameters() if q.requires_grad]
    for q in params:  # fp32 master weights, as diffusers' training scripts (cast_training_params)
        q.data = q.data.float()
    if not args.no_checkpointing:
        tr.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.03)
    rope = model.rope_3d(cfg, Fr, H // 2, W // 2, device)
    print(f"diffusers + peft: {sum(q.numel() for q in params) / 1e6:.3f} M trainable LoRA parameters")

    def theirs():
        with amp:
            pred = tr(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope,
                      return_dict=False)[0]
        F.mse_loss(pred.float(), v).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt, dm = measure("diffusers + peft rank-1", theirs, args, device)
    print(f"ours / diffusers: time {ours_t / dt:.3f}x, memory {ours_m / dm:.3f}x")


if __name__ == "__main__":
    main()
