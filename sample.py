"""Image-to-video with the effect of a reference video: CogVideoX schedulers, the I2V pipeline, the CLI.

    python sample.py ref.mp4 img.png --prompt "..." [--model DIR] [--ckpt hypernet.safetensors] [--out out.mp4]
        [--ref more.mp4:0.5] [--offload | --offload-blocks] [--tile-vae] [--scheduler dpm --dynamic-cfg] ... (-h)
    python sample.py ref.mp4 img.png --save-lora fx.safetensors     # keep the LoRA the hypernetwork predicted ...
    python sample.py other.png --lora fx.safetensors                # ... and reuse it without the hypernetwork
    torchrun --nproc_per_node 8 sample.py ref.mp4 img.png --compile --cache-threshold   # one video, 8 GPUs (fast.py)

Without a reference the output equals diffusers' CogVideoXImageToVideoPipeline for the same seed and settings
(tests/test_sample.py). Latents: DiT layout B F C H W; the VAE's B C T H W.
"""
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import diffusion
import fast
import linear
import hypernet
import lightlora
import model
import vae as vae_lib
from offload import move, stream_blocks

# ---- Schedulers: diffusers' schedulers/scheduling_ddim_cogvideox.py and scheduling_dpm_cogvideox.py (SAT's
# samplers). Scalars stay 0-dim float64 tensors indexed from the table as there, so latents keep their bits.


def trailing_timesteps(n, T=1000):
    """round(arange(T, 0, -T/n)) - 1: [999, 979, ..., 19] for n=50."""
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in 1..{T}, got {n}")
    return [int(t) for t in torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1]


def _alpha(A, t):  # the previous alpha at t - T//n, not the next scheduled t (diffusers PR #13125); 1 below 0
    return A[t] if t >= 0 else A.new_tensor(1.0)


def ddim_step(A, v, x, t, t_prev):
    """Deterministic DDIM step (v-prediction, eta = 0) from timestep t to t_prev."""
    at, ap = A[t], _alpha(A, t_prev)
    x0 = at ** 0.5 * x - (1 - at) ** 0.5 * v
    a = ((1 - ap) / (1 - at)) ** 0.5
    return a * x + (ap ** 0.5 - at ** 0.5 * a) * x0


def dpm_step(A, v, x, t, t_prev, t_back, old_x0, generator):
    """CogVideoX's stochastic DPM-Solver++(2M) step -> (x_prev, x0); t_back: the previous (larger) timestep, None
    at first. Draws as the reference: one at the first and last step, two (the first discarded) at the others."""
    at, ap = A[t], _alpha(A, t_prev)
    x0 = at ** 0.5 * x - (1 - at) ** 0.5 * v
    lam = lambda a: ((a / (1 - a)) ** 0.5).log()  # half log-SNR; -inf at t=999, +inf at alpha 1
    h = lam(ap) - lam(at)
    m1, m2 = ((1 - ap) / (1 - at)) ** 0.5 * (-h).exp(), (-2 * h).expm1() * ap ** 0.5
    mn = (1 - ap) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
    noise = lambda: torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    x_prev = m1 * x - m2 * x0 + mn * noise()
    if old_x0 is None or t_prev < 0:
        return x_prev, x0
    r = (lam(at) - lam(A[t_back])) / h
    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * old_x0
    return m1 * x - m2 * d + mn * noise(), x0


def dynamic_guidance(g, t, steps):
    """The official demo's cosine guidance. Fed the timestep (999..19), not the step index, as diffusers and SAT
    do, the weight oscillates in [1, 1+g]."""
    return 1 + g * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)


