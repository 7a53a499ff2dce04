"""Image-to-video with the effect of a reference video: CogVideoX schedulers, the I2V pipeline, the CLI.

    python sample.py ref.mp4 img.png --prompt "..." [--model DIR] [--ckpt hypernet.safetensors] [--out out.mp4]
        [--ref more.mp4:0.5] [--offload] [--tile-vae] [--scheduler dpm --dynamic-cfg] ...   (python sample.py -h)
    python sample.py ref.mp4 img.png --save-lora fx.safetensors     # keep the LoRA the hypernetwork predicted ...
    python sample.py other.png --lora fx.safetensors                # ... and reuse it without the hypernetwork
    torchrun --nproc_per_node 8 sample.py ref.mp4 img.png --compile --cache-threshold   # one video, 8 GPUs (fast.py)

Without a reference the output equals diffusers' CogVideoXImageToVideoPipeline for the same seed and settings
(tests/test_sample.py checks it, and the schedulers bit for bit). Latents: DiT layout B F C H W; the VAE's B C T H W.
"""
import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import av
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from tqdm import tqdm

import data
import fast
import hypernet
import lightlora
import model
import vae as vae_lib

# ---------------------------------------------------------------------------------------------------------
# Schedulers (diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler, which mirror SAT's samplers). Scalars
# stay 0-dim float64 tensors indexed from the table as there, so latents keep their dtype and bits match.


def alphas_cumprod(cfg):
    """Cumulative alphas from scheduler_config.json: scaled-linear betas, SD3-style SNR shift, then the
    zero-terminal-SNR rescale (alpha_bar[-1] = 0)."""
    for key, want in (("beta_schedule", "scaled_linear"), ("prediction_type", "v_prediction"),
                      ("timestep_spacing", "trailing")):
        if cfg.get(key, want) != want:
            raise ValueError(f"scheduler config: {key}={cfg[key]!r} is not supported (only {want!r})")
    betas = torch.linspace(cfg.get("beta_start", 0.00085) ** 0.5, cfg.get("beta_end", 0.012) ** 0.5,
                           cfg.get("num_train_timesteps", 1000), dtype=torch.float64) ** 2
    a = torch.cumprod(1.0 - betas, dim=0)
    s = cfg.get("snr_shift_scale", 3.0)  # diffusers' default when the key is absent
    a = a / (s + (1 - s) * a)
    if cfg.get("rescale_betas_zero_snr", False):
        r = a.sqrt()
        r0, rT = r[0].clone(), r[-1].clone()
        a = ((r - rT) * (r0 / (r0 - rT))) ** 2
    return a


def trailing_timesteps(n, T=1000):
    """round(arange(T, 0, -T/n)) - 1: [999, 979, ..., 19] for n=50."""
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in 1..{T}, got {n}")
    return [int(t) for t in torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1]


def _alpha(A, t):
    # The reference looks the previous alpha up at t - T//n, not at the next scheduled timestep (the two
    # differ when n does not divide T; diffusers PR #13125). Below zero it is final_alpha_cumprod = 1.
    return A[t] if t >= 0 else A.new_tensor(1.0)


def ddim_step(A, v, x, t, t_prev):
    """Deterministic DDIM step (v-prediction, eta = 0) from timestep t to t_prev."""
    at, ap = A[t], _alpha(A, t_prev)
    x0 = at ** 0.5 * x - (1 - at) ** 0.5 * v
    a = ((1 - ap) / (1 - at)) ** 0.5
    return a * x + (ap ** 0.5 - at ** 0.5 * a) * x0


def dpm_step(A, v, x, t, t_prev, t_back, old_x0, generator):
    """CogVideoX's stochastic DPM-Solver++(2M) step -> (x_prev, x0). t_back = the previous (larger) timestep,
    None at the first step. Noise draws match the reference exactly: one at the first and the last step, two
    at every other step (the first of the two is discarded), all in x's dtype on the generator's device."""
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
    """The official demo's cosine guidance schedule. It is fed the timestep value (999..19), not the step
    index, so the weight oscillates in [1, 1+g]; diffusers and SAT both do this and parity needs it."""
    return 1 + g * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)


# ---------------------------------------------------------------------------------------------------------
# Pipeline


