"""Faster sampling (fast.py): the step cache's quality table on CPU, and GPU timings beside diffusers.

    python bench/fast_bench.py cache [--model assets]          # CPU: DiT calls saved / PSNR / effect measures per
                                                               # threshold (the table in bench/FAST.md)
    python bench/fast_bench.py gpu [--steps 50]                # 1 GPU, 5b-I2V sizes, random bf16 weights, 49x480x720:
                                                               # diffusers eager / compiled, ours eager / compiled /
                                                               # compiled + cache; per-step and end-to-end s, peak GB
    torchrun --nproc_per_node 8 bench/fast_bench.py gpu --parallel   # ours on N GPUs (CFG x Ulysses) + compile

cache: for each image and sampling seed, the uncached video is the reference; each threshold's video is compared
with it (PSNR over the whole clip) and on the effect measures of bench/effects.py (fade = brightness lost by the
last frame, pan = px moved right, zoom = log scale), against how much the same measures move between two sampling
seeds of the uncached model. Without --ref the base I2V model; --ref REF puts REF's LoRA on every video.
"""
import argparse
import gc
import itertools
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import effects  # noqa: E402
import fast  # noqa: E402
import sample  # noqa: E402

MEASURES = {"fade": ("fade_black", {}), "pan": ("pan_right", {"angle": 0.0}), "zoom": ("zoom_in", {})}


def measures(video):
    return {k: effects.effect_amount(video, c, p) for k, (c, p) in MEASURES.items()}


@torch.no_grad()
def cache_table(args):
    torch.set_num_threads(1)
    ckpt = Path(args.model) / "hypernet.safetensors" if args.ref else None
    pipe = sample.load(args.model, torch.float32, "cpu", ckpt=ckpt)
    frames, height, width = pipe.sizes()
    images = [(sample.data.read_image(ROOT / "assets" / "img.png", height, width) + 1) / 2]
    images += [effects.make_image(s, height, width) for s in range(1, args.images)]
    kw = dict(frames=frames, height=height, width=width, steps=args.steps, guidance=args.guidance)
    if args.ref:  # the LoRA a reference gives, as sample.py REF IMG applies it
        kw["lora"] = pipe.reference_lora(sample.data.read_reference(args.ref, frames, height, width))
    base = {(i, s): pipe.generate(im, seed=s, **kw) for (i, im), s in itertools.product(enumerate(images), args.seeds)}
    m0 = {k: measures(v) for k, v in base.items()}
    # what a change of sampling seed does: mean |difference| of each measure between seed pairs of one image
    pairs = [((i, a), (i, b)) for i in range(len(images)) for a, b in itertools.combinations(args.seeds, 2)]
    seed_delta = {m: statistics.mean(abs(m0[p][m] - m0[q][m]) for p, q in pairs) for m in MEASURES}
    seed_psnr = statistics.mean(effects.psnr(base[p], base[q]) for p, q in pairs)
    print(f"model {args.model}, {frames}x{height}x{width}, {args.steps} steps DDIM, CFG {args.guidance}, "
          f"{len(images)} images x seeds {args.seeds}, "
          + (f"reference {args.ref}" if args.ref else "no reference (base I2V model)") + "\n")
    print("| threshold | DiT calls saved | PSNR vs uncached (dB) | " + " | ".join(f"Δ{m}" for m in MEASURES)
          + " | denoise s |")
    print("|---|---|---|" + "---|" * len(MEASURES) + "---|")
    print(f"| (another seed) | | {seed_psnr:.1f} | " + " | ".join(f"{seed_delta[m]:.4f}" for m in MEASURES) + " | |")
    for thr in args.thresholds:
        saved, psnrs, d, secs = [], [], {m: [] for m in MEASURES}, []
        for (i, s), ref in base.items():
            out = pipe.generate(images[i], seed=s, cache_threshold=thr, **kw)
            saved.append(pipe.cache.skipped / pipe.cache.calls)
            psnrs.append(effects.psnr(out, ref))
            secs.append(pipe.times["denoise"])
            for m, v in measures(out).items():
                d[m].append(abs(v - m0[(i, s)][m]))
        ok = statistics.mean(saved) >= 1 / 3 and all(statistics.mean(d[m]) <= seed_delta[m] for m in MEASURES)
        print(f"| {thr:g}{' ✓' if ok else ''} | {100 * statistics.mean(saved):.0f}% | {statistics.mean(psnrs):.1f} "
              f"(min {min(psnrs):.1f}) | " + " | ".join(f"{statistics.mean(d[m]):.4f}" for m in MEASURES)
              + f" | {statistics.mean(secs):.2f} |")
    print("\n✓: saves >= 1/3 of the DiT calls and moves every effect measure less than a change of seed (means)")


