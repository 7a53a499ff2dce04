"""LoRA cost: overhead of the per-sample LoRA path over the base DiT forward (same inputs), the hypernetwork's
latency, and a torch.compile check that new LoRA values do not recompile. Random weights (timing only).

    python bench/lora.py              # CPU, 1 thread: reduced DiT (D=768, 2 blocks, 976 tokens), fp32
    python bench/lora.py --full       # GPU: 5B-I2V bf16 at 49x480x720, CFG batch 2; hypernet on [1,13,16,60,90]

Base and LoRA forwards are interleaved and the medians compared, so slow drifts hit both alike.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from dataclasses import replace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
from hypernet import Video2LoRA  # noqa: E402


def timed(fn, device):
    """ms of GPU wall time, or on CPU of this process's CPU time: the CPU run uses one thread, so CPU time is
    the work done and other jobs on a shared machine do not inflate it (wall time there is mostly waiting)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3
    t = time.process_time()
    fn()
    return (time.process_time() - t) * 1e3


def build_dit(preset, dtype, device, **over):
    cfg = replace(model.presets[preset], **over)
    with torch.device("meta"):
        dit = model.DiT(cfg)
    dit = dit.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(0)
    for t in list(dit.parameters()) + list(dit.buffers()):
        t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02))
    return dit


@torch.no_grad()
def overhead(args, device, dtype):
    if args.full:
        dit, (B, F, H, W), hcfg = build_dit("5b-i2v", dtype, device), (2, 13, 60, 90), "default"
    else:  # the 5b layout (RoPE, any size) with 12 heads and 2 blocks
        dit = build_dit("5b", dtype, device, num_attention_heads=12, num_layers=2, in_channels=32)
        (B, F, H, W), hcfg = (1, 5, 20, 30), "tiny"
    cfg = dit.config
    x = torch.randn(B, F, cfg.in_channels, H, W, device=device, dtype=dtype)
    text = torch.randn(B, 226, cfg.text_embed_dim, device=device, dtype=dtype)
    t = torch.tensor([500] * B, device=device)
    v2l = Video2LoRA(dit, hcfg).to(device)
    lo = v2l.lora
    print(lo)
    lora = lo.fold(torch.randn(B, lo.n_layers, lo.r, lo.a, device=device) * 0.1,
                   torch.randn(B, lo.n_layers, lo.b, lo.r, device=device) * 0.1)
    print(f"DiT D={cfg.inner_dim} blocks={cfg.num_layers} latents {list(x.shape)} {dtype} on {device}: "
          f"{B} x {F * H * W // 4 + 226} tokens, {lo.n_layers} adapted layers, one LoRA per sample")
    base, with_lora = [], []
    for i in range(args.warmup + args.reps):
        tb, tl = timed(lambda: dit(x, text, t), device), timed(lambda: dit(x, text, t, lora=lora), device)
        if i >= args.warmup:
            base.append(tb)
            with_lora.append(tl)
    mb, ml = statistics.median(base), statistics.median(with_lora)
    print(f"base forward  median {mb:9.2f} ms  (min {min(base):.2f})\nLoRA forward  median {ml:9.2f} ms  "
          f"(min {min(with_lora):.2f})\noverhead: median/median {100 * (ml / mb - 1):+.2f}%, "
          f"min/min {100 * (min(with_lora) / min(base) - 1):+.2f}%   ({args.reps} interleaved pairs)")
    # The same cost isolated (less noisy): one adapted linear on the joint text+video sequence, 50 calls each.
    layer, name = dit.transformer_blocks[0].attn1.to_q, "transformer_blocks.0.attn1.to_q"
    h = torch.randn(B, F * H * W // 4 + 226, cfg.inner_dim, device=device, dtype=dtype)
    n = 50
    tb = min(timed(lambda: [model.lora_linear(layer, h) for _ in range(n)], device) for _ in range(5)) / n
    tl = min(timed(lambda: [model.lora_linear(layer, h, lora[name]) for _ in range(n)], device) for _ in range(5)) / n
    print(f"one adapted linear {list(h.shape)}: {tb:.3f} ms base, {tl:.3f} ms with LoRA; x {lo.n_layers} layers "
          f"= {lo.n_layers * (tl - tb):.2f} ms = {100 * lo.n_layers * (tl - tb) / mb:+.2f}% of the base forward")


@torch.no_grad()
def hypernet_latency(args, device):
    with torch.device("meta"):
        dit = model.DiT(model.presets["5b-i2v"])
    v2l = Video2LoRA(dit).to(device)
    torch.nn.init.normal_(v2l.hypernet.head_B.weight, std=0.01)
    print(f"hypernet: {v2l.count()['hypernet']:,} params; {v2l.lora.extra_repr()}")
    shape = (1, 13, 16, 60, 90) if args.full else (1, 5, 16, 20, 30)
    ref = torch.randn(*shape, device=device)
    for name, ctx in (("fp32", torch.autocast(device.type, enabled=False)),
                      ("bf16 autocast", torch.autocast(device.type, torch.bfloat16))):
        with ctx:
            ts = [timed(lambda: v2l(ref), device) for _ in range(args.warmup + args.reps)][args.warmup:]
        print(f"hypernet + fold, reference latents {list(shape)}, {name}: median {statistics.median(ts):.2f} ms "
              f"(min {min(ts):.2f})")


@torch.no_grad()
def compile_check(args, device):
    """New LoRA values (same shapes) must reuse the compiled graph: dynamo guards shapes/dtypes, not values."""
    import torch._dynamo as dynamo
    dit = build_dit("tiny", torch.float32, device)
    lo = Video2LoRA(dit, "tiny").to(device).lora
    x, text, t = (torch.randn(1, 3, 8, 8, 12, device=device), torch.randn(1, 226, 32, device=device),
                  torch.tensor([10], device=device))
    loras = [lo.fold(torch.randn(1, lo.n_layers, 1, lo.a, device=device),
                     torch.randn(1, lo.n_layers, lo.b, 1, device=device) * s) for s in (0.0, 0.1, 0.2)]
    dynamo.reset()
    fn = torch.compile(dit, backend=args.backend)
    outs = [fn(x, text, t, lora=loras[0])]
    with dynamo.config.patch(error_on_recompile=True):
        outs += [fn(x, text, t, lora=lo_) for lo_ in loras[1:]]
    err = max((o - dit(x, text, t, lora=lo_)).abs().max().item() for o, lo_ in zip(outs, loras))
    print(f"torch.compile(backend={args.backend}): 3 different LoRAs, no recompile "
          f"(error_on_recompile=True), max |compiled - eager| = {err:.2e}")


def main(args):
    torch.manual_seed(0)
    device = torch.device("cuda" if args.full else "cpu")
    if args.full and not torch.cuda.is_available():
        sys.exit("--full needs a CUDA GPU")
    if args.full:
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    overhead(args, device, torch.bfloat16 if args.full else torch.float32)
    hypernet_latency(args, device)
    compile_check(args, device)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true", help="5B-I2V bf16 on the GPU (else a reduced fp32 CPU run)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default=None, help="torch.compile backend (default: eager on CPU, inductor on GPU)")
    a = p.parse_args()
    a.backend = a.backend or ("inductor" if a.full else "eager")
    main(a)
