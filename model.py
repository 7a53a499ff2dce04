"""CogVideoX backbone: the DiT (every official variant), the T5 v1.1 text encoder, its tokenizer and
the loaders that read the official Hugging Face folders (`transformer/`, `text_encoder/`, `tokenizer/`).

Layout: DiT latents are `B F C H W` (frames before channels, as the diffusers pipelines hold them).
Numbers follow diffusers 0.42's models/transformers/cogvideox_transformer_3d.py and transformers 5's T5;
tests/test_model.py checks them on tiny random models:  python -m pytest -q tests/test_model.py
"""
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from linear import gelu_linear, lora_linear

# ----------------------------------------------------------------------------------------------------
# Loading (shared with vae.py): safetensors only, never pickle.

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _few(items, n=8):
    items = sorted(items)
    more = f", ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def read_config(folder):
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return json.loads(path.read_text())


def read_state_dict(folder, dtype=None, device="cpu"):
    """All tensors of a folder: one `*.safetensors` file, or the shards an `*.safetensors.index.json`
    names. Floating tensors are cast to `dtype` shard by shard, so at most one shard exists twice."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")

    def load(file):
        sd = load_file(file, device=str(device))
        return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in sd.items()}

    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{folder} holds several index files ({_few(p.name for p in indexes)}); keep one")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        sd = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{indexes[0]} names the shard {shard}, which is missing in {folder}")
            sd.update(load(folder / shard))
        absent = set(weight_map) - set(sd)
        if absent:
            raise ValueError(f"{indexes[0]} lists {len(absent)} keys absent from its shards: {_few(absent)}")
        return sd
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return load(files[0])
    if len(files) > 1:
        raise ValueError(f"{folder} holds several .safetensors files ({_few(p.name for p in files)}) "
                         "and no *.safetensors.index.json saying how they fit together")
    pickles = [p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} has only pickle checkpoints ({_few(pickles)}); we never unpickle (unsafe). "
                         "Convert them to safetensors, e.g. save_pretrained(..., safe_serialization=True)")
    raise FileNotFoundError(f"no .safetensors file in {folder}")


def check_and_load(module, sd, dtype=None, device=None):
    """Check `sd` against `module` (built on the meta device) key by key and shape by shape, then
    load it with assign=True so the weights are never materialised twice. Floating tensors are cast
    to `dtype`; everything goes to `device`."""
    want = module.state_dict()
    missing, unexpected = set(want) - set(sd), set(sd) - set(want)
    if missing or unexpected:
        msg = [f"checkpoint does not fit {type(module).__name__}:"]
        if missing:
            msg.append(f"{len(missing)} missing keys: {_few(missing)}")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
        raise ValueError(" ".join(msg))
    bad = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(v.shape)}"
           for k, v in want.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"shape mismatch in {len(bad)} keys: " + "; ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    for k in list(sd):  # replace entry by entry so at most one extra copy of a tensor exists
        v = sd[k]
        sd[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
    module.load_state_dict(sd, strict=True, assign=True)
    return module


# ----------------------------------------------------------------------------------------------------
# DiT config

@dataclass
class DiTConfig:
    """transformer/config.json; defaults are diffusers' defaults, so an omitted key means the same here."""
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    @property
    def inner_dim(self):
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_frames(self):  # sample_frames counts pixel frames
        return (self.sample_frames - 1) // self.temporal_compression_ratio + 1

    def __post_init__(self):
        wanted = dict(activation_fn="gelu-approximate", timestep_activation_fn="silu", patch_size=2,
                      flip_sin_to_cos=True, freq_shift=0, norm_elementwise_affine=True, attention_bias=True,
                      dropout=0.0)
        bad = [f"{k}={getattr(self, k)!r} (we support {v!r})" for k, v in wanted.items() if getattr(self, k) != v]
        if self.patch_size_t not in (None, 2):
            bad.append(f"patch_size_t={self.patch_size_t!r} (we support null or 2)")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            bad.append("learned positional embeddings without RoPE (no such checkpoint)")
        if self.ofs_embed_dim and self.ofs_embed_dim != self.time_embed_dim:
            bad.append(f"ofs_embed_dim={self.ofs_embed_dim} != time_embed_dim={self.time_embed_dim}")
        if self.attention_head_dim % 16 or self.inner_dim % 16:
            bad.append(f"attention_head_dim={self.attention_head_dim} (3-D RoPE/sin-cos splits need multiples of 16)")
        if bad:
            raise ValueError("unsupported CogVideoX transformer config: " + "; ".join(bad))

    @classmethod
    def from_dict(cls, d):
        return config_from_dict(cls, d, source="transformer config")


