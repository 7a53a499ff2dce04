"""Video2LoRA hypernetwork (paper §3.3): reference-video latents -> each adapted layer's LightLoRA
factors A_pred [r, a], B_pred [b, r]. Tests: tests/test_lora.py

Reference latents (DiT layout B F C H W, VAE mean or sample x scaling_factor; the caller encodes,
so they can be cached) are patchified like the DiT into video tokens with a fixed 3-D sin-cos
position. As in the paper's Fig. 2, one learned weight token per adapted layer joins them, and a
small pre-LN transformer runs on the joint sequence `iters` times with shared weights, each pass
adding a residual update to the weight tokens' state (eq. 4, state_0 = 0). Joint attention lets
video tokens match content across frames (where did it move?), which pooling them one by one
cannot. A head maps each weight token to its factors. Video2LoRA = hypernet + aux factors.
"""
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

import common
from lightlora import LightLoRA
from model import sincos_1d


@dataclass
class HyperNetConfig:
    in_channels: int = 16  # VAE latent channels; Video2LoRA takes it from the DiT (out_channels)
    patch_size: int = 2
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    iters: int = 4  # refinement passes k
    corr_radius: int = 4  # latent px around each pixel compared with the previous latent frame

    def __post_init__(self):
        if self.width % 16 or self.width % self.heads:
            raise ValueError(f"hypernet width {self.width} must be a multiple of 16 and of "
                             f"heads={self.heads}")


presets = {
    "default": HyperNetConfig(),
    "tiny": HyperNetConfig(in_channels=4, width=32, depth=2, heads=2, iters=2),
    # bench/toy.py's model: 128x128 frames, 16x16 latents; its pans move up to ~3 latent px per latent frame
    "toy": HyperNetConfig(width=64, depth=4, heads=4, corr_radius=3),
}