def sizes(c, frames=None, height=None, width=None):
    """(frames, height, width) for a DiT config: defaults from it; ValueError for what the model cannot take."""
    native = (c.sample_frames, c.sample_height * 8, c.sample_width * 8)
    frames, height, width = frames or native[0], height or native[1], width or native[2]
    if frames < 1 or (frames - 1) % 8:
        raise ValueError(f"frames must be 8k+1 (the VAE encodes a 9-frame chunk, then 8-frame ones), got {frames}")
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16 (VAE /8, 2x2 patches), got {height}x{width}")
    if c.use_learned_positional_embeddings and (frames, height, width) != native:
        raise ValueError("this model's learned positional embedding only takes %dx%dx%d (frames x height x "
                         "width), got %dx%dx%d" % (native + (frames, height, width)))
    if c.patch_size_t and (height > c.sample_height * 8 or width > c.sample_width * 8):  # 1.5: RoPE table size
        raise ValueError(f"{height}x{width} exceeds this model's {native[1]}x{native[2]} position grid")
    return frames, height, width


class Pipeline:
    """The frozen I2V model (DiT, VAE, T5, tokenizer, scheduler config) plus an optional Video2LoRA (which stays
    on the device: it is small). offload: the frozen models live on the CPU and each goes to the device only
    while its stage runs (T5 -> VAE -> DiT -> VAE). tile_vae: decode in diffusers' overlapping tiles (encoding
    one image, or a reference with only the VAE on the device under offload, needs far less memory). compile: the
    DiT's blocks compiled (fast.compile_blocks). parallel: a fast.Parallel (torchrun): the ranks share each DiT call
    and only rank 0 decodes (the others' generate returns None)."""

    def __init__(self, dit, vae, t5, tok, sched_cfg, v2l=None, device="cuda", dtype=torch.bfloat16, offload=False,
                 tile_vae=False, compile=False, parallel=None):
        self.dit, self.vae, self.t5, self.tok, self.sched_cfg, self.v2l = dit, vae, t5, tok, sched_cfg, v2l
        self.device, self.dtype, self.offload, self.tile_vae = torch.device(device), dtype, offload, tile_vae
        self.parallel = parallel
        if compile:
            fast.compile_blocks(dit)
        self.times = {}  # seconds per stage of the last call
        self.verbose = False  # a line per slow stage (the CLI's progress)

    @contextmanager
    def _stage(self, name, module=None):
        """Time a stage; with offload, bring its model to the device only while it runs."""
        say = self.verbose and module is not None and name != "denoise"  # the frozen models' stages; denoise has a bar
        if say:
            print(f"{name} ...", end="", flush=True)
        if self.offload and module is not None:
            module.to(self.device)
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
                module.to("cpu")

    def _encode(self, x):
        """[B,3,F,H,W] in [0,1] -> posterior (mean, logvar) of the VAE, both [B,C,F',h,w]."""
        return self.vae.encode((2.0 * x - 1.0).to(self.device, self.dtype))  # logvar comes clamped

    def sizes(self, frames=None, height=None, width=None):
        return sizes(self.dit.config, frames, height, width)

    @torch.no_grad()
    def reference_lora(self, refs, scale=1.0):
        """refs: a video [F,3,H,W] in [0,1], or a list of (video, weight) -> LoRA dict for the DiT.
        The reference is encoded to the posterior mean, not a sample: the LoRA is then a function of the
        video alone, and the seeded generator keeps diffusers' draw order. Several references blend: the
        weights are normalised to sum 1 (see blend)."""
        if self.v2l is None:
            raise ValueError("a reference needs a hypernetwork checkpoint (ckpt=...)")
        loras = []
        for video, w in [(refs, 1.0)] if torch.is_tensor(refs) else refs:
            with self._stage("ref->lora", self.vae):
                mean, _ = self._encode(video.permute(1, 0, 2, 3)[None])  # [F,3,H,W] -> [1,3,F,H,W]
            with self._stage("ref->lora"):
                z = (mean * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)  # -> [1,F',C,h,w]
                loras.append((self.v2l(z.float(), scale=self.v2l.lora.scale * scale), w))
        return blend(loras)

    @torch.no_grad()
    def generate(self, image, prompt="", ref=None, frames=None, height=None, width=None, steps=50,
                 guidance=6.0, dynamic_cfg=False, scheduler="ddim", seed=0, lora_scale=1.0, lora=None,
                 cache_threshold=0.0, progress=False):
        """image [3,H,W] in [0,1] -> video [frames,3,height,width] in [0,1] (float32, CPU). ref: see
        reference_lora; lora: a dict it returned (instead of ref). cache_threshold > 0: the first-block step cache
        (fast.StepCache); self.cache then holds its counts."""
        c, dev, dt = self.dit.config, self.device, self.dtype
        frames, height, width = self.sizes(frames, height, width)
        if scheduler not in ("ddim", "dpm"):
            raise ValueError(f"scheduler must be 'ddim' or 'dpm', got {scheduler!r}")
        self.times = {}
        if ref is not None:
            lora = self.reference_lora(ref, lora_scale)
        g = torch.Generator().manual_seed(seed)  # one CPU generator, drawn in diffusers' order
        cfg = guidance > 1

        with self._stage("text", self.t5):
            ids = self.tok(["", prompt] if cfg else [prompt], max_length=226).to(dev)  # uncond first
            text = self.t5(ids).to(dt)

        with self._stage("image encode", self.vae):
            # diffusers stretches PIL images with Lanczos (tensors: nearest); we take a tensor and stretch it
            # with antialiased bicubic. The CLI already gives the exact size (data.read_image covers + crops).
            if image.shape[-2:] != (height, width):
                image = F.interpolate(image[None].float(), (height, width), mode="bicubic", antialias=True)[0]
            mean, logvar = self._encode(image.clamp(0, 1)[None, :, None])  # [1,3,1,H,W]
            eps = torch.randn(mean.shape, generator=g, dtype=mean.dtype).to(dev)
            z = (mean + torch.exp(0.5 * logvar) * eps).to(dt).permute(0, 2, 1, 3, 4)  # [1,1,C,h,w]
            sf = self.vae.config.scaling_factor
            # 1.5-I2V: diffusers divides by the scaling factor (SAT uses the raw latent; spec §11.3)
            z = 1 / sf * z if self.vae.config.invert_scale_latents else sf * z

        n_lat = (frames - 1) // 4 + 1
        pad = (-n_lat) % c.patch_size_t if c.patch_size_t else 0  # 1.5: even latent count, dropped after
        shape = (1, n_lat + pad, c.in_channels // 2, height // 8, width // 8)
        z_img = torch.cat([z, z.new_zeros(1, shape[1] - 1, *shape[2:])], dim=1)
        x = torch.randn(shape, generator=g, dtype=dt).to(dev)
        ofs = x.new_full((1,), 2.0) if c.ofs_embed_dim else None
        A, T = alphas_cumprod(self.sched_cfg), self.sched_cfg.get("num_train_timesteps", 1000)
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


def blend(loras):
    """[(LoRA dict, weight)] -> one LoRA whose effect is sum_i w_i/sum(w) x down_i up_i, exactly: the rank-r_i
    factors are concatenated along r (averaging folded factors would not be). A layer that a LoRA lacks gets
    nothing from it. One LoRA goes through it too: cat gives the predicted factors (strided views of the fold) the
    layout a --lora file has, so a saved LoRA reproduces the reference's video bit for bit, not to rounding."""
    total, names = sum(w for _, w in loras), dict.fromkeys(k for l, _ in loras for k in l)
    return {k: (torch.cat([l[k][0] * (w / total) for l, w in loras if k in l], dim=-1),
                torch.cat([l[k][1] for l, _ in loras if k in l], dim=1)) for k in names}


def load_lora(path, dit, device="cpu"):
    """A --save-lora file (lightlora.save_native) -> LoRA dict, checked against this DiT's linears."""
    try:
        lora = lightlora.load_native(path, device)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable LoRA file ({e})") from None
    mods = dict(dit.named_modules())
    for name, (down, up) in lora.items():
        m = mods.get(name)
        if not (name in dit.lora_names and down.shape[0] == up.shape[0] == 1 and down.shape[2] == up.shape[1]
                and (down.shape[1], up.shape[2]) == (m.in_features, m.out_features)):
            raise ValueError(f"{path}: {name} (down {tuple(down.shape)}, up {tuple(up.shape)}) does not fit this "
                             f"model's DiT: the LoRA was made for another model")
    return lora


def check_model_dir(d, option="--model"):
    """FileNotFoundError unless `d` has an I2V folder's parts: fail before spending a minute on the 5B weights."""
    if not Path(d).is_dir():
        raise FileNotFoundError(f"no model at {d}/: pass {option} the folder of a CogVideoX I2V model")
    for sub in ("transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
                "scheduler/scheduler_config.json"):
        if not (Path(d) / sub).exists():
            raise FileNotFoundError(f"{option} {d}: not a CogVideoX I2V folder (no {sub}; expected the layout of "
                                    f"THUDM/CogVideoX-5b-I2V)")


def load(model_dir, dtype=torch.bfloat16, device="cuda", ckpt=None, offload=False, tile_vae=False, compile=False,
         parallel=None, verbose=False, fp8=False):
    """An official I2V folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/) [+ hypernet ckpt]. fp8: the
    DiT blocks' weights stored in float8 (model.store_fp8)."""
    d, home, v2l = Path(model_dir), "cpu" if offload else device, None
    check_model_dir(d)
    say = (lambda what: print(f"loading {what}", flush=True)) if verbose else (lambda what: None)
    say(d / "transformer")  # 5B: ~11 GB in bf16; T5-XXL's ~9.5 GB next
    dit = model.load_dit(d / "transformer", dtype, home)
    if fp8:
        model.store_fp8(dit)
    if dit.config.in_channels != 2 * dit.config.out_channels:
        raise ValueError(f"{d}: not an image-to-video model (transformer in_channels {dit.config.in_channels})")
    if ckpt is not None:
        say(ckpt)
        try:
            v2l = hypernet.load(ckpt, dit, device)[0].eval()
        except SafetensorError as e:
            raise ValueError(f"{ckpt}: not a readable checkpoint ({e})") from None
    say(d / "vae")
    vae = vae_lib.load_vae(d / "vae", dtype, home)
    say(d / "text_encoder")
    t5 = model.load_t5(d / "text_encoder", dtype, home)
    return Pipeline(dit, vae, t5, model.Tokenizer(d / "tokenizer"),
                    json.loads((d / "scheduler/scheduler_config.json").read_text()), v2l, device, dtype, offload,
                    tile_vae, compile, parallel)


# ---------------------------------------------------------------------------------------------------------
# CLI


def _weighted(s):
    """"file" or "file:0.5" (a weight for blending with the other references and LoRA files)."""
    path, _, w = s.rpartition(":")
    if not path or Path(s).exists() or not Path(path).exists():
        return s, 1.0
    try:
        return path, data.number(float, 1e-12)(w)
    except argparse.ArgumentTypeError:
        raise ValueError(f"{s}: the weight after ':' must be a finite number > 0, got {w!r}") from None


def check_device(name):
    """-> the torch device for --device (default: cuda when there is one); ValueError naming what exists."""
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device (cpu, cuda, cuda:N)") from None
    n = torch.cuda.device_count() if dev.type == "cuda" else 1
    if dev.type not in ("cpu", "cuda") or (dev.index or 0) >= n:
        have = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())])
        raise ValueError(f"--device {name}: not available on this machine (have: {have})")
    return dev