# Keys an official config.json carries that change nothing we build (bookkeeping of diffusers / transformers).
HUB_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "_commit_hash")


def config_from_dict(cls, d, ignored=(), source="config"):
    """A config dataclass from a config.json dict (model.py and vae.py alike). A key that is neither a field nor
    listed in `ignored` raises: a checkpoint with a feature we do not build must not load as something else."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(k for k in d if k not in names and k not in HUB_KEYS and k not in ignored)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} keys {unknown}")
    return cls(**{k: v for k, v in d.items() if k in names})


_5B = dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
presets = {  # DiTConfig's defaults are CogVideoX-2b's
    "2b": DiTConfig(),
    "5b": DiTConfig(**_5B),
    "5b-i2v": DiTConfig(**_5B, in_channels=32, use_learned_positional_embeddings=True),
    "1.5-5b": DiTConfig(**_5B, patch_size_t=2, patch_bias=False, sample_frames=81, sample_height=96,
                        sample_width=170),
    "1.5-5b-i2v": DiTConfig(**_5B, in_channels=32, patch_size_t=2, patch_bias=False, ofs_embed_dim=512,
                            sample_frames=81, sample_height=300, sample_width=300),
    # tests/conftest.py builds its diffusers model from this: latents [B, 3, 8, 8, 12]
    "tiny": DiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16,
                      text_embed_dim=32, num_layers=2, sample_width=12, sample_height=8, sample_frames=9,
                      use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
}


# ----------------------------------------------------------------------------------------------------
# DiT maths

def timestep_sinusoid(t, dim):
    """diffusers' Timesteps(flip_sin_to_cos=True, shift=0) in float32: [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=-1)


def sincos_1d(d, pos):
    omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64, device=pos.device) / (d / 2))
    a = pos.double()[:, None] * omega[None]
    return torch.cat([a.sin(), a.cos()], dim=-1)


def sincos_3d(dim, f, h, w, s_spatial, s_temporal, device=None):
    """CogVideoX-2b's fixed table [f*h*w, dim] (float64), tokens (f, h, w); channel blocks are
    temporal (dim/4) | width (3dim/8) | height (3dim/8), the order diffusers produces."""
    ds = 3 * dim // 4
    pt = torch.arange(f, dtype=torch.float32, device=device) / s_temporal
    ph = torch.arange(h, dtype=torch.float32, device=device) / s_spatial
    pw = torch.arange(w, dtype=torch.float32, device=device) / s_spatial
    et, eh, ew = sincos_1d(dim // 4, pt), sincos_1d(ds // 2, ph), sincos_1d(ds // 2, pw)
    return torch.cat([et[:, None, None].expand(f, h, w, -1), ew[None, None].expand(f, h, w, -1),
                      eh[None, :, None].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, dim)


def _rope_1d(d, pos):
    theta = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=pos.device) / d))
    a = torch.outer(pos, theta)
    return a.cos().repeat_interleave(2, dim=1), a.sin().repeat_interleave(2, dim=1)


