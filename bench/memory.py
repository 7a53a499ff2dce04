"""Peak device memory of sample.py and train.py at full size, estimated on a CPU without a GPU.

    python bench/memory.py                                  # CogVideoX-5B-I2V (bench/configs/), every row
    python bench/memory.py --model DIR                      # any model folder (its config.json files suffice)
    python bench/memory.py --only sample|train|flops        # one part
    python bench/memory.py --only train --row N             # one train row (TRAIN_ROWS: 4 = --fp8-storage, 5 = --fsdp,
                                                            # 6-8 = 0, 4, 5 with --offload-activations)
    python bench/memory.py --diffusers                      # dev: the same estimator on diffusers' modules

The real code (sample.Pipeline, train.batch_fn / step_loss / wrap / optimizer, the model modules) runs on
fake tensors (torch._subclasses.fake_tensor.FakeTensorMode: shapes and dtypes, no data, no compute) with
weights built on the `meta` device. A TorchDispatchMode (`Tracker`) adds up the bytes of live storages: a
storage counts from the op that creates it until a weakref finaliser sees it die, so views, in-place ops and
autograd's saved tensors count as on a GPU. GiB = 2^30 B, comparable to torch.cuda.max_memory_allocated.
Not seen: kernel workspaces (cuDNN conv, cuBLAS), the caching allocator's rounding and fragmentation, the
CUDA context. CUDA's autocast differs from the CPU's (on CUDA layer_norm runs and returns fp32); `CudaAutocast`
applies CUDA's op lists wherever CPU autocast is on. Each train row also prints where the bytes are at its
peak (Tracker.breakdown). --fsdp is modelled, not run (Tracker.shard: FSDP2 needs a process group).
tests/test_memory.py checks the estimate against the CPU allocator on a real tiny run.
"""
import argparse
import contextlib
import functools
import json
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import diffusion  # noqa: E402
import hypernet  # noqa: E402
import linear  # noqa: E402
import model  # noqa: E402
import offload  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import vae as vae_lib  # noqa: E402

GiB = 2 ** 30
OFFICIAL = ROOT / "bench" / "configs" / "cogvideox-5b-i2v"