OUT_EXTS = (".mp4", ".mov", ".mkv", ".m4v")  # containers that take H.264, which write_video encodes
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_args(args):
    """Everything that can be checked before loading the model, so a typo costs no time and writes nothing."""
    if not (args.no_ref or args.ref_video or args.ref or args.lora):
        raise ValueError("expected: ref.mp4 img.png (or img.png with --lora FILE or --no-ref)")
    suffix = lambda p: Path(p).suffix.lower()
    if args.ref_video and suffix(args.ref_video) in IMAGE_EXTS and suffix(args.image) in data.VIDEO_EXTS:
        raise ValueError(f"{args.ref_video} is an image and {args.image} a video: the order is the reference "
                         f"video, then the image")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates, which the tokenizer rejects
        raise ValueError("--prompt is not valid UTF-8 text (check the shell's locale or the file it came from)") from None
    if args.frames is not None and (args.frames - 1) % 8:
        raise ValueError(f"--frames must be 8k+1 (9, 17, ..., 49), got {args.frames}")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) % 16:
            raise ValueError(f"--{name} must be a multiple of 16, got {getattr(args, name)}")
    if Path(args.out).suffix.lower() not in OUT_EXTS:
        raise ValueError(f"--out {args.out}: the video is H.264, so the name must end in one of {' '.join(OUT_EXTS)}")
    try:
        av.codec.Codec("libx264", "w")
    except Exception:
        raise ValueError("this PyAV/FFmpeg build has no libx264 encoder (pip install av ships one)") from None
    outs = [(o, f) for o, f in (("--out", args.out), ("--save-lora", args.save_lora),
                                ("--export-lora", args.export_lora)) if f]
    for option, f in outs:
        if Path(f).is_dir():
            raise IsADirectoryError(f"{option} {f}: is a folder; give a file name")
        if not Path(f).resolve().parent.is_dir():
            raise FileNotFoundError(f"{option} {f}: its folder does not exist")
        data.check_writable(f, option)
    if len({Path(f).resolve() for _, f in outs}) < len(outs):
        raise ValueError("--out, --save-lora and --export-lora must be different files")
    return check_device(args.device)