def rope_3d(cfg, f, h, w, device=None):
    """(cos, sin), each [f*h*w, head_dim] float32, for a latent patch grid f x h x w (diffusers' embeddings.py
    get_3d_rotary_pos_embed). 1.0 models place the grid on the sample_height/width grid by diffusers'
    resize-crop + linspace; 1.5 models use plain integer positions up to sample_height/width // 2."""
    p, hd = cfg.patch_size, cfg.attention_head_dim
    bh, bw = cfg.sample_height // p, cfg.sample_width // p
    if cfg.patch_size_t is None:
        if h / w > bh / bw:
            rh, rw = bh, int(round(bh / h * w))
        else:
            rw, rh = bw, int(round(bw / w * h))
        top, left = int(round((bh - rh) / 2.0)), int(round((bw - rw) / 2.0))
        lin = lambda a, b, n: torch.linspace(a, b, n, dtype=torch.float32, device=device)
        pos_h, pos_w = lin(top, (top + rh) * (h - 1) / h, h), lin(left, (left + rw) * (w - 1) / w, w)
        pos_t = lin(0, f * (f - 1) / f, f)
    else:
        if h > bh or w > bw:
            raise ValueError(f"latent patch grid {h}x{w} exceeds this checkpoint's RoPE grid {bh}x{bw} "
                             f"(config sample_height/width {cfg.sample_height}/{cfg.sample_width}): use latents "
                             f"of at most {bh * p}x{bw * p} (pixels {bh * p * 8}x{bw * p * 8})")
        pos_t, pos_h, pos_w = (torch.arange(n, dtype=torch.float32, device=device) for n in (f, h, w))
    (ct, st), (ch, sh), (cw, sw) = _rope_1d(hd // 4, pos_t), _rope_1d(hd // 8 * 3, pos_h), _rope_1d(hd // 8 * 3, pos_w)
    grid = lambda t_, h_, w_: torch.cat([t_[:, None, None].expand(f, h, w, -1), h_[None, :, None].expand(f, h, w, -1),
                                         w_[None, None].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, hd)
    return grid(ct, ch, cw), grid(st, sh, sw)


def apply_rope(x, cos, sin):
    """x [B, N, heads, hd]; cos/sin [N, 1, hd] fp32. Pairs (2j, 2j+1) rotate; done in fp32 and cast
    back like diffusers' apply_rotary_emb. In place on our own fp32 copy, with diffusers' rounding (x*cos and
    rot*sin each rounded, then summed): two fp32 temporaries instead of five."""
    xf = x.to(torch.float32, copy=True)
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-x2, x1], dim=-1).flatten(-2).mul_(sin)
    return xf.mul_(cos).add_(rot).to(x.dtype)


