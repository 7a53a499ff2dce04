"""Our sampling pipeline (sample.py) against diffusers' CogVideoXImageToVideoPipeline, side by side on the same
random weights and seed: wall time per stage and in total, peak GPU memory, max |ours - diffusers| of the videos.

    python bench/sample_bench.py                      # CPU: tiny random model (tests/conftest.py), fp32, 3 steps
    python bench/sample_bench.py --full --steps 10    # GPU: CogVideoX-5b-I2V sizes, random bf16, 49x480x720

Two settings: (a) everything on the device; (b) ours offload=True, tile_vae=True vs diffusers'
enable_model_cpu_offload() + vae.enable_tiling(). --full writes a random 5b-I2V folder (~21 GB) to --dir once
(diffusers' save_pretrained, the official layout) and loads both pipelines from it, one after the other.
Without --warmup, the first timed run of each pipeline also pays one-off CUDA set-up (cuBLAS handles, kernel loads).
"""
import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import asdict

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import model  # noqa: E402
import sample  # noqa: E402
from conftest import DDIM_CONFIG, make_pipeline, make_tokenizer_dir  # noqa: E402

# google/t5-v1_1-xxl encoder (spec §2.4)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
              tie_word_embeddings=False)


def build_full_folder(out, device, dtype):
    """Random 5b-I2V folder: modules built on meta, allocated on the device, normal(0, 0.02), saved by diffusers.
    Written to out.tmp and renamed at the end, so an interrupted build is never reused."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    tmp = Path(str(out) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok_dir = make_tokenizer_dir(tmp / "tok_src")  # ~160 ids: a subset of the 32128 embedding rows

    def random(make):
        with torch.device("meta"):
            m = make().to(dtype)
        m = m.to_empty(device=device).eval().requires_grad_(False)
        getattr(m, "tie_weights", lambda: None)()  # to_empty unties T5's shared / encoder.embed_tokens
        with torch.no_grad():  # buffers too: to_empty leaves e.g. the learned pos_embedding uninitialised
            for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
                t.normal_(0, 0.02)
        return m

    pipe = CogVideoXImageToVideoPipeline(
        tokenizer=T5Tokenizer.from_pretrained(str(tok_dir)),
        text_encoder=random(lambda: T5EncoderModel(T5Config(**T5_XXL))),
        vae=random(lambda: AutoencoderKLCogVideoX(scaling_factor=0.7)),  # the rest of the defaults = spec §2.2
        transformer=random(lambda: CogVideoXTransformer3DModel(**asdict(model.presets["5b-i2v"]))),
        scheduler=CogVideoXDDIMScheduler(**DDIM_CONFIG))  # snr_shift_scale 1.0, as 5b-I2V
    save(pipe, tmp / "model", tok_dir)
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    (tmp / "model").rename(out)
    shutil.rmtree(tmp)


def save(pipe, out, tok_dir):
    pipe.save_pretrained(str(out), safe_serialization=True)
    shutil.copy(tok_dir / "spiece.model", out / "tokenizer" / "spiece.model")  # transformers 5 writes only tokenizer.json


def sync(device):
    return torch.cuda.synchronize() if device.type == "cuda" else None


def two_runs(gen, to_low, device, steps, warmup):
    """gen(steps) -> (video, {stage: s}); runs it plain, then after to_low(). Each run -> (video, stages,
    total s, peak bytes since its start incl. resident weights, nan on CPU)."""
    if warmup:
        gen(1)
    out = []
    for setup in (lambda: None, to_low):
        setup()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        video, stages = gen(steps)
        sync(device)
        total, cuda = time.perf_counter() - t0, device.type == "cuda"
        out.append((video.float().cpu(), stages, total, torch.cuda.max_memory_allocated() if cuda else float("nan")))
    return out


def bench_ours(d, device, dtype, image, kw, steps, warmup):
    pipe = sample.load(d, dtype, str(device))
    gen = lambda steps: (pipe.generate(image, steps=steps, **kw), dict(pipe.times))  # noqa: E731

    def to_low():  # = sample.load(..., offload=True, tile_vae=True): every model starts on the CPU
        for m in (pipe.t5, pipe.vae, pipe.dit):
            m.to("cpu")
        pipe.offload = pipe.tile_vae = True
    return two_runs(gen, to_low, device, steps, warmup)


def bench_diffusers(d, device, dtype, image, kw, steps, warmup):
    from diffusers import CogVideoXImageToVideoPipeline
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(d), torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    stages, note = {}, [""]

    def timed(name, fn):  # per-stage wall time, by wrapping the pipeline's own helper methods
        def wrapper(*a, **k):
            # ours tiles only the decode; enable_tiling would tile the image encode too and change the video
            tiling, pipe.vae.use_tiling = pipe.vae.use_tiling, pipe.vae.use_tiling and name == "decode"
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            stages[name], pipe.vae.use_tiling = time.perf_counter() - t0, tiling
            return out
        return wrapper
    for name, attr in (("text", "encode_prompt"), ("image encode", "prepare_latents"), ("decode", "decode_latents")):
        setattr(pipe, attr, timed(name, getattr(pipe, attr)))

    def gen(steps):
        t0 = time.perf_counter()
        v = pipe(image=image, prompt=kw["prompt"], num_frames=kw["frames"], height=kw["height"], width=kw["width"],
                 num_inference_steps=steps, guidance_scale=6.0, generator=torch.Generator().manual_seed(kw["seed"]),
                 output_type="pt").frames[0]
        sync(device)
        rest = time.perf_counter() - t0 - sum(stages.values())  # the loop (+ small glue)
        return v, {k: stages[k] for k in ("text", "image encode")} | {"denoise": rest, "decode": stages["decode"]}

    def to_low():
        pipe.to("cpu")
        try:
            if device.type != "cuda":
                raise ImportError("CPU: it needs an accelerator")
            pipe.enable_model_cpu_offload()
        except ImportError as e:  # it also needs accelerate
            note[0], _ = f"  (no enable_model_cpu_offload: {e}; VAE tiling only)", pipe.to(device)
        pipe.vae.enable_tiling()
    return two_runs(gen, to_low, device, steps, warmup) + note


def show(name, r, steps, full_steps):
    _, stages, total, peak = r
    mem = f"{peak / 2**30:6.2f} GB" if peak == peak else "   n/a"
    extra = (f" | at {full_steps} steps ~{total + stages['denoise'] * (full_steps / steps - 1):7.2f} s (extrapolated)"
             if steps != full_steps else "")  # only the denoising loop scales with the step count
    print(f"{name:26s} total {total:7.2f} s | " + "  ".join(f"{k} {v:6.2f}" for k, v in stages.items())
          + f" | peak {mem}{extra}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="CogVideoX-5b-I2V sizes in bf16 on the GPU")
    ap.add_argument("--steps", type=int, help="denoising steps (default 50 with --full, 3 without)")
    ap.add_argument("--dir", default=str(ROOT / "cache" / "random-5b-i2v"), help="--full: the random model folder")
    ap.add_argument("--warmup", action="store_true", help="a 1-step run of each pipeline before timing")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full and device.type != "cuda":
        sys.exit("--full needs a GPU")
    dtype, full_steps = (torch.bfloat16, 50) if args.full else (torch.float32, 3)
    steps = args.steps or full_steps
    kw = dict(prompt="a quick brown fox jumps", frames=49 if args.full else 9, height=480 if args.full else 64,
              width=720 if args.full else 96, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="sample_bench_"))
    d = Path(args.dir) if args.full else tmp / "model"
    if args.full and not (d / "model_index.json").is_file():
        t0 = time.perf_counter()
        build_full_folder(d, device, dtype)
        print(f"built the random 5b-I2V folder {d} in {time.perf_counter() - t0:.0f} s")
    elif not args.full:
        pipe = make_pipeline(tmp)
        pipe.vae.register_to_config(sample_height=96, sample_width=80)  # tiles 48x40 add up at 64x96; 32x48 don't
        save(pipe, d, tmp / "tok_src")
        del pipe
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {dtype}, torch "
          f"{torch.__version__}, {kw['frames']}x{kw['height']}x{kw['width']}, {steps} steps, DDIM, CFG 6 (batch 2)")
    g = torch.Generator().manual_seed(0)  # a smooth image at the target size, so neither pipeline resamples it
    image = torch.nn.functional.interpolate(torch.rand(1, 3, kw["height"] // 16, kw["width"] // 16, generator=g),
                                            (kw["height"], kw["width"]), mode="bilinear", align_corners=False)[0]
    ours = bench_ours(d, device, dtype, image, kw, steps, args.warmup)  # returns with ours freed
    *ref, note = bench_diffusers(d, device, dtype, image, kw, steps, args.warmup)
    for label, o, r, extra in (("(a) plain", ours[0], ref[0], ""), ("(b) offload+tile", ours[1], ref[1], note)):
        show(f"ours {label}", o, steps, full_steps)
        show(f"diffusers {label}", r, steps, full_steps)
        mem = f"memory {o[3] / r[3]:.2f}x" if r[3] == r[3] else "memory n/a"
        print(f"{label:26s} speed-up {r[2] / o[2]:.2f}x  {mem}  max|ours-diffusers| {(o[0] - r[0]).abs().max():.2e}"
              f"{extra}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