def run(args):
    t0 = time.perf_counter()
    device = check_args(args)
    mdir, img = Path(args.model), args.image
    refs = [] if args.no_ref else [_weighted(s) for s in [args.ref_video] * bool(args.ref_video) + args.ref]
    files = [_weighted(s) for s in args.lora]
    ckpt = args.ckpt or (mdir / "hypernet.safetensors" if (mdir / "hypernet.safetensors").is_file() else None)
    for path in [img] + [p for p, _ in refs + files] + ([ckpt] if refs and ckpt else []):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    check_model_dir(mdir)
    if refs and ckpt is None:
        raise FileNotFoundError(f"no hypernetwork at {mdir}/hypernet.safetensors: pass --ckpt FILE or --no-ref")
    if (args.save_lora or args.export_lora) and not refs + files:
        raise ValueError("--save-lora/--export-lora need a reference or --lora")
    cfg = model.DiTConfig.from_dict(model.read_config(mdir / "transformer"))
    frames, height, width = sizes(cfg, args.frames, args.height, args.width)
    native = sizes(cfg)
    if not (0.5 <= frames / native[0] <= 2 and 0.25 <= height * width / (native[1] * native[2]) <= 4):
        print(f"warning: {frames}x{height}x{width} (frames x height x width) is far from the {'x'.join(map(str, native))}"
              f" this model was made for: expect a slower run ({frames * height * width / math.prod(native):.3g}x the "
              f"work, attention grows faster) and an output unlike its training", file=sys.stderr)
    if args.cache_threshold < 0:
        raise ValueError(f"--cache-threshold must be >= 0, got {args.cache_threshold}")
    par, rank_device = fast.init_parallel()  # under torchrun: this rank's device, and every rank runs each step
    device = torch.device(rank_device) if rank_device is not None else device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]

    say = par is None or par.rank == 0  # progress lines from one process
    pipe = load(mdir, dtype, device, ckpt if refs else None, args.offload, args.tile_vae, args.compile, par, say,
                args.fp8_storage)
    pipe.verbose = say
    if device.type == "cpu" and sum(p.numel() for p in pipe.dit.parameters()) < 50e6:  # e.g. assets/: tiny ops gain
        torch.set_num_threads(1)  # nothing from threads, and OpenMP barriers on a shared CPU cost up to 50x
    # a LoRA file's up factor takes --lora-scale as the hypernetwork's prediction does (its up carries the scale)
    loras = [({k: (d, u * args.lora_scale) for k, (d, u) in load_lora(path, pipe.dit, pipe.device).items()}, w)
             for path, w in files]
    image, videos = (data.read_image(img, height, width) + 1) / 2, []
    for path, w in refs:
        v, n = data.read_video(path, frames, fps=8, height=height, width=width, allow_short=True, start=args.ref_start)
        keep = frames if n >= frames else (n - 1) // 8 * 8 + 1  # a short one: its longest 8k+1 prefix, not
        if keep < 9:                                              # a frozen tail fed to the hypernetwork
            raise ValueError(f"{path}: too short: {n} frames at 8 fps from {args.ref_start:g} s on, a reference "
                             f"needs at least 9")
        span = f"{args.ref_start:.2f}-{args.ref_start + keep / 8:.2f} s"
        if keep < frames:
            print(f"note: {path} gives only {n} frames at 8 fps (< {frames}): using its first {keep} ({span})",
                  file=sys.stderr)
        elif (length := data.duration(path)) and length > args.ref_start + (keep + 1) / 8:
            print(f"note: {path} lasts {length:.2f} s; the model reads {keep} frames at 8 fps: using {span} "
                  f"(--ref-start SECONDS picks another span)", file=sys.stderr)
        videos.append(((v[:keep] + 1) / 2, w))
    times = {"load": time.perf_counter() - t0}

    loras = [(pipe.reference_lora(v, args.lora_scale), w) for v, w in videos] + loras  # references first
    lora = blend(loras) if loras else None
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
    if args.save_lora:
        lightlora.save_native(args.save_lora, lora)
        wrote.append(f"{args.save_lora} (LoRA for --lora)")
    if args.export_lora:
        lightlora.export_diffusers(args.export_lora, lora)
        wrote.append(f"{args.export_lora} (diffusers LoRA)")
    times["write"] = time.perf_counter() - t1
    extra = f" | cache: {pipe.cache.skipped}/{pipe.cache.calls} DiT calls skipped" if pipe.cache else ""
    extra += f" | {par.world} processes" if par else ""
    print(f"wrote {', '.join(wrote)} in {time.perf_counter() - t0:.1f} s |",
          " ".join(f"{k} {t:.1f}s" for k, t in times.items()) + extra)