def rope_(x, cos, sin, L, chunk=4096):
    """x[:, L:] = apply_rope(x[:, L:], cos, sin), in place, `chunk` tokens at a time: the same elementwise maths,
    but apply_rope's fp32 temporaries (2.5x the rotated part in fp32) exist for one chunk only (at 5B-I2V with CFG
    1.0 GiB for all 17 550 video tokens at once, more than any other activation of a block in inference)."""
    for s in range(0, x.shape[1] - L, chunk):
        x[:, L + s:L + s + chunk] = apply_rope(x[:, L + s:L + s + chunk], cos[s:s + chunk], sin[s:s + chunk])


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def attention(q, k, v, L=None):
    """Joint attention over [B, S, heads, hd] (L text tokens first; unused here). The transposes are views."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# DiT modules (attribute names = checkpoint keys)

def _holder(**children):  # a plain container, only there to give children their checkpoint names
    m = nn.Module()
    for k, v in children.items():
        setattr(m, k, v)
    return m


class TimestepMLP(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, p = cfg.inner_dim, cfg.patch_size
        if cfg.patch_size_t is None:  # 1.0: per-frame conv
            self.proj = nn.Conv2d(cfg.in_channels, D, p, stride=p, bias=cfg.patch_bias)
        else:  # 1.5: linear over (c, t, h, w) patches; has a bias whatever patch_bias says
            self.proj = nn.Linear(cfg.in_channels * cfg.patch_size_t * p * p, D)
        self.text_proj = nn.Linear(cfg.text_embed_dim, D)
        if cfg.use_learned_positional_embeddings:
            n = cfg.latent_frames * (cfg.sample_height // p) * (cfg.sample_width // p)
            self.register_buffer("pos_embedding", torch.zeros(1, cfg.max_text_seq_length + n, D))

    def forward(self, x):  # x [B, F, C, H, W] -> [B, N, D], tokens (f, h, w)
        B, Fr, C, H, W = x.shape
        if isinstance(self.proj, nn.Conv2d):
            y = self.proj(x.reshape(B * Fr, C, H, W))  # [B*F, D, H/2, W/2]
            return y.flatten(2).transpose(1, 2).reshape(B, -1, y.shape[1])
        x = x.view(B, Fr // 2, 2, C, H // 2, 2, W // 2, 2)  # [B, F/2, o, C, H/2, i, W/2, j]
        x = x.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(B, -1, C * 8)  # features (c, o, i, j)
        return self.proj(x)


class AdaNorm(nn.Module):  # norm1 / norm2: LayerNorm + a Linear giving 6 modulation vectors
    def __init__(self, cfg, n):
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, n * cfg.inner_dim)
        self.norm = nn.LayerNorm(cfg.inner_dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, hd = cfg.inner_dim, cfg.attention_head_dim
        self.norm_q, self.norm_k = nn.LayerNorm(hd, eps=1e-6), nn.LayerNorm(hd, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])


# A block's Linears by their names inside it (the keys of its lora dict); attention's are what --layers attn adapts.
BLOCK_LINEARS = ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm2.linear",
                 "ff.net.0.proj", "ff.net.2")
ATTN_LINEARS = BLOCK_LINEARS[1:5]


class Block(nn.Module):
    def __init__(self, cfg, prefix):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.norm1, self.attn1 = AdaNorm(cfg, 6), Attention(cfg)
        # ff.net.0.proj -> GELU(tanh) -> ff.net.2 (net.1 is a dropout in diffusers)
        D = cfg.inner_dim
        self.norm2 = AdaNorm(cfg, 6)
        self.ff = _holder(net=nn.ModuleList([_holder(proj=nn.Linear(D, 4 * D)), nn.Identity(), nn.Linear(4 * D, D)]))
        self.names = {k: prefix + k for k in BLOCK_LINEARS}  # full Linear names, the keys of the lora dict

    def forward(self, x, c, temb, rope, lora=None, attend=None):
        """x video [B, N, D], c text [B, L, D], temb = SiLU(time embedding) [B, E]. lora: this block's factors
        keyed by the short names ("attn1.to_q"), so every block runs the same code with the same guards and one
        compiled graph serves them all (fast.py). attend(q, k, v, L) -> o, all [B, S, heads, hd] with the L text
        tokens first: joint attention; fast.py swaps in a sequence-parallel one."""
        ab = (lambda k: None) if lora is None else lora.get
        B, L, D = c.shape
        a = self.attn1
        sh, sc, g, csh, csc, cg = lora_linear(self.norm1.linear, temb, ab("norm1.linear")).chunk(6, dim=1)
        h = torch.cat([modulate(self.norm1.norm(c), csh, csc), modulate(self.norm1.norm(x), sh, sc)], dim=1)
        S = h.shape[1]
        # per-head LayerNorm and RoPE act on [B, S, heads, hd]; the transpose for SDPA is a view
        q = a.norm_q(lora_linear(a.to_q, h, ab("attn1.to_q")).view(B, S, self.heads, -1))
        k = a.norm_k(lora_linear(a.to_k, h, ab("attn1.to_k")).view(B, S, self.heads, -1))
        v = lora_linear(a.to_v, h, ab("attn1.to_v")).view(B, S, self.heads, -1)
        del h  # the dels free each activation once read (in inference; autograd keeps what backward needs)
        if rope is not None:  # video tokens only; in place, as LayerNorm's backward keeps its input, not output
            rope_(q, *rope, L)
            rope_(k, *rope, L)
        o = (attend or attention)(q, k, v, L)
        del q, k, v
        o = lora_linear(a.to_out[0], o.reshape(B, S, D), ab("attn1.to_out.0"))
        x = x + g[:, None] * o[:, L:]
        c = c + cg[:, None] * o[:, :L]
        del o

        sh, sc, g, csh, csc, cg = lora_linear(self.norm2.linear, temb, ab("norm2.linear")).chunk(6, dim=1)
        h = torch.cat([modulate(self.norm2.norm(c), csh, csc), modulate(self.norm2.norm(x), sh, sc)], dim=1)
        h = lora_linear(self.ff.net[0].proj, h, ab("ff.net.0.proj"))  # [B, S, 4D], the block's largest
        h = gelu_linear(self.ff.net[2], h, ab("ff.net.2"))
        return x + g[:, None] * h[:, L:], c + cg[:, None] * h[:, :L]


class DiT(nn.Module):
    """CogVideoXTransformer3DModel: forward(x [B,F,C,H,W], text [B,L,D_text], t [B], ofs=None, lora=None)
    -> v-prediction [B,F,out_channels,H,W]. `ofs` (1.5-I2V only) defaults to 2.0 like the pipeline.
    `lora` = {full Linear name: (down [B|1, d_in, r], up [B|1, r, d_out])}, see lora_linear.
    Deviation from diffusers: the 5b-I2V learned positional table serves only its own size; diffusers
    silently switches to a sin-cos table at other frame counts, we raise instead."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        D = cfg.inner_dim
        self.patch_embed = PatchEmbed(cfg)
        self.time_embedding = TimestepMLP(D, cfg.time_embed_dim)
        if cfg.ofs_embed_dim:
            self.ofs_embedding = TimestepMLP(cfg.ofs_embed_dim, cfg.ofs_embed_dim)
        self.transformer_blocks = nn.ModuleList(Block(cfg, f"transformer_blocks.{i}.") for i in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.norm_out = AdaNorm(cfg, 2)
        self.proj_out = nn.Linear(D, cfg.out_channels * cfg.patch_size ** 2 * (cfg.patch_size_t or 1))
        self.lora_names = frozenset(n for b in self.transformer_blocks for n in b.names.values())

    def _check(self, x, text):
        cfg, p = self.config, self.config.patch_size
        if x.dim() != 5 or x.shape[2] != cfg.in_channels or x.shape[3] % p or x.shape[4] % p:
            raise ValueError(f"DiT wants latents [B, F, {cfg.in_channels}, H, W] with H, W multiples of {p}; "
                             f"got {list(x.shape)}")
        if text.dim() != 3 or text.shape[-1] != cfg.text_embed_dim:
            raise ValueError(f"DiT wants text embeddings [B, L, {cfg.text_embed_dim}]; got {list(text.shape)}")
        if cfg.patch_size_t and x.shape[1] % cfg.patch_size_t:
            raise ValueError(f"CogVideoX 1.5 needs an even number of latent frames (patch_size_t=2); got "
                             f"{x.shape[1]}. The diffusers pipeline pads one latent frame in front and drops it after.")
        if not cfg.use_rotary_positional_embeddings or cfg.use_learned_positional_embeddings:
            if text.shape[1] != cfg.max_text_seq_length:  # the absolute table has that many text rows
                raise ValueError(f"this model's positional table needs exactly {cfg.max_text_seq_length} text tokens; "
                                 f"got {text.shape[1]}")
        if cfg.use_learned_positional_embeddings and tuple(x.shape[1:2] + x.shape[3:]) != (
                cfg.latent_frames, cfg.sample_height, cfg.sample_width):
            # diffusers silently swaps in the sin-cos table at other frame counts (garbage, CogVideo #517)
            raise ValueError(
                f"this checkpoint's learned positional embedding only serves latents of F x H x W = "
                f"{cfg.latent_frames} x {cfg.sample_height} x {cfg.sample_width} ({cfg.sample_frames} frames at "
                f"{cfg.sample_height * 8}x{cfg.sample_width * 8} pixels); "
                f"got {x.shape[1]} x {x.shape[3]} x {x.shape[4]}")

    def forward(self, x, text, t, ofs=None, lora=None):
        v, c, temb, rope = self.embed(x, text, t, ofs, lora)
        for block, lo in zip(self.transformer_blocks, self.block_loras(lora)):
            v, c = block(v, c, temb, rope, lo)
        return self.unpatchify(self.head(v, temb), x.shape)

    # forward in three parts, so fast.py can run the blocks its own way (step cache, sequence parallel)

    def block_loras(self, lora):
        """The lora dict split per block, keyed by the names inside the block ([None] * blocks if no lora)."""
        if not lora:
            return [None] * len(self.transformer_blocks)
        if not self.lora_names.issuperset(lora):
            raise ValueError(f"lora names no Linear of this DiT: {_few(set(lora) - self.lora_names)} "
                             f"(keys look like 'transformer_blocks.0.attn1.to_q')")
        return [{k: lora[n] for k, n in b.names.items() if n in lora} for b in self.transformer_blocks]

    def embed(self, x, text, t, ofs=None, lora=None):
        """-> video tokens v [B, N, D], text tokens c [B, L, D], SiLU(temb) [B, E], rope (cos, sin) [N, 1, hd] | None."""
        self._check(x, text)
        self.block_loras(lora)  # check the names before any work
        cfg, p = self.config, self.config.patch_size
        B, Fr, _, H, W = x.shape
        dt = x.dtype
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        temb = self.time_embedding(timestep_sinusoid(t, cfg.inner_dim).to(dt))
        if cfg.ofs_embed_dim:
            ofs = torch.full((1,), 2.0, device=x.device) if ofs is None else torch.as_tensor(ofs, device=x.device)
            temb = temb + self.ofs_embedding(timestep_sinusoid(ofs.reshape(-1), cfg.ofs_embed_dim).to(dt))
        temb = F.silu(temb)  # every consumer (norm1/norm2/norm_out) applies SiLU first

        c, v = self.patch_embed.text_proj(text), self.patch_embed(x)
        f, h, w = Fr // (cfg.patch_size_t or 1), H // p, W // p
        L = c.shape[1]
        if cfg.use_learned_positional_embeddings:
            pe = self.patch_embed.pos_embedding.to(dt)
            c, v = c + pe[:, :L], v + pe[:, L:]
        elif not cfg.use_rotary_positional_embeddings:
            v = v + sincos_3d(cfg.inner_dim, f, h, w, cfg.spatial_interpolation_scale,
                              cfg.temporal_interpolation_scale, x.device).to(dt)
        rope = None
        if cfg.use_rotary_positional_embeddings:
            rope = tuple(r[:, None] for r in rope_3d(cfg, f, h, w, x.device))  # [N, 1, hd]
        return v, c, temb, rope

    def head(self, v, temb):
        """Final norm + projection: video tokens [B, N, D] -> patches [B, N, p*p*C] (unpatchify makes latents)."""
        shift, scale = self.norm_out.linear(temb).chunk(2, dim=1)  # shift first (diffusers' AdaLayerNorm)
        return self.proj_out(modulate(self.norm_out.norm(self.norm_final(v)), shift, scale))

    def unpatchify(self, v, shape):
        """Patches [B, N, p*p*C] -> v-prediction [B, F, out_channels, H, W]; shape = the input's (B, F, C, H, W)."""
        cfg, p = self.config, self.config.patch_size
        B, Fr, _, H, W = shape
        C, f, h, w = cfg.out_channels, Fr // (cfg.patch_size_t or 1), H // p, W // p
        if cfg.patch_size_t is None:
            v = v.reshape(B, Fr, h, w, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)  # [B, F, C, h, i, w, j]
        else:
            v = v.reshape(B, f, h, w, C, 2, p, p).permute(0, 1, 5, 4, 2, 6, 3, 7)  # [B, f, o, C, h, i, w, j]
        return v.reshape(B, Fr, C, H, W)


def load_dit(path, dtype=torch.float32, device="cpu"):
    """Frozen DiT (eval, requires_grad False) from an official `transformer/` folder."""
    cfg = DiTConfig.from_dict(read_config(path))
    with torch.device("meta"):
        dit = DiT(cfg)
    return check_and_load(dit, read_state_dict(path, dtype, device), dtype, device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# T5 v1.1 encoder (text_encoder/): pre-norm RMSNorm blocks, relative position bias from block 0
# shared by all layers, gated-GELU FFN, unscaled attention, no mask (the pipelines pass none).

@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"unsupported T5 config: feed_forward_proj={self.feed_forward_proj!r} "
                             "(we support the T5 v1.1 'gated-gelu')")

    # transformers' config.json keys (T5's and PretrainedConfig's) for what we do not build: the decoder, dropout,
    # heads; dense_act_fn / is_gated_act restate feed_forward_proj="gated-gelu", checked above.
    IGNORED = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "is_encoder_decoder",
               "is_decoder", "num_decoder_layers", "decoder_start_token_id", "dropout_rate", "classifier_dropout",
               "initializer_factor", "dense_act_fn", "is_gated_act", "tie_word_embeddings", "use_cache",
               "output_past", "n_positions", "pad_token_id", "eos_token_id", "bos_token_id", "scale_decoder_outputs",
               "chunk_size_feed_forward", "id2label", "label2id", "output_attentions", "output_hidden_states",
               "problem_type", "return_dict", "task_specific_params", "gradient_checkpointing")

    @classmethod
    def from_dict(cls, d):
        return config_from_dict(cls, d, cls.IGNORED, "text_encoder config")