# ---------------------------------------------------------------------------------------------------------------
# GPU


def timed(gen, device):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    video, denoise = gen()
    torch.cuda.synchronize(device)
    return video.float().cpu(), time.perf_counter() - t0, denoise, torch.cuda.max_memory_allocated(device) / 2**30


@torch.no_grad()
def gpu(args):
    from sample_bench import build_full_folder
    par, device = fast.init_parallel()
    device = device or torch.device("cuda")
    rank0 = par is None or par.rank == 0
    d = Path(args.dir)
    if rank0 and not (d / "model_index.json").is_file():
        build_full_folder(d, device, torch.bfloat16)
    if par is not None:
        torch.distributed.barrier()
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 30, 45, generator=g), (480, 720), mode="bilinear")[0]
    kw = dict(prompt="a quick brown fox jumps", frames=49, height=480, width=720, seed=0, guidance=6.0)
    rows = []

    def report(name, r, ref=None):
        video, total, denoise, peak = r
        diff = f" | max|video - {ref[0]}| {(video - ref[1]).abs().max():.2e}" if ref else ""
        line = (f"{name:34s} end to end {total:7.2f} s | per step {1e3 * denoise / args.steps:7.1f} ms | "
                f"peak {peak:6.2f} GB{diff}")
        rows.append(line)
        if rank0:
            print(line, flush=True)

    if par is None:  # diffusers: eager, then its transformer compiled per block
        from diffusers import CogVideoXImageToVideoPipeline
        pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(d), torch_dtype=torch.bfloat16).to(device)
        pipe.set_progress_bar_config(disable=True)
        marks = []  # the time at the end of each step: per step = (last - first) / (steps - 1), no text/decode

        def dgen(steps):
            marks.clear()
            mark = lambda *a: (torch.cuda.synchronize(device), marks.append(time.perf_counter()), {})[2]  # noqa: E731
            v = pipe(image=image, prompt=kw["prompt"], num_frames=49, height=480, width=720, num_inference_steps=steps,
                     guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="pt",
                     callback_on_step_end=mark).frames[0]
            return v, (marks[-1] - marks[0]) * steps / max(len(marks) - 1, 1)
        dgen(1)
        ref = timed(lambda: dgen(args.steps), device)
        report("diffusers eager", ref)
        try:
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        except (AttributeError, ValueError):
            pipe.transformer.compile()
        dgen(1)
        report("diffusers compiled", timed(lambda: dgen(args.steps), device), ("diffusers eager", ref[0]))
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    ours = sample.load(d, torch.bfloat16, str(device), parallel=par)
    settings = [("eager", False, 0.0), ("compiled", True, 0.0), ("compiled + cache", True, args.cache_threshold)]
    if par is not None:
        settings = [(f"{par.world} GPUs " + n, c, th) for n, c, th in settings if n != "eager"]
    base = None
    for name, comp, thr in settings:
        if comp and not getattr(ours, "_compiled", False):
            fast.compile_blocks(ours.dit)
            ours._compiled = True

        def gen(steps=args.steps):
            v = ours.generate(image, steps=steps, cache_threshold=thr, **kw)
            return (v if v is not None else torch.zeros(1)), ours.times["denoise"]
        gen(2)  # warm-up: compiles (and the cache's first steps)
        r = timed(gen, device)
        extra = f" | cache skipped {ours.cache.skipped}/{ours.cache.calls}" if ours.cache else ""
        cmp = ("ours eager", base) if base is not None else ("diffusers eager", ref[0]) if par is None else None
        report("ours " + name + extra, r, cmp if rank0 else None)
        base = r[0] if base is None else base
    if par is not None:
        torch.distributed.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["cache", "gpu"])
    ap.add_argument("--model", default=str(ROOT / "assets"), help="cache: the I2V folder")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--images", type=int, default=3, help="cache: assets/img.png + procedural images")
    ap.add_argument("--ref", help="cache: a reference video; its LoRA (the model folder's hypernet) on every video")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.3])
    ap.add_argument("--cache-threshold", type=float, default=fast.CACHE_THRESHOLD, help="gpu: for compiled + cache")
    ap.add_argument("--dir", default=str(ROOT / "cache" / "random-5b-i2v"), help="gpu: the random model folder")
    ap.add_argument("--parallel", action="store_true", help="gpu: under torchrun, ours on all ranks")
    args = ap.parse_args()
    if args.mode == "gpu" and not torch.cuda.is_available():
        sys.exit("gpu mode needs a CUDA GPU")
    (cache_table if args.mode == "cache" else gpu)(args)


if __name__ == "__main__":
    main()