def cli():
    num = data.number
    p = data.Parser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("ref_video", nargs="?", metavar="ref.mp4", help="reference video whose effect the output takes "
                   "(read at 8 fps; a longer one is cut, a shorter one is used up to its last 8k+1 frames)")
    p.add_argument("image", metavar="img.png", help="the first frame of the output (any size: covered, centre-cropped)")
    p.add_argument("--prompt", default="", metavar="TEXT", help="text prompt (the negative prompt is empty)")
    p.add_argument("--model", default="assets", metavar="DIR",
                   help="CogVideoX I2V folder (transformer/ vae/ text_encoder/ ...)")
    p.add_argument("--ckpt", metavar="FILE", help="hypernetwork checkpoint, e.g. a training run's ckpt-*.safetensors "
                   "(default: <model>/hypernet.safetensors)")
    p.add_argument("--out", default="out.mp4", metavar="FILE", help="output video (.mp4, .mov, .mkv or .m4v; H.264)")
    p.add_argument("--frames", type=num(int, 1), help="8k+1 (default: the model's sample_frames)")
    p.add_argument("--height", type=num(int, 16), help="multiple of 16 (default: the model's sample_height x 8)")
    p.add_argument("--width", type=num(int, 16), help="multiple of 16 (default: the model's sample_width x 8)")
    p.add_argument("--steps", type=num(int, 1, 1000), default=50, help="denoising steps")
    p.add_argument("--guidance", type=num(float, 0), default=6.0, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--dynamic-cfg", action="store_true", help="the official demo's cosine guidance schedule")
    p.add_argument("--seed", type=num(int, 0, 2 ** 63 - 1), default=0,
                   help="noise seed (the same seed gives diffusers' video)")
    p.add_argument("--scheduler", choices=["ddim", "dpm"], default="ddim", help="CogVideoX DDIM or DPM-Solver++(2M)")
    p.add_argument("--lora-scale", type=num(float), default=1.0,
                   help="multiplies every LoRA (references and --lora files)")
    p.add_argument("--ref", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="another reference to blend (repeatable); weights are normalised over all references and "
                        "--lora files, 1 when not given")
    p.add_argument("--ref-start", type=num(float, 0), default=0.0, metavar="SECONDS",
                   help="where the reference span starts: the model reads frames/8 s of each reference from here")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA written by --save-lora, applied without the hypernetwork (repeatable, blends with "
                        "the references like --ref)")
    p.add_argument("--no-ref", action="store_true", help="ignore reference videos: the base I2V model, or only the "
                   "--lora files")
    p.add_argument("--save-lora", metavar="FILE", help="write the LoRA used (the blend) for reuse with --lora")
    p.add_argument("--export-lora", metavar="FILE", help="write the LoRA used as a diffusers file "
                   "(CogVideoXImageToVideoPipeline.load_lora_weights)")
    p.add_argument("--offload", action="store_true", help="keep only the running stage's model (T5, DiT, VAE) on "
                   "the GPU")
    p.add_argument("--tile-vae", action="store_true", help="decode in tiles (less memory, slightly different)")
    p.add_argument("--fp8-storage", action="store_true", help="keep the DiT blocks' weight matrices in float8 and "
                   "cast each to --dtype just before use (~5 GiB less at 5B; weights rounded to 3 mantissa bits)")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block (the first step pays the "
                   "compile)")
    p.add_argument("--cache-threshold", type=float, nargs="?", const=fast.CACHE_THRESHOLD, default=0.0, metavar="T",
                   help=f"skip DiT blocks 1.. on steps whose first-block residual moved < T (relative L1) since the "
                        f"last full step; the flag alone: {fast.CACHE_THRESHOLD} (bench/FAST.md); 0: off")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one; under torchrun each "
                   "rank's cuda:LOCAL_RANK, or the CPU with gloo)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    return p


def main(argv=None):
    args = cli().parse_intermixed_args(argv)  # so `sample.py ref.mp4 --steps 20 img.png` works too
    try:
        run(args)
    except (OSError, ValueError, data.VideoError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