def t5_buckets(n, num_buckets=32, max_distance=128, device=None):
    """Bidirectional relative-position bucket [n, n] of key j seen from query i (mesh-tensorflow's)."""
    pos = torch.arange(n, device=device)
    rel = pos[None] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far.clamp(max=half - 1))


class RMSNorm(nn.Module):  # T5LayerNorm
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x.to(self.weight.dtype) if self.weight.dtype in (torch.float16, torch.bfloat16) else x)


class T5Attention(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)


class T5Block(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        lin = lambda a, b: nn.Linear(a, b, bias=False)
        ffn = _holder(wi_0=lin(cfg.d_model, cfg.d_ff), wi_1=lin(cfg.d_model, cfg.d_ff), wo=lin(cfg.d_ff, cfg.d_model))
        self.layer = nn.ModuleList([
            _holder(SelfAttention=T5Attention(cfg, has_bias), layer_norm=RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)),
            _holder(DenseReluDense=ffn, layer_norm=RMSNorm(cfg.d_model, cfg.layer_norm_epsilon))])

    def forward(self, x, bias, heads):
        B, L, _ = x.shape
        a = self.layer[0].SelfAttention
        h = self.layer[0].layer_norm(x)
        q, k, v = (lin(h).view(B, L, heads, -1).transpose(1, 2) for lin in (a.q, a.k, a.v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/sqrt(d)
        x = _fp16_guard(x + a.o(o.transpose(1, 2).reshape(B, L, -1)))
        ff = self.layer[1].DenseReluDense
        h = self.layer[1].layer_norm(x)
        g = gelu_new(ff.wi_0(h)) * ff.wi_1(h)
        return _fp16_guard(x + ff.wo(g.to(ff.wo.weight.dtype)))  # wo may be kept in fp32 (fp16 loads)


def gelu_new(u):  # written out like transformers: F.gelu(approximate="tanh") rounds differently in bf16
    return 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * torch.pow(u, 3.0))))