# ---- Pipeline: diffusers' pipelines/cogvideo/pipeline_cogvideox_image2video.py, plus a reference video's LoRA
class Pipeline:
    """The frozen I2V model (DiT, VAE, T5, tokenizer, scheduler config) + an optional Video2LoRA (small: it stays on
    the device). offload: the frozen models live on the CPU, each on the device only while its stage runs; "blocks":
    the DiT's and T5's blocks too come one at a time, one block ahead (offload.BlockStream). tile_vae: diffusers'
    tiled decode. parallel: a fast.Parallel (torchrun): the ranks share each DiT call, rank 0 decodes (the others'
    generate returns None). verbose: a line per slow stage. Build it with keywords, or load()."""

    def __init__(self, dit, vae, t5, tok, sched_cfg, v2l=None, device="cuda", dtype=torch.bfloat16, offload=False,
                 tile_vae=False, parallel=None, verbose=False):
        self.dit, self.vae, self.t5, self.tok, self.sched_cfg, self.v2l = dit, vae, t5, tok, sched_cfg, v2l
        self.device, self.dtype, self.offload, self.tile_vae = torch.device(device), dtype, offload, tile_vae
        self.parallel, self.verbose = parallel, verbose
        self.times, self.cache = {}, None  # seconds per stage of the last call; its fast.StepCache
        self.streams = stream_blocks(dit, t5, self.device) if offload == "blocks" else []

    @contextmanager
    def _stage(self, name, module=None):
        """Time a stage; with offload, bring its model to the device only while it runs."""
        say = self.verbose and module is not None and name != "denoise"  # denoise has a progress bar
        if say:
            print(f"{name} ...", end="", flush=True)
        if self.offload and module is not None:
            move(module, self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
            if say:
                print(f" {time.perf_counter() - t0:.1f} s", flush=True)
            if self.offload and module is not None:
                move(module, "cpu")

    def _encode(self, x):  # [B,3,F,H,W] in [0,1] -> the VAE posterior (mean, logvar [clamped]), [B,C,F',h,w]
        return self.vae.encode((2.0 * x - 1.0).to(self.device, self.dtype))

    def sizes(self, frames=None, height=None, width=None):
        """(frames, height, width) this model takes (common.video_size), its own size for what is not given."""
        c, s = self.dit.config, self.vae.spatial_compression
        return common.video_size(c, (c.sample_frames, c.sample_height * s, c.sample_width * s), frames, height, width)

    @torch.no_grad()
    def reference_lora(self, refs, scale=1.0):
        """refs: a video [F,3,H,W] in [0,1], or [(video, weight)] -> LoRA dict for the DiT (lightlora.blend). From
        the posterior mean: the LoRA is a function of the video, and the generator keeps diffusers' draw order."""
        if self.v2l is None:
            raise ValueError("a reference needs a hypernetwork checkpoint (ckpt=...)")
        loras = []
        for video, w in [(refs, 1.0)] if torch.is_tensor(refs) else refs:
            with self._stage("ref->lora", self.vae):
                mean, _ = self._encode(video.permute(1, 0, 2, 3)[None])  # [F,3,H,W] -> [1,3,F,H,W]
            with self._stage("ref->lora"):
                z = (mean * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)  # -> [1,F',C,h,w]
                loras.append((self.v2l(z.float(), scale=self.v2l.lora.scale * scale), w))
        return lightlora.blend(loras)

    @torch.no_grad()
    def generate(self, image, prompt="", ref=None, frames=None, height=None, width=None, steps=50,
                 guidance=6.0, dynamic_cfg=False, scheduler="ddim", seed=0, lora_scale=1.0, lora=None,
                 cache_threshold=0.0, progress=False):
        """image [3,H,W] in [0,1] -> video [frames,3,height,width] in [0,1] (float32, CPU). ref: see reference_lora;
        lora: what it returned (instead of ref). cache_threshold > 0: fast.StepCache, then in self.cache."""
        c, dev, dt = self.dit.config, self.device, self.dtype
        frames, height, width = self.sizes(frames, height, width)
        if scheduler not in ("ddim", "dpm"):
            raise ValueError(f"scheduler must be 'ddim' or 'dpm', got {scheduler!r}")
        self.times = {}
        if ref is not None:
            lora = self.reference_lora(ref, lora_scale)
        g = torch.Generator().manual_seed(seed)  # one CPU generator, drawn in diffusers' order
        cfg = guidance > 1 and prompt != ""  # an empty prompt = the (empty) negative one: cond = uncond, a no-op

        with self._stage("text", self.t5):
            ids = self.tok(["", prompt] if cfg else [prompt], max_length=226).to(dev)  # uncond first
            text = self.t5(ids).to(dt)

        with self._stage("image encode", self.vae):
            # diffusers stretches PIL images with Lanczos, tensors nearest; the CLI gives the exact size already
            if image.shape[-2:] != (height, width):
                image = F.interpolate(image[None].float(), (height, width), mode="bicubic", antialias=True)[0]
            mean, logvar = self._encode(image.clamp(0, 1)[None, :, None])  # [1,3,1,H,W]
            eps = torch.randn(mean.shape, generator=g, dtype=mean.dtype).to(dev)
            z = diffusion.posterior(mean, logvar, eps).to(dt).permute(0, 2, 1, 3, 4)  # [1,1,C,h,w]
            z = diffusion.scale_image_latent(z, self.vae.config)

        n_lat = (frames - 1) // 4 + 1
        pad = diffusion.frame_pad(n_lat, c)  # 1.5: noise for one more latent frame, dropped after
        shape = (1, n_lat + pad, c.in_channels // 2, height // 8, width // 8)
        z_img = diffusion.image_condition(z, shape[1])
        x = torch.randn(shape, generator=g, dtype=dt).to(dev)
        ofs = x.new_full((1,), 2.0) if c.ofs_embed_dim else None
        A, T = diffusion.alphas_cumprod(self.sched_cfg), self.sched_cfg.get("num_train_timesteps", 1000)
        ts, old = trailing_timesteps(steps, T), None
        self.cache = fast.StepCache(cache_threshold) if cache_threshold > 0 else None

        with self._stage("denoise", self.dit), fast.attention_backends(dev):
            for i, t in enumerate(tqdm(ts, disable=not progress, desc="denoise", leave=False)):
                inp = torch.cat([torch.cat([x, x]), torch.cat([z_img, z_img])] if cfg else [x, z_img], dim=2)
                tt = torch.full((inp.shape[0],), t, dtype=torch.long, device=dev)
                # a B=1 LoRA serves both branches
                v = fast.dit_call(self.dit, inp, text, tt, ofs, lora, self.cache, self.parallel).float()
                if cfg:
                    (vu, vc), w = v.chunk(2), dynamic_guidance(guidance, t, steps) if dynamic_cfg else guidance
                    v = vu + w * (vc - vu)
                if scheduler == "ddim":
                    x = ddim_step(A, v, x, t, t - T // steps)
                else:
                    x, old = dpm_step(A, v, x, t, t - T // steps, ts[i - 1] if i else None, old, g)
                x = x.to(dt)

        if self.parallel is not None and self.parallel.rank != 0:
            return None
        with self._stage("decode", self.vae):
            x = 1 / self.vae.config.scaling_factor * x[:, pad:].permute(0, 2, 1, 3, 4)  # -> [1,C,F',h,w]
            video = self.vae.decode(x, tile=self.tile_vae)
            video = (video / 2 + 0.5).clamp(0, 1)[0].permute(1, 0, 2, 3)  # [3,F,H,W] -> [F,3,H,W]
        return video.float().cpu()


def load(model_dir, dtype=torch.bfloat16, device="cuda", ckpt=None, offload=False, tile_vae=False, compile=False,
         parallel=None, verbose=False, fp8=False):
    """An official I2V folder (transformer/ vae/ text_encoder/ ...) [+ hypernet ckpt]; fp8: linear.store_fp8."""
    d, home, v2l = Path(model_dir), "cpu" if offload else device, None
    common.check_model_dir(d)
    say = lambda path: (print(f"loading {path}", flush=True) if verbose else None) or path  # -> path
    dit = model.load_dit(say(d / "transformer"), dtype, home)  # 5B: ~11 GB in bf16; T5-XXL's ~9.5 GB next
    dit = linear.store_fp8(dit) if fp8 else dit
    if dit.config.in_channels != 2 * dit.config.out_channels:
        raise ValueError(f"{d}: not an image-to-video model (transformer in_channels {dit.config.in_channels})")
    if ckpt is not None:
        v2l = hypernet.load(say(ckpt), dit, device)[0].eval()
    vae = vae_lib.load_vae(say(d / "vae"), dtype, home)
    t5 = model.load_t5(say(d / "text_encoder"), dtype, home)
    if compile:
        fast.compile_blocks(dit)
    sched_cfg = json.loads((d / "scheduler/scheduler_config.json").read_text())
    return Pipeline(dit, vae, t5, model.Tokenizer(d / "tokenizer"), sched_cfg, v2l=v2l, device=device, dtype=dtype,
                    offload=offload, tile_vae=tile_vae, parallel=parallel, verbose=verbose)


# ---- CLI
def check_args(args):
    """Everything that can be checked before loading the model, so a typo costs no time and writes nothing."""
    if not (args.no_ref or args.ref_video or args.ref or args.lora):
        raise ValueError("expected: ref.mp4 img.png (or img.png with --lora FILE or --no-ref)")
    suffix = lambda p: Path(p).suffix.lower()
    if args.ref_video and suffix(args.ref_video) in data.IMAGE_EXTS and suffix(args.image) in data.VIDEO_EXTS:
        raise ValueError(f"{args.ref_video} is an image and {args.image} a video: the order is the reference "
                         f"video, then the image")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates, which the tokenizer rejects
        raise ValueError("--prompt is not valid UTF-8 text (check the shell's locale or the file it came from)") from None
    data.check_video_out(args.out, "--out")
    common.check_outputs(("--out", args.out), ("--save-lora", args.save_lora), ("--export-lora", args.export_lora))
    return common.check_device(args.device)


def run(args):
    t0 = time.perf_counter()
    device = check_args(args)
    mdir, img = Path(args.model), args.image
    refs = [] if args.no_ref else [common.weighted(s) for s in [args.ref_video] * bool(args.ref_video) + args.ref]
    files = [common.weighted(s) for s in args.lora]
    ckpt = args.ckpt or (mdir / "hypernet.safetensors" if (mdir / "hypernet.safetensors").is_file() else None)
    for path in [img] + [p for p, _ in refs + files] + ([ckpt] if refs and ckpt else []):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    common.check_model_dir(mdir)
    if refs and ckpt is None:
        raise FileNotFoundError(f"no hypernetwork at {mdir}/hypernet.safetensors: pass --ckpt FILE or --no-ref")
    if (args.save_lora or args.export_lora) and not refs + files:
        raise ValueError("--save-lora/--export-lora need a reference or --lora")
    (frames, height, width), native = common.model_size(mdir, args.frames, args.height, args.width)
    if not (0.5 <= frames / native[0] <= 2 and 0.25 <= height * width / (native[1] * native[2]) <= 4):
        size, work = "x".join(map(str, native)), frames * height * width / math.prod(native)
        print(f"warning: {frames}x{height}x{width} (frames x height x width) is far from the {size} this model was "
              f"made for: {work:.3g}x the work and an output unlike its training", file=sys.stderr)
    par, rank_device = fast.init_parallel()  # under torchrun: this rank's device, and every rank runs each step
    device = torch.device(rank_device) if rank_device is not None else device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    say = par is None or par.rank == 0  # progress lines from one process
    pipe = load(mdir, dtype, device, ckpt if refs else None, "blocks" if args.offload_blocks else args.offload,
                args.tile_vae, args.compile, par, say, args.fp8_storage)
    if device.type == "cpu" and sum(p.numel() for p in pipe.dit.parameters()) < 50e6:  # e.g. assets/: tiny ops gain
        torch.set_num_threads(1)  # nothing from threads, and OpenMP barriers on a shared CPU cost up to 50x
    scaled = lambda lo: {k: (d, u * args.lora_scale) for k, (d, u) in lo.items()}  # up carries the scale
    loras = [(scaled(lightlora.load_native(path, pipe.device, pipe.dit)), w) for path, w in files]
    image = (data.read_image(img, height, width) + 1) / 2
    videos = [(data.read_reference(path, frames, height, width, args.ref_start), w) for path, w in refs]
    times = {"load": time.perf_counter() - t0}
    loras = [(pipe.reference_lora(v, args.lora_scale), w) for v, w in videos] + loras  # references first
    lora = lightlora.blend(loras) if loras else None
    times.update(pipe.times)
    video = pipe.generate(image, args.prompt, frames=frames, height=height, width=width, steps=args.steps,
                          guidance=args.guidance, dynamic_cfg=args.dynamic_cfg, scheduler=args.scheduler,
                          seed=args.seed, lora=lora, cache_threshold=args.cache_threshold, progress=say)
    times.update(pipe.times)
    if par is not None:
        torch.distributed.destroy_process_group()
        if par.rank != 0:  # only rank 0 writes
            return
    t1 = time.perf_counter()
    data.write_video(args.out, video, fps=8)  # atomic, like the two LoRA writers
    wrote = [f"{args.out} ({frames}x{height}x{width}, 8 fps)"]
    for f, write, what in ((args.save_lora, lightlora.save_native, "LoRA for --lora"),
                           (args.export_lora, lightlora.export_diffusers, "diffusers LoRA")):
        if f:
            write(f, lora)
            wrote.append(f"{f} ({what})")
    times["write"] = time.perf_counter() - t1
    extra = f" | cache: {pipe.cache.skipped}/{pipe.cache.calls} DiT calls skipped" if pipe.cache else ""
    extra += f" | {par.world} processes" if par else ""
    print(f"wrote {', '.join(wrote)} in {time.perf_counter() - t0:.1f} s |",
          " ".join(f"{k} {t:.1f}s" for k, t in times.items()) + extra)


def cli():
    num, p = common.number, common.Parser(description=__doc__, formatter_class=common.HelpFormatter)
    arg = p.add_argument
    arg("ref_video", nargs="?", metavar="ref.mp4", help="reference video whose effect the output takes (read at 8 "
        "fps; a longer one is cut, a shorter one is used up to its last 8k+1 frames)")
    arg("image", metavar="img.png", help="the first frame of the output (any size: covered, centre-cropped)")
    arg("--prompt", default="", metavar="TEXT", help="text prompt (the negative prompt is empty)")
    arg("--model", default="assets", metavar="DIR", help="CogVideoX I2V folder (transformer/ vae/ text_encoder/ ...)")
    arg("--ckpt", metavar="FILE", help="hypernetwork checkpoint (default: <model>/hypernet.safetensors)")
    arg("--out", default="out.mp4", metavar="FILE", help="output video (.mp4, .mov, .mkv or .m4v; H.264)")
    arg("--frames", type=num(int, 1), help="8k+1 (default: the model's sample_frames)")
    arg("--height", type=num(int, 16), help="multiple of 16 (default: the model's sample_height x 8)")
    arg("--width", type=num(int, 16), help="multiple of 16 (default: the model's sample_width x 8)")
    arg("--steps", type=num(int, 1, 1000), default=50, help="denoising steps")
    arg("--guidance", type=num(float, 0), default=6.0, help="classifier-free guidance scale (<= 1 or no --prompt: off)")
    arg("--dynamic-cfg", action="store_true", help="the official demo's cosine guidance schedule")
    arg("--seed", type=num(int, 0, 2 ** 63 - 1), default=0, help="noise seed (the same seed gives diffusers' video)")
    arg("--scheduler", choices=["ddim", "dpm"], default="ddim", help="CogVideoX DDIM or DPM-Solver++(2M)")
    arg("--lora-scale", type=num(float), default=1.0, help="multiplies every LoRA (references and --lora files)")
    arg("--ref", action="append", default=[], metavar="PATH[:WEIGHT]", help="another reference to blend "
        "(repeatable); weights are normalised over all references and --lora files, 1 when not given")
    arg("--ref-start", type=num(float, 0), default=0.0, metavar="SECONDS",
        help="where the reference span starts: the model reads frames/8 s of each reference from here")
    arg("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="a LoRA written by --save-lora, "
        "applied without the hypernetwork (repeatable, blends with the references like --ref)")
    arg("--no-ref", action="store_true", help="ignore reference videos: the base model, or only the --lora files")
    arg("--save-lora", metavar="FILE", help="write the LoRA used (the blend) for reuse with --lora")
    arg("--export-lora", metavar="FILE", help="write the LoRA used for diffusers' load_lora_weights")
    arg("--offload", action="store_true", help="keep only the running stage's model (T5, DiT, VAE) on the GPU")
    arg("--offload-blocks", action="store_true", help="as --offload, and the DiT's and T5's blocks stay in host "
        "memory, each copied to the GPU one block ahead of use: two on it at a time, the same video, slower")
    arg("--tile-vae", action="store_true", help="decode in tiles (less memory, slightly different)")
    arg("--fp8-storage", action="store_true", help="DiT block weights kept in float8, cast per layer (~5 GiB less)")
    arg("--compile", action="store_true", help="torch.compile each DiT block (the first step pays the compile)")
    arg("--cache-threshold", type=num(float, 0), nargs="?", const=fast.CACHE_THRESHOLD, default=0.0, metavar="T",
        help=f"skip DiT blocks 1.. on steps whose first-block residual moved < T (relative L1) since the last full "
             f"step; the flag alone: {fast.CACHE_THRESHOLD} (bench/FAST.md); 0: off")
    arg("--device", help="cpu, cuda or cuda:N (default: cuda when there is one; under torchrun each rank's "
        "cuda:LOCAL_RANK, or the CPU with gloo)")
    arg("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    return p


def main(argv=None):
    args = cli().parse_intermixed_args(argv)  # so `sample.py ref.mp4 --steps 20 img.png` works too
    return common.exit_status(run, args, errors=(data.VideoError,))


if __name__ == "__main__":
    sys.exit(main())
