"""Our DiT and VAE against diffusers' on the same random weights and inputs: time, peak memory, error.

    python bench/backbone.py            # CPU, reduced config (fp32)
    python bench/backbone.py --full     # GPU: CogVideoX-5b-I2V config, 49x480x720, bf16, CFG batch 2

Both models share one set of weight tensors (ours is built on `meta` and assigned diffusers' tensors),
so a 5B DiT needs its ~11 GB once. diffusers is a bench/test-only dependency.
"""
import argparse
import sys
import time
from pathlib import Path
from dataclasses import asdict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import vae as vae_mod  # noqa: E402


def timed(fn, reps, device):
    """(median seconds, peak bytes above the start, last output) over `reps` runs after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = fn()
    sync()
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        del out
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak, out


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def report(name, ours, ref, err):
    (to, mo, _), (tr, mr, _) = ours, ref
    gb = lambda m: f"{m / 2**30:.2f} GB" if m == m else "n/a"  # noqa: E731
    print(f"{name:10s} ours {to * 1e3:9.1f} ms {gb(mo):>9s} | diffusers {tr * 1e3:9.1f} ms {gb(mr):>9s} | "
          f"speed-up {tr / to:.2f}x  memory {mo / mr if mr == mr else float('nan'):.2f}x  max rel err {err:.1e}")


def bench_dit(args, device, dtype):
    from diffusers import CogVideoXTransformer3DModel
    if args.full:
        cfg = asdict(model.presets["5b-i2v"])
        F, H, W, B = 13, 60, 90, 2
    else:  # 5b-I2V structure, narrower and shallower so it runs on 2 CPU cores
        cfg = dict(asdict(model.presets["5b-i2v"]), num_attention_heads=4, num_layers=2, text_embed_dim=256,
                   time_embed_dim=128, sample_height=16, sample_width=24, sample_frames=9)
        F, H, W, B = 3, 16, 24, 2
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**cfg)
    ref = ref.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ref.eval().requires_grad_(False)
    with torch.device("meta"):
        ours = model.DiT(model.DiTConfig(**cfg))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # the same tensors, no copy
    ours.eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, F, cfg["in_channels"], H, W, generator=g).to(device, dtype)
    text = torch.randn(B, 226, cfg["text_embed_dim"], generator=g).to(device, dtype)
    t = torch.tensor([500] * B, device=device)
    # diffusers' pipeline builds the RoPE table outside the model; we build it inside every forward
    # (so our timing includes it and theirs does not).
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    gh, gw = H // 2, W // 2
    crop = get_resize_crop_region_for_grid((gh, gw), cfg["sample_width"] // 2, cfg["sample_height"] // 2)
    rope = get_3d_rotary_pos_embed(cfg["attention_head_dim"], crop, (gh, gw), F, device=device)
    with torch.no_grad():
        o = timed(lambda: ours(x, text, t), args.reps, device)
        r = timed(lambda: ref(x, text, t, image_rotary_emb=rope, return_dict=False)[0], args.reps, device)
    report("DiT", o, r, rel_err(o[2], r[2]))


def bench_vae(args, device, dtype):
    from diffusers import AutoencoderKLCogVideoX
    if args.full:
        cfg, latent = vae_mod.VAEConfig(), (1, 16, 13, 60, 90)
    else:
        cfg, latent = vae_mod.VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                                        norm_num_groups=8, sample_height=64, sample_width=96), (1, 16, 3, 8, 12)
    dcfg = dict(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                norm_num_groups=cfg.norm_num_groups, latent_channels=cfg.latent_channels,
                sample_height=cfg.sample_height, sample_width=cfg.sample_width, scaling_factor=0.7)
    ref = AutoencoderKLCogVideoX(**dcfg).to(device, dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = vae_mod.VAE(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    z = torch.randn(*latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    with torch.no_grad():
        o = timed(lambda: ours.decode(z), args.reps, device)
        r = timed(lambda: ref.decode(z).sample, args.reps, device)
    report("VAE decode", o, r, rel_err(o[2], r[2]))
    if args.full:  # tiled decode: the low-memory path
        ref.enable_tiling()
        with torch.no_grad():
            o = timed(lambda: ours.decode(z, tile=True), args.reps, device)
            r = timed(lambda: ref.decode(z).sample, args.reps, device)
        report("VAE tiled", o, r, rel_err(o[2], r[2]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="CogVideoX-5b-I2V size in bf16 on the GPU")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=["dit", "vae"])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full and device.type != "cuda":
        sys.exit("--full needs a GPU")
    dtype = torch.bfloat16 if args.full else torch.float32
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.only in (None, "dit"):
        bench_dit(args, device, dtype)
    if args.only in (None, "vae"):
        bench_vae(args, device, dtype)


if __name__ == "__main__":
    main()