def _fp16_guard(x):  # transformers clamps fp16 activations that overflowed
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    return x.clamp(-big + 1000, big - 1000) if torch.isinf(x).any() else x


class T5Encoder(nn.Module):
    """T5EncoderModel: ids [B, L] -> last_hidden_state [B, L, d_model]."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = _holder(block=nn.ModuleList(T5Block(cfg, i == 0) for i in range(cfg.num_layers)),
                               final_layer_norm=RMSNorm(cfg.d_model, cfg.layer_norm_epsilon))

    def forward(self, ids):
        cfg = self.config
        x = self.shared(ids)
        buckets = t5_buckets(ids.shape[1], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                             ids.device)
        rel = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = rel(buckets).permute(2, 0, 1)[None]  # [1, heads, L, L], computed once, used by every layer
        for blk in self.encoder.block:
            x = blk(x, bias, cfg.num_heads)
        return self.encoder.final_layer_norm(x)


def load_t5(path, dtype=torch.float32, device="cpu"):
    """T5Encoder from an official `text_encoder/` folder. In fp16 the FFN output projections (wo) stay
    fp32 like transformers' _keep_in_fp32_modules (the 2b pipeline runs T5 in fp16)."""
    cfg = T5Config.from_dict(read_config(path))
    sd = read_state_dict(path, None if dtype == torch.float16 else dtype, device)
    tied = sd.pop("encoder.embed_tokens.weight", None)  # some exports carry this tied copy of shared.weight
    if "shared.weight" not in sd and tied is not None:
        sd["shared.weight"] = tied
    for k, v in sd.items():
        keep = dtype == torch.float16 and k.endswith("DenseReluDense.wo.weight")
        sd[k] = v.to(device=device, dtype=torch.float32 if keep else dtype)
    with torch.device("meta"):
        t5 = T5Encoder(cfg)
    return check_and_load(t5, sd).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Tokenizer (tokenizer/spiece.model, or tokenizer.json), ids identical to transformers' T5Tokenizer(padding=