def patchify(x, p):
    """[B, F, C, H, W] -> [B, F*(H/p)*(W/p), C*p*p]: tokens (f, h, w), features (c, i, j) as DiT."""
    B, Fr, C, H, W = x.shape
    x = x.view(B, Fr, C, H // p, p, W // p, p)  # B F C h i w j
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, Fr * (H // p) * (W // p), C * p * p)


def correlation(x, R):
    """[B, F, C, H, W] -> [B, F, (2R+1)^2, H, W]: cosine similarity of each latent pixel of frame f
    with frame f-1's pixels up to R away (frame 0: itself), as FlowNet's correlation layer. On the
    latents alone, a linear probe told pans left from right at chance only (bench/RESULTS.md)."""
    B, Fr, C, H, W = x.shape
    x = F.normalize(x - x.mean((3, 4), keepdim=True), dim=2)  # texture, not the frame's mean colour
    prev = torch.cat([x[:, :1], x[:, :-1]], 1).flatten(0, 1)
    prev = F.pad(prev, (R, R, R, R))  # [B*F, C, H+2R, W+2R]
    win = F.unfold(prev, 2 * R + 1).view(B, Fr, C, (2 * R + 1) ** 2, H, W)  # every shift's pixels
    return (win * x[:, :, :, None]).sum(2)


def video_positions(f, h, w, dim, device=None):
    """Fixed table [f*h*w, dim], rows (f, h, w), columns time | height | width = dim/4 | 3dim/8 |
    3dim/8. Made for the actual grid: any reference length or size works; padding changes no row."""
    dt, dh = dim // 4, dim * 3 // 8
    t, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in (f, h, w)), indexing="ij")
    parts = ((dt, t), (dh, y), (dim - dt - dh, x))
    return torch.cat([sincos_1d(n, p.flatten()) for n, p in parts], 1)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.to_qkv, self.to_out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, mask=None):
        B, N, d = x.shape
        qkv = self.to_qkv(x).view(B, N, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(o.transpose(1, 2).reshape(B, N, d))


class Block(nn.Module):
    def __init__(self, d, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        hidden = mlp_ratio * d
        gelu = nn.GELU(approximate="tanh")
        self.mlp = nn.Sequential(nn.Linear(d, hidden), gelu, nn.Linear(hidden, d))

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class HyperNet(nn.Module):
    def __init__(self, cfg, n_layers, a=100, b=50, r=1):
        super().__init__()
        self.cfg, self.a, self.b, self.r, d = cfg, a, b, r, cfg.width
        n_in = cfg.in_channels + (2 * cfg.corr_radius + 1) ** 2  # latent + correlation channels
        self.patch_embed = nn.Linear(n_in * cfg.patch_size ** 2, d)
        self.video_norm = nn.LayerNorm(d)
        self.weight_tokens = nn.Parameter(torch.empty(n_layers, d))  # one per adapted layer
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.update_norm, self.update = nn.LayerNorm(d), nn.Linear(d, d)
        self.head_norm = nn.LayerNorm(d)
        self.head_A, self.head_B = nn.Linear(d, a * r), nn.Linear(d, b * r)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # The zero-init, argued here once: only head_B is zero, so B_pred = 0, dW = 0 exactly and
        # the DiT starts bit-identical to its base. Step 1 then gives only head_B a gradient, as
        # any exact dW = 0 would (for r = 1, B_pred A_pred = 0 needs a zero factor, zeroing the
        # other's and the trunk's gradients, as in plain LoRA); from step 2 all have one (see
        # tests/test_lora.py). ||A_pred|| ~ sqrt(r), so the LoRA's norm is scale * ||B_pred||.
        nn.init.normal_(self.weight_tokens, std=0.02)
        nn.init.normal_(self.head_A.weight, std=(self.cfg.width * self.a) ** -0.5)
        nn.init.zeros_(self.head_A.bias)
        nn.init.zeros_(self.head_B.weight)
        nn.init.zeros_(self.head_B.bias)

    def forward(self, latents, frames=None, iters=None):
        """latents [B, F, C, H, W]; frames [B]: valid latent frames per sample (the rest is padding)
        -> (A_pred [B, L, r, a], B_pred [B, L, b, r])."""
        cfg, p = self.cfg, self.cfg.patch_size
        if latents.ndim != 5 or latents.shape[2] != cfg.in_channels:
            raise ValueError(f"hypernet wants reference latents [B, F, {cfg.in_channels}, H, W] "
                             f"(DiT layout), got {tuple(latents.shape)}")
        B, Fr, _, H, W = latents.shape
        x = latents.to(self.patch_embed.weight.dtype)
        x = F.pad(x, (0, -W % p, 0, -H % p))  # odd latent sizes
        h, w = x.shape[-2] // p, x.shape[-1] // p
        pos = video_positions(Fr, h, w, cfg.width, x.device).to(x.dtype)
        x = torch.cat([x, correlation(x, cfg.corr_radius)], 2)  # [B, F, C + (2R+1)^2, H, W]
        video = self.video_norm(self.patch_embed(patchify(x, p)) + pos)  # [B, F*h*w, d]
        mask = None
        if frames is not None:  # padded frames are masked as keys; weight tokens always attend
            frames = torch.as_tensor(frames, device=x.device).view(B, 1)
            if (frames < 1).any() or (frames > Fr).any():
                raise ValueError(f"frames must lie in [1, {Fr}], got {frames.flatten().tolist()}")
            keep = torch.arange(Fr, device=x.device).repeat_interleave(h * w) < frames  # [B, F*h*w]
            keep = torch.cat([keep, keep.new_ones(B, self.weight_tokens.shape[0])], 1)
            mask = keep[:, None, None, :]
        n = video.shape[1]
        state = x.new_zeros(B, *self.weight_tokens.shape)
        for _ in range(cfg.iters if iters is None else iters):
            t = torch.cat([video, state + self.weight_tokens], 1)  # [B, F*h*w + L, d]
            for blk in self.blocks:
                t = blk(t, mask)
            state = state + self.update(self.update_norm(t[:, n:]))
        out, L = self.head_norm(state), state.shape[1]
        A_pred = self.head_A(out).view(B, L, self.r, self.a)
        return A_pred, self.head_B(out).view(B, L, self.b, self.r)


class Video2LoRA(nn.Module):
    """The trainable part, one module so DDP covers all of it: hypernet + LightLoRA aux factors."""

    def __init__(self, dit, hcfg="default", a=100, b=50, r=1, layers="attn", scale=1.0):
        super().__init__()
        hcfg = presets[hcfg] if isinstance(hcfg, str) else hcfg
        self.lora = LightLoRA(dit, a, b, r, layers, scale)
        hcfg = replace(hcfg, in_channels=dit.config.out_channels)
        self.hypernet = HyperNet(hcfg, self.lora.n_layers, a, b, r)

    def forward(self, latents, frames=None, scale=None, iters=None):
        return self.lora.fold(*self.hypernet(latents, frames, iters), scale)

    def count(self):
        return dict(self.lora.count(), hypernet=sum(p.numel() for p in self.hypernet.parameters()))

    def config(self):
        lo = self.lora
        return dict(hypernet=asdict(self.hypernet.cfg), a=lo.a, b=lo.b, r=lo.r, layers=lo.layers,
                    scale=lo.scale, names=lo.names, shapes=lo.shapes)


def save(path, v2l, opt=None, meta=None):
    """One safetensors file: weights under hypernet.* / lora.*, configs and layer names as JSON
    metadata "video2lora", `meta` as JSON "meta". With `opt` (AdamW over v2l's parameters): its
    state as optim.<parameter name>.<field> (for load_optimizer), the torch RNG as rng.torch."""
    sd = dict(v2l.state_dict())
    if opt is not None:
        name = {id(p): n for n, p in v2l.named_parameters()}
        names = [name[id(p)] for g in opt.param_groups for p in g["params"]]  # the state's indices
        for i, state in opt.state_dict()["state"].items():
            sd.update({f"optim.{names[i]}.{k}": v for k, v in state.items()})
        sd["rng.torch"] = torch.get_rng_state()  # unused by train.py (per-sample generators)
    md = {"video2lora": json.dumps(v2l.config()), "meta": json.dumps(meta or {})}
    common.save_safetensors(path, sd, md)


def load_optimizer(path, v2l, opt, device="cpu"):
    """Puts the AdamW state and RNG that save(..., opt) wrote into `opt` (over v2l's parameters)."""
    name = {id(p): n for n, p in v2l.named_parameters()}
    index = {name[id(p)]: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    state = {}
    with safe_open(str(path), "pt", device=str(device)) as fh:
        for key in fh.keys():
            if key.startswith("optim."):  # optim.<parameter name>.<field>
                n, field = key[6:].rsplit(".", 1)
                state.setdefault(index[n], {})[field] = fh.get_tensor(key)
        if "rng.torch" in fh.keys():
            torch.set_rng_state(fh.get_tensor("rng.torch").cpu())
    for s in state.values():
        s["step"] = s["step"].cpu()  # AdamW keeps its step count on the CPU
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class Unreadable(ValueError):
    """A checkpoint that is not a readable safetensors file (damaged, truncated, another format)."""


def load(path, dit, device="cpu"):
    """-> (Video2LoRA on device, meta); ValueError unless made for this DiT's adapted layers."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"Video2LoRA checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            md = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("hypernet.", "lora."))}
    except SafetensorError as e:
        raise Unreadable(f"{path}: not a readable checkpoint ({e})") from None
    if "video2lora" not in md:
        raise ValueError(f"{path} has no 'video2lora' metadata: not a Video2LoRA checkpoint")
    cfg = json.loads(md["video2lora"])
    with torch.device("meta"):  # no init work: every weight comes from the file (assign=True below)
        hcfg = HyperNetConfig(**cfg["hypernet"])
        v2l = Video2LoRA(dit, hcfg, cfg["a"], cfg["b"], cfg["r"], cfg["layers"], cfg["scale"])
    have, want = [tuple(s) for s in cfg["shapes"]], v2l.lora.shapes
    if cfg["names"] != v2l.lora.names or have != want:
        raise ValueError(f"{path} was trained for a DiT with {len(have)} adapted layers "
                         f"(layers={cfg['layers']!r}, shapes {sorted(set(have))}); this DiT has "
                         f"{len(want)} (shapes {sorted(set(want))})")
    try:
        v2l.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        msg = f"{path}: weights do not fit the model its own config describes: {e}"
        raise ValueError(msg) from None
    return v2l.to(device), json.loads(md.get("meta", "{}"))


def checkpoints(run):
    """train.py's complete checkpoints RUN/ckpt-<step>.safetensors, oldest first (save writes
    'ckpt-N.safetensors.tmp<pid>', then renames)."""
    found = []
    for f in Path(run).glob("ckpt-*.safetensors"):
        m = re.fullmatch(r"ckpt-(\d+)\.safetensors", f.name)
        if m:
            found.append((int(m[1]), f))
    return [f for _, f in sorted(found)]


def load_latest(run, dit, device="cpu", warn=print):
    """-> (Video2LoRA, meta, path) of the newest checkpoint in `run` that opens, or None if none. A
    damaged file (disk full) falls back to the one before; another model's checkpoint raises."""
    found = checkpoints(run)
    for path in reversed(found):
        try:
            return (*load(path, dit, device), path)
        except Unreadable as e:
            warn(f"warning: {e}; trying an older checkpoint")
    if found:
        raise ValueError(f"--resume: none of the {len(found)} checkpoints in {run} can be read")
    return None