class Tracker(TorchDispatchMode):
    """Live and peak bytes of the storages that ops create. `host(tensors)` marks storages as living in host
    memory (the loader's items, offloaded models): they do not count. With count=True it also adds up FLOPs
    (torch.utils.flop_counter's formulas) and bytes moved (inputs read + outputs written by every op that is
    not a view)."""

    def __init__(self):
        super().__init__()
        self.sizes, self.hosted = {}, set()
        self.live = self.peak = 0
        self.count, self.flops, self.moved = False, 0, 0
        self.hosting = False  # True while ops make host tensors (offload.to_host as fake() models it)
        # where the bytes are: each storage is labelled with `tag` as it was when the storage was made;
        # `by_tag` = live bytes per label now, `at_peak` = the same at the peak (and `where` = the tag then)
        self.tag, self.by_tag, self.at_peak, self.where = "weights", {}, {}, None

    def _count(self, key, n):  # n bytes of storage `key` start (n > 0) or stop (n < 0) counting
        self.live += n
        tag = self.sizes[key][1]
        self.by_tag[tag] = self.by_tag.get(tag, 0) + n
        if self.live > self.peak:
            self.peak, self.at_peak, self.where = self.live, dict(self.by_tag), self.tag

    def _add(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self.sizes:
            return
        self.sizes[key] = (st.nbytes(), self.tag)
        if self.hosting:  # made in host memory: never counted
            self.hosted.add(key)
        else:
            self._count(key, st.nbytes())
        weakref.finalize(st, self._free, key)

    def _free(self, key):
        if key not in self.sizes:
            return
        if key in self.hosted:
            self.hosted.discard(key)
        else:
            self._count(key, -self.sizes[key][0])
        self.sizes.pop(key)

    def host(self, tensors, on_host=True):
        for t in tensors:
            st = t.untyped_storage()
            key = st._cdata
            if key not in self.sizes:
                self._add(t)
            if on_host and key not in self.hosted:
                self.hosted.add(key)
                self._count(key, -self.sizes[key][0])
            elif not on_host and key in self.hosted:
                self.hosted.discard(key)
                self._count(key, self.sizes[key][0])

    def reset_peak(self):
        self.peak, self.at_peak, self.where = self.live, dict(self.by_tag), self.tag

    @contextlib.contextmanager
    def tagged(self, tag):
        old, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = old

    def breakdown(self):
        """'GiB by label at the peak' as one line, largest first."""
        parts = sorted(((v, k) for k, v in self.at_peak.items() if v), reverse=True)
        return f"peak in {self.where}: " + ", ".join(f"{k} {v / GiB:.2f}" for v, k in parts)

    def shard(self, groups, ranks, window=2):
        """Model FSDP2 per rank (fully_shard per block, reshard after forward and backward; not FSDP2's code,
        which needs a process group): each group's parameters (one DiT block's) count as a 1/ranks shard, and as
        a whole (the all-gathered copy) from the first op that reads one of them until `window` groups later -
        the block running and the one FSDP2 prefetches, in forward, in checkpointing's recompute and in backward."""
        self.owner, self.members, self.gathered, self.window = {}, [], [], window
        for i, params in enumerate(groups):
            self.host(params)
            self.members.append(params)
            for p in params:
                self.owner[p.untyped_storage()._cdata] = i
        with self.tagged("fsdp shards"):
            n = sum(p.untyped_storage().nbytes() for g in groups for p in g)
            self.shards = torch.empty(-(-n // ranks), dtype=torch.uint8)  # this rank's shards, flat

    def _gather(self, args, kwargs):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and (i := self.owner.get(t.untyped_storage()._cdata)) is not None \
                    and i not in self.gathered:
                self.gathered.append(i)
                self.host(self.members[i], on_host=False)  # counted under their own label, "weights"
                if len(self.gathered) > self.window:
                    self.host(self.members[self.gathered.pop(0)])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(self, "owner", None):
            self._gather(args, kwargs)
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        for t in outs:
            self._add(t)
        if self.count:
            packet = func._overloadpacket
            if packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:  # CPU SDPA: not registered
                self.flops += sdpa_flop_count(*(t.shape for t in args[:3]))
            elif packet in flop_registry:
                self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
            if not func.is_view and func.namespace != "prim":  # prim.device & co. read metadata only
                ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                self.moved += sum(t.numel() * t.element_size() for t in ins + outs)
        return out


# CUDA's autocast op lists (aten/src/ATen/autocast_mode.cpp, the CUDA part) for the ops our models call.
_LOW = {"linear", "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm", "einsum", "conv1d", "conv2d", "conv3d",
        "scaled_dot_product_attention"}
_FP32 = {"layer_norm", "group_norm", "exp", "log", "pow", "rsqrt", "softmax", "log_softmax", "mse_loss", "sum",
         "cumsum", "prod", "norm", "linalg_vector_norm", "expm1", "log1p", "reciprocal", "softplus"}
_WIDEST = {"cat", "stack", "addcmul", "addcdiv", "index_put"}


class CudaAutocast(TorchFunctionMode):
    """While CPU autocast is on (torch.autocast("cpu", bf16), as train.py opens it on our fake CPU device, and
    as torch.utils.checkpoint re-opens it when it recomputes), cast the floating inputs of each op the way
    CUDA's autocast does. The CPU's own lists agree on the matmuls and differ on the norms, which is what
    matters: on CUDA, LayerNorm of a bf16 input returns fp32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not torch.is_autocast_enabled("cpu") or name not in _LOW | _FP32 | _WIDEST:
            return func(*args, **kwargs)
        floats = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()
                  and t.dtype != torch.float64]
        if name in _LOW:
            dt = torch.bfloat16
        elif name in _FP32:
            if name in ("sum", "cumsum", "prod", "softmax", "log_softmax") and not any(
                    t.dtype in (torch.bfloat16, torch.float16) for t in floats):
                return func(*args, **kwargs)
            dt = torch.float32
        else:
            dt = max((t.dtype for t in floats), key=lambda d: torch.finfo(d).bits, default=None)
        if dt is None:
            return func(*args, **kwargs)
        cast = lambda t: t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
            else t
        with torch.autocast("cpu", enabled=False):  # CPU autocast would recast what we just cast
            return func(*tree_map(cast, args), **tree_map(cast, kwargs))


def on_host(fn):
    """fn run on real tensors: scalar host code whose result steers Python (timestep lists)."""
    @functools.wraps(fn)
    def run(*a, **k):
        with unset_fake_temporarily():
            return fn(*a, **k)
    return run


sample.trailing_timesteps = on_host(sample.trailing_timesteps)


@contextlib.contextmanager
def fake():
    """(FakeTensorMode, Tracker) with CUDA-style autocast; everything built inside counts. Function modes are
    not active when torch.utils.checkpoint recomputes in backward: its context_fn re-enters CudaAutocast. Our fake
    tensors are CPU tensors, on which offload's copies would be no-ops: here to_host makes a copy the tracker counts
    as host memory, and to_device one it counts."""
    ckpt, copies = torch.utils.checkpoint.checkpoint, (offload.to_host, offload.to_device)
    torch.utils.checkpoint.checkpoint = functools.partial(
        ckpt, context_fn=lambda: (contextlib.nullcontext(), CudaAutocast()))
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, CudaAutocast(), Tracker() as tr:
            def to_host(t):
                tr.hosting = True
                try:
                    return t.clone()
                finally:
                    tr.hosting = False
            offload.to_host, offload.to_device = to_host, lambda t, device: t.clone()
            yield mode, tr
    finally:
        torch.utils.checkpoint.checkpoint = ckpt
        offload.to_host, offload.to_device = copies


def materialise(module, dtype=None):
    """A module built on `meta` -> fake CPU weights (each counted by the tracker), cast like the loaders do."""
    for m in module.modules():
        for group in (m._parameters, m._buffers):
            for k, t in group.items():
                if t is not None:
                    new = torch.empty(t.shape, dtype=dtype if dtype and t.is_floating_point() else t.dtype)
                    group[k] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
    return module


def load_models(mdir, dtype, t5=True):
    """Fake frozen models from a model folder's config.json files, as model.load_dit / vae.load_vae /
    model.load_t5 build them (meta, then weights assigned), frozen and in eval mode."""
    mdir = Path(mdir)
    with torch.device("meta"):
        dit = model.DiT(model.DiTConfig.from_dict(model.read_config(mdir / "transformer")))
        vae = vae_lib.VAE(vae_lib.VAEConfig.from_dict(model.read_config(mdir / "vae")))
        enc = model.T5Encoder(model.T5Config.from_dict(model.read_config(mdir / "text_encoder"))) if t5 else None
    out = [materialise(m, dtype).eval().requires_grad_(False) if m is not None else None for m in (dit, vae, enc)]
    return out + [json.loads((mdir / "scheduler" / "scheduler_config.json").read_text())]


def tokenizer(texts, max_length=226):  # stands in for model.Tokenizer: ids only shape the text encoder's input
    return torch.zeros(len(texts), max_length, dtype=torch.long)


def sizes(dit, vae):
    c, s = dit.config, vae.spatial_compression
    return c.sample_frames, c.sample_height * s, c.sample_width * s


# ---------------------------------------------------------------------------------------------------------
# sample.py

@contextlib.contextmanager
def streamed(tr):
    """offload.BlockStream as the tracker sees it (on fake CPU tensors its copies move nothing): a block's tensors
    count from its fetch until its drop."""
    S = offload.BlockStream
    fetch, drop = S.fetch, S.drop

    def fetch_(s, i):
        new = i < len(s.tensors) and i not in s.ready
        fetch(s, i)
        if new:
            tr.host(s.tensors[i], on_host=False)

    def drop_(s, i):
        drop(s, i)
        tr.host(s.tensors[i])
    S.fetch, S.drop = fetch_, drop_
    try:
        yield
    finally:
        S.fetch, S.drop = fetch, drop


def sample_peaks(mdir, offload=False, tile_vae=False, ref=True, steps=2, dtype=torch.bfloat16, fp8=False):
    """{stage: peak GiB} of sample.Pipeline.generate (+ reference_lora) as sample.py runs them. offload: False,
    True (--offload) or "blocks" (--offload-blocks)."""
    with fake() as (_, tr), streamed(tr):
        dit, vae, t5, sched = load_models(mdir, dtype)
        if fp8:  # as sample.load
            linear.store_fp8(dit)
        v2l = hypernet.Video2LoRA(dit).eval() if ref else None  # fp32, stays on the device (sample.load)
        peaks = {}
        frozen = [dit, vae, t5]

        class Measured(sample.Pipeline):
            @contextlib.contextmanager
            def _stage(self, name, module=None):
                if self.offload:  # sample.Pipeline moves `module` to the device and the others to the host
                    for m in frozen:
                        tr.host(list(m.parameters()) + list(m.buffers()), m is not module)
                    for st in self.streams:  # except streamed blocks (offload.move): on the host until fetched
                        for i in range(len(st.tensors)):
                            st.drop(i)
                tr.reset_peak()
                # the moves are the host() calls above; module.to on fake CPU tensors would move nothing (and
                # cannot swap float8 parameters that the tracker watches)
                with super()._stage(name, None if self.offload else module):
                    yield
                peaks[name] = max(peaks.get(name, 0), tr.peak)

        pipe = Measured(dit, vae, t5, tokenizer, sched, v2l, "cpu", dtype, offload, tile_vae)
        if offload:
            for m in frozen:
                tr.host(list(m.parameters()) + list(m.buffers()))
        F_, H, W = sizes(dit, vae)
        image, video = torch.empty(3, H, W), torch.empty(F_, 3, H, W)
        tr.host([image, video])  # read from files into host memory
        lora = pipe.reference_lora(video) if ref else None
        pipe.generate(image, "a prompt", lora=lora, steps=steps)
        if ref:
            peaks["ref->lora"] = peaks.pop("ref->lora")
    return {k: v / GiB for k, v in peaks.items()}


# ---------------------------------------------------------------------------------------------------------
# train.py

def train_args(mdir, *flags):
    return train.p.parse_args(["--model", str(mdir), "--data", "-", "--out", "-", *flags])


def train_peaks(mdir, flags=(), steps=2, batch=1, dtype=torch.bfloat16, breakdown=None, ranks=8):
    """[peak GiB of each step] of train.py's step with these command-line flags: batch_inputs, step_loss,
    backward, gradient clipping, AdamW; the frozen models and the Video2LoRA set up as train.main does. A list
    given as `breakdown` gets each step's Tracker.breakdown() (bytes at the peak by the phase that made them).
    With --fsdp: one rank's peak out of `ranks` (the DiT's blocks sharded as Tracker.shard models it)."""
    args = train_args(mdir, *flags)
    cache = args.cache is not None
    with fake() as (_, tr):
        dit, vae, t5, sched = load_models(mdir, dtype, t5=True)
        if args.fp8_storage:  # as train.main, right after loading
            linear.store_fp8(dit)
        hcfg = hypernet.presets[args.hypernet]
        with tr.tagged("video2lora"):
            v2l = hypernet.Video2LoRA(dit, hcfg, a=args.a, b=args.b, r=args.r, layers=args.layers).train()  # fp32
        hooks = [m.register_forward_pre_hook(lambda *_, tag=tag: setattr(tr, "tag", tag))
                 for m, tag in ((v2l, "hypernet"), (dit, "dit"))]
        names = train.param_names(v2l)
        train.wrap(dit, argparse.Namespace(**dict(vars(args), fsdp=False)), dtype, v2l)
        if args.fsdp:  # train.wrap's fully_shard per block, modelled (Tracker.shard); DDP's gradient buckets
            tr.shard([list(b.parameters()) for b in dit.transformer_blocks], ranks)
            with tr.tagged("ddp buckets"):  # DistributedDataParallel(gradient_as_bucket_view=False) allocates
                buckets = torch.empty(sum(p.numel() for p in v2l.parameters()))  # one fp32 copy of the grads
        opt = train.optimizer(v2l, names, args)
        A = diffusion.alphas_cumprod(sched).float()
        memo = {}

        def embed(caption):  # train.main's embed without a cache: T5 once per caption, kept on the host
            if caption not in memo:
                with torch.no_grad():
                    memo[caption] = t5(tokenizer([caption]))[0]
                tr.host([memo[caption]])
            return memo[caption]
        empty = torch.empty(226, dit.config.text_embed_dim, dtype=dtype) if cache else embed("")
        if not args.eval_every:  # train.main embeds every caption up front, then drops T5
            tr.host(list(t5.parameters()) + list(t5.buffers()))
        batch_inputs = diffusion.batch_fn(args, vae, dit.config, A, "cache" if cache else None, embed, empty, "cpu",
                                      dtype)
        F_, H, W = sizes(dit, vae)
        C, s = vae.config.latent_channels, vae.spatial_compression
        lat = (C, (F_ - 1) // vae.temporal_compression + 1, H // s, W // s)
        amp = torch.autocast("cpu", torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
        peaks = []
        for step in range(steps):
            if cache:  # data.VideoPairs items with a cache
                items = [dict(n=i, first=torch.empty(3, H, W), text=torch.empty(226, dit.config.text_embed_dim,
                              dtype=dtype), video=dict(mean=torch.empty(lat, dtype=dtype),
                              logvar=torch.empty(lat, dtype=dtype)), ref=dict(mean=torch.empty(lat, dtype=dtype)))
                         for i in range(batch)]
            else:
                items = [dict(n=i, caption="a caption", video=torch.empty(F_, 3, H, W), ref=torch.empty(F_, 3, H, W))
                         for i in range(batch)]
            tr.host([t for it in items for t in tree_flatten(it)[0] if isinstance(t, torch.Tensor)])
            tr.reset_peak()
            tr.tag = "inputs"
            loss = train.step_loss(v2l, dit, batch_inputs(items), amp)  # as train.main's loop
            tr.tag = "backward"
            loss.backward()
            tr.tag = "clip+adamw"
            torch.nn.utils.clip_grad_norm_(v2l.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss, items
            peaks.append(tr.peak / GiB)
            if breakdown is not None:
                breakdown.append(tr.breakdown())
        for h in hooks:
            h.remove()
    return peaks


# ---------------------------------------------------------------------------------------------------------
# FLOPs and bytes of one DiT forward

def dit_cost(mdir, batch=2, lora=True, dtype=torch.bfloat16):
    """(TFLOP, GB moved, peak GiB) of one DiT forward as sample.py's denoising loop calls it (CFG batch 2)."""
    with fake() as (_, tr), torch.no_grad():
        dit, vae, _, _ = load_models(mdir, dtype, t5=False)
        F_, H, W = sizes(dit, vae)
        c, s = dit.config, vae.spatial_compression
        x = torch.empty(batch, (F_ - 1) // 4 + 1, c.in_channels, H // s, W // s, dtype=dtype)
        text = torch.empty(batch, 226, c.text_embed_dim, dtype=dtype)
        lo = hypernet.Video2LoRA(dit).eval()(torch.empty(1, x.shape[1], c.out_channels, *x.shape[3:])) if lora else None
        tr.reset_peak()
        tr.count = True
        dit(x, text, torch.full((batch,), 999), lora=lo)
    return tr.flops / 1e12, tr.moved / 1e9, tr.peak / GiB


# ---------------------------------------------------------------------------------------------------------
# dev only: the estimator on diffusers' modules, to compare with their real H100 allocations

H100 = {"DiT forward, CFG batch 2": 13.2, "peft LoRA r=1 (attn), checkpointing, fwd+bwd": 17.1,
        "VAE decode": 15.3, "VAE decode, tiled": 4.4, "VAE encode": 8.2, "VAE encode, tiled": 2.5}


def diffusers_peaks(mdir, dtype=torch.bfloat16):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from peft import LoraConfig
    mdir, out = Path(mdir), {}
    tcfg = model.read_config(mdir / "transformer")
    vcfg = model.read_config(mdir / "vae")
    ours = model.DiTConfig.from_dict(tcfg)
    F_, H, W = ours.sample_frames, ours.sample_height * 8, ours.sample_width * 8
    f = (F_ - 1) // 4 + 1
    rope = lambda: tuple(model.rope_3d(ours, f, H // 16, W // 16))

    def dit(lora=False):
        with torch.device("meta"):
            m = CogVideoXTransformer3DModel.from_config(tcfg)
            if lora:  # on meta: peft's module swaps cannot swap fake tensors
                m.add_adapter(LoraConfig(r=1, lora_alpha=1, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        # The adapters take the base layer's dtype, bf16: diffusers' add_adapter calls peft's
        # inject_adapter_in_model, whose LoraLayer.update_layer moves each adapter to its base layer's device and
        # dtype (peft/tuners/tuners_utils.py _move_adapter_to_device_of_base_layer; it skips meta layers, hence
        # the cast here). Only PeftModel upcasts adapters to fp32 (autocast_adapter_dtype), not this path.
        m = materialise(m, dtype).eval().requires_grad_(False)
        for n, p in m.named_parameters():
            p.requires_grad_(".lora_" in n)
        return m

    def inputs(b):
        return dict(hidden_states=torch.empty(b, f, ours.in_channels, H // 8, W // 8, dtype=dtype),
                    encoder_hidden_states=torch.empty(b, 226, ours.text_embed_dim, dtype=dtype),
                    timestep=torch.full((b,), 999), image_rotary_emb=rope(), return_dict=False)

    with fake() as (_, tr), torch.no_grad():
        m = dit()
        kw = inputs(2)
        tr.reset_peak()
        m(**kw)
        out["DiT forward, CFG batch 2"] = tr.peak / GiB
        print(out, flush=True)
    with fake() as (_, tr):
        m = dit(lora=True)
        m.enable_gradient_checkpointing()
        m.train()
        kw = inputs(1)
        tr.reset_peak()
        pred = m(**kw)[0]
        torch.nn.functional.mse_loss(pred.float(), torch.empty(pred.shape)).backward()
        out["peft LoRA r=1 (attn), checkpointing, fwd+bwd"] = tr.peak / GiB
        print(out, flush=True)
    for tiled in (False, True):
        with fake() as (_, tr), torch.no_grad():
            with torch.device("meta"):
                v = AutoencoderKLCogVideoX.from_config(vcfg)
            v = materialise(v, dtype).eval()
            if tiled:
                v.enable_tiling()
            z = torch.empty(1, 16, f, H // 8, W // 8, dtype=dtype)
            tr.reset_peak()
            v.decode(z)
            out["VAE decode" + ", tiled" * tiled] = tr.peak / GiB
            del z
            x = torch.empty(1, 3, F_, H, W, dtype=dtype)
            tr.reset_peak()
            v.encode(x)
            out["VAE encode" + ", tiled" * tiled] = tr.peak / GiB
    return out


# ---------------------------------------------------------------------------------------------------------

CC, FSDP = ("--checkpointing", "--cache", "-"), "per rank of 8 (modelled)"
TRAIN_ROWS = [("--checkpointing --cache", CC),
              ("--cache (no checkpointing)", ("--no-checkpointing", "--cache", "-")),
              ("--checkpointing, no cache", ("--checkpointing",)),
              ("no checkpointing, no cache", ("--no-checkpointing",)),
              ("--checkpointing --cache --fp8-storage", CC + ("--fp8-storage",)),
              (f"--checkpointing --cache --fsdp, {FSDP}", CC + ("--fsdp",)),
              ("--checkpointing --cache --offload-activations", CC + ("--offload-activations",)),
              ("--checkpointing --cache --fp8-storage --offload-activations",
               CC + ("--fp8-storage", "--offload-activations")),
              (f"--checkpointing --cache --fsdp --offload-activations, {FSDP}",
               CC + ("--fsdp", "--offload-activations"))]
STEP2 = (0, 4, 5, 6, 7, 8)  # rows also run for a second step (AdamW's state)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(OFFICIAL), help="model folder (config.json files are enough)")
    p.add_argument("--only", choices=("sample", "train", "flops"))
    p.add_argument("--steps", type=int, default=2, help="denoising steps run (the peak is per step)")
    p.add_argument("--row", type=int, choices=range(len(TRAIN_ROWS)), metavar=f"0-{len(TRAIN_ROWS) - 1}",
                   help="one train row")
    p.add_argument("--diffusers", action="store_true", help="dev: diffusers' modules instead of ours")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.diffusers:
        print("| diffusers 0.42.1, 5B-I2V 49x480x720 bf16 | estimated GiB | H100 GiB | error |\n|---|---|---|---|")
        for k, v in diffusers_peaks(args.model).items():
            print(f"| {k} | {v:.2f} | {H100[k]} | {100 * (v / H100[k] - 1):+.1f} % |", flush=True)
        print(f"\n({time.perf_counter() - t0:.0f} s)")
        return
    if args.only in (None, "flops"):
        tf, gb, pk = dit_cost(args.model)
        print(f"DiT forward, CFG batch 2 + LoRA: {tf:.1f} TFLOP, {gb:.1f} GB moved, peak {pk:.2f} GiB\n", flush=True)
    if args.only in (None, "sample"):
        print("| sample.py | text | image encode | denoise | decode | ref->lora | run |\n|---|---|---|---|---|---|---|")
        for flags in ((), ("--tile-vae",), ("--offload",), ("--offload", "--tile-vae"),
                      ("--offload", "--tile-vae", "--fp8-storage"), ("--offload-blocks", "--tile-vae")):
            off = "blocks" if "--offload-blocks" in flags else "--offload" in flags
            pk = sample_peaks(args.model, off, "--tile-vae" in flags, steps=args.steps, fp8="--fp8-storage" in flags)
            print(f"| {' '.join(flags) or '(default)'} | " + " | ".join(
                f"{pk[k]:.2f}" for k in ("text", "image encode", "denoise", "decode", "ref->lora")) +
                f" | {max(pk.values()):.2f} |", flush=True)
        print()
    if args.only in (None, "train"):
        print("| train.py, batch 1 | step 1 | step 2 |\n|---|---|---|")
        for i, (label, flags) in enumerate(TRAIN_ROWS):
            if args.row is None or args.row == i:
                where = []
                pk = train_peaks(args.model, flags, steps=2 if i in STEP2 else 1, breakdown=where) + ["-"]
                print(f"| {label} | " + " | ".join(f"{v:.2f}" if v != "-" else v for v in pk[:2]) + " |", flush=True)
                print("  " + where[-1], file=sys.stderr, flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} thread)")


if __name__ == "__main__":
    main()