# "max_length", truncation=True): literal special tokens first, sentencepiece on the text between them (each
# piece gets its own dummy "▁" prefix), truncate to max_length-1, EOS (1), pad with 0.


class Tokenizer:
    def __init__(self, path):
        path, self.tj = Path(path), None
        if (path / "spiece.model").is_file():  # the official folder
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor(model_file=str(path / "spiece.model"))
            cfg = path / "tokenizer_config.json"
            n_extra = json.loads(cfg.read_text()).get("extra_ids", 100) if cfg.is_file() else 100
            n = self.sp.get_piece_size()
            self.special = {"<pad>": 0, "</s>": 1, "<unk>": 2}
            self.special.update({f"<extra_id_{i}>": n + n_extra - 1 - i for i in range(n_extra)})  # T5's sentinels
            alts = sorted(self.special, key=len, reverse=True)
            self.split = re.compile("(" + "|".join(re.escape(s) for s in alts) + ")").split
        elif (path / "tokenizer.json").is_file():
            # Folders saved by transformers >= 5 hold only tokenizer.json (the sentencepiece model converted to a
            # Unigram model + normalizer + pre-tokenizer + added tokens); the `tokenizers` package runs it as
            # transformers' T5Tokenizer does. Truncation, EOS and padding stay ours (__call__).
            from tokenizers import Tokenizer as JsonTokenizer
            self.tj = JsonTokenizer.from_file(str(path / "tokenizer.json"))
            self.tj.no_truncation()
            self.tj.no_padding()
        else:
            raise FileNotFoundError(f"no spiece.model or tokenizer.json in {path}")

    def encode(self, text):
        if self.tj is not None:  # its added tokens (<pad>, </s>, <extra_id_N>) are matched before the model runs
            return self.tj.encode(text, add_special_tokens=False).ids  # no post-processor: EOS is __call__'s
        ids = []
        for i, part in enumerate(self.split(text)):  # odd positions are the special tokens
            ids += [self.special[part]] if i % 2 else (self.sp.encode(part) if part else [])
        return ids

    def __call__(self, texts, max_length=226):
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), max_length, dtype=torch.long)  # 0 = <pad>
        for b, text in enumerate(texts):
            ids = self.encode(text)[:max_length - 1] + [1]  # 1 = </s>
            out[b, :len(ids)] = torch.tensor(ids)
        return out
