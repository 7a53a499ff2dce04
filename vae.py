"""CogVideoX 3-D causal VAE (`AutoencoderKLCogVideoX`, the `vae/` folder of every official
checkpoint) as plain modules whose names mirror the checkpoint keys (`encoder.*`, `decoder.*`).

Layout: `B C T H W` (channels before frames). `encode`: pixels in [-1, 1] -> (mean, logvar),
unscaled; `decode`: unscaled latents -> pixels. Scaling by `config.scaling_factor` is the caller's.
Numbers follow diffusers 0.42's models/autoencoders/autoencoder_kl_cogvideox.py: the video goes
through in temporal chunks whose causal-conv caches carry over and whose GroupNorm statistics are
per chunk, so the chunking is part of the model. Optional spatial tiling equals diffusers'
`enable_tiling()` path. Tests: python -m pytest -q tests/test_vae.py
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import check_and_load, config_from_dict, read_config, read_state_dict

# diffusers' frame batching (num_sample_frames_batch_size / num_latent_frames_batch_size): 8 pixel
# frames (2 latents) per chunk, the first absorbing the remainder (9 frames / 3 latents for 8k+1).
ENCODE_CHUNK, DECODE_CHUNK = 8, 2
# diffusers' tile overlap factors (height, width), tuned for 480x720.
TILE_OVERLAP = (1 / 6, 1 / 5)


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 256, 512)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    sample_height: int = 480  # tiles are half the sample size
    sample_width: int = 720
    scaling_factor: float = 0.7  # 5b / 5b-I2V / 1.5; CogVideoX-2b ships 1.15258426
    invert_scale_latents: bool = False  # 1.5-I2V: its pipeline scales the image latent by 1/sf
    # Keys that config.json carries; only these values are implemented.
    act_fn: str = "silu"
    down_block_types: tuple = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple = ("CogVideoXUpBlock3D",) * 4
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        n, tcr = len(self.block_out_channels), self.temporal_compression_ratio
        bad = []
        if self.act_fn not in ("silu", "swish"):
            bad.append(f"act_fn={self.act_fn!r} (only 'silu')")
        if self.down_block_types != ("CogVideoXDownBlock3D",) * n:
            bad.append(f"down_block_types={list(self.down_block_types)} "
                       f"(only {n}x 'CogVideoXDownBlock3D')")
        if self.up_block_types != ("CogVideoXUpBlock3D",) * n:
            bad.append(f"up_block_types={list(self.up_block_types)} "
                       f"(only {n}x 'CogVideoXUpBlock3D')")
        if self.use_quant_conv or self.use_post_quant_conv:
            bad.append("use_quant_conv/use_post_quant_conv=true (CogVideoX has neither)")
        levels = math.log2(tcr) if tcr >= 1 else -1
        if levels != int(levels) or not 0 <= levels < n:
            bad.append(f"temporal_compression_ratio={tcr} (a power of 2 below 2**{n})")
        groups = self.norm_num_groups
        odd = [c for c in self.block_out_channels if c % groups]
        if odd:
            bad.append(f"block_out_channels {odd} not divisible by norm_num_groups={groups}")
        if bad:
            raise ValueError("unsupported VAE config: " + "; ".join(bad))
        self.temporal_compression_ratio = int(self.temporal_compression_ratio)

    @classmethod
    def from_dict(cls, d, source="vae config"):
        # keys diffusers writes that the CogVideoX pipelines never read
        ignored = ("force_upcast", "shift_factor", "latents_mean", "latents_std")
        return config_from_dict(cls, d, ignored, source)


presets = {
    "cogvideox": VAEConfig(),
    "tiny": VAEConfig(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                      norm_num_groups=4, sample_height=64, sample_width=96),
}


# ------------------------------------------------------------------------------------------------
# Maths


def frame_chunks(n, size):
    """diffusers' temporal batching: max(n // size, 1) chunks of `size` frames, the first one taking
    the remainder too (49 frames -> [0,9), [9,17), ..., [41,49))."""
    r, count = n % size, max(n // size, 1)
    return [(0 if i == 0 else size * i + r, min(size * (i + 1) + r, n)) for i in range(count)]


def conv3d(conv, x):
    """diffusers' SafeConv3d: an input over 2 GiB (at 2 bytes/element) runs as time slices with k-1
    frames of overlap. The same maths, but smaller kernel workspaces and no int32 index overflow."""
    gib = x.numel() * 2 / 2**30
    if gib <= 2:
        return conv(x)
    k, T = conv.kernel_size[0], x.shape[2]
    step = max(-(-T // (int(gib / 2) + 1)), k)
    return torch.cat([conv(x[:, :, max(s - k + 1, 0):s + step]) for s in range(0, T, step)], dim=2)


def blend(a, b, extent, dim):
    """diffusers' tile seam blend, in place on `b`: its first rows fade in from `a`'s last rows. One
    row at a time with Python-float weights, so the rounding is the reference's in every dtype."""
    e = min(a.shape[dim], b.shape[dim], extent)
    for y in range(e):
        b.select(dim, y).copy_(a.select(dim, y - e) * (1 - y / e) + b.select(dim, y) * (y / e))


# ------------------------------------------------------------------------------------------------
# Building blocks. A `cache` dict travels through each chunked pass: CausalConv3d -> its last 2
# input frames. A fresh dict per call and per tile, so nothing leaks between calls.


class CausalConv3d(nn.Module):
    """k x k x k conv, causal in time: the input is prefixed by the previous chunk's last k-1
    (padded) frames, or at the start by k-1 copies of the first frame; zero padding in space."""

    def __init__(self, cin, cout, k=3):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, k, padding=(0, k // 2, k // 2))

    def forward(self, x, cache):
        k = self.conv.kernel_size[0]
        prev = cache.get(self)
        if prev is None:
            prev = x[:, :, :1].expand(-1, -1, k - 1, -1, -1)
        x = torch.cat([prev, x], dim=2)
        cache[self] = x[:, :, x.shape[2] - k + 1:].clone()  # clone: not the whole chunk kept alive
        return conv3d(self.conv, x)


class SpatialNorm3D(nn.Module):
    """Decoder norm conditioned on the latent chunk zq: GroupNorm(f) * conv_y(zq') + conv_b(zq'),
    zq' = zq resized (nearest) to f's size, frame 0 on its own when f has an odd frame count > 1."""

    def __init__(self, channels, zq_channels, groups):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6)  # diffusers: 1e-6, not norm_eps
        self.conv_y = CausalConv3d(zq_channels, channels, 1)
        self.conv_b = CausalConv3d(zq_channels, channels, 1)

    def forward(self, f, zq):
        B, C, T, H, W = f.shape
        h, w = zq.shape[3:]
        if T > 1 and T % 2 == 1:
            zq = torch.cat([zq[:, :, :1], F.interpolate(zq[:, :, 1:], size=(T - 1, h, w))], dim=2)
        else:
            zq = F.interpolate(zq, size=(T, h, w))
        # The spatial resize is an exact integer repeat (H = h * 2^k) and the 1x1x1 convs are
        # pointwise, so they run at latent resolution and broadcast: no full-size copies of y and b.
        y, b = self.conv_y.conv(zq), self.conv_b.conv(zq)  # [B,C,T,h,w]
        out = self.norm_layer(f)
        sh, sw = H // h, W // w
        o = out.view(B, C, T, h, sh, w, sw)  # [B,C,T,H,W] -> [B,C,T,h,sh,w,sw]
        o.mul_(y[:, :, :, :, None, :, None]).add_(b[:, :, :, :, None, :, None])
        return out


class ResnetBlock3D(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut. `zq_channels` set: decoder
    block, norms are SpatialNorm3D conditioned on the latent."""

    def __init__(self, cin, cout, groups, eps, zq_channels=None):
        super().__init__()
        if zq_channels is None:
            self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
            self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(cin, zq_channels, groups)
            self.norm2 = SpatialNorm3D(cout, zq_channels, groups)
        self.conv1 = CausalConv3d(cin, cout)
        self.conv2 = CausalConv3d(cout, cout)
        if cin != cout:
            self.conv_shortcut = nn.Conv3d(cin, cout, 1)  # not causal: no `.conv.` in its key

    def forward(self, x, cache, zq=None):
        h = self.norm1(x) if zq is None else self.norm1(x, zq)
        h = self.conv1(F.silu(h, inplace=True), cache)
        h = self.norm2(h) if zq is None else self.norm2(h, zq)
        h = self.conv2(F.silu(h, inplace=True), cache)
        return h.add_(conv3d(self.conv_shortcut, x) if hasattr(self, "conv_shortcut") else x)


class Downsample(nn.Module):
    """`compress_time`: average frame pairs (odd count: frame 0 stays alone). Then per frame:
    zero-pad right and bottom by 1, 3x3 conv with stride 2, into one output: no permuted copies."""

    def __init__(self, channels, compress_time):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)
        self.compress_time = compress_time

    def forward(self, x):
        T = x.shape[2]
        if self.compress_time and T > 1:
            src = [(0,)] * (T % 2) + [(t, t + 1) for t in range(T % 2, T, 2)]
        else:
            src = [(t,) for t in range(T)]
        out = None
        for i, s in enumerate(src):
            f = x[:, :, s[0]]
            if len(s) == 2:  # average in fp32, round once (diffusers' avg_pool1d accumulator)
                f = ((f.float() + x[:, :, s[1]]) / 2).to(x.dtype)
            o = self.conv(F.pad(f, (0, 1, 0, 1)))
            if out is None:
                out = o.new_empty(o.shape[0], o.shape[1], len(src), *o.shape[2:])
            out[:, :, i] = o
        return out


class Upsample(nn.Module):
    """Nearest x2 in space; `compress_time` also x2 in time (odd count > 1: frame 0 not repeated).
    Then a 3x3 conv per frame, straight into the output; a repeated frame reuses its conv result."""

    def __init__(self, channels, compress_time):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.compress_time = compress_time

    def forward(self, x):
        B, C, T, H, W = x.shape
        src = list(range(T))
        if self.compress_time and T > 1:
            src = src[:T % 2] + [t for t in src[T % 2:] for _ in (0, 1)]
        out = x.new_empty(B, self.conv.out_channels, len(src), 2 * H, 2 * W)
        for i, s in enumerate(src):
            if i > 0 and src[i - 1] == s:
                out[:, :, i] = out[:, :, i - 1]
            else:
                out[:, :, i] = self.conv(F.interpolate(x[:, :, s], scale_factor=2.0))
        return out


def _block(resnets, sampler_name=None, sampler=None):
    """Container mirroring the keys of `down_blocks.i` / `up_blocks.i` / `mid_block`."""
    m = nn.Module()
    m.resnets = nn.ModuleList(resnets)
    if sampler is not None:
        setattr(m, sampler_name, nn.ModuleList([sampler]))
    return m


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        levels = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            cins = [ch[max(i - 1, 0)] if j == 0 else c for j in range(cfg.layers_per_block)]
            res = [ResnetBlock3D(cin, c, g, eps) for cin in cins]
            down = Downsample(c, i < levels) if i < len(ch) - 1 else None
            self.down_blocks.append(_block(res, "downsamplers", down))
        self.mid_block = _block([ResnetBlock3D(ch[-1], ch[-1], g, eps) for _ in range(2)])
        self.norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)  # 1e-6 fixed in diffusers
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)

    def forward(self, x, cache):
        x = self.conv_in(x, cache)
        for blk in [*self.down_blocks, self.mid_block]:
            for r in blk.resnets:
                x = r(x, cache)
            if hasattr(blk, "downsamplers"):
                x = blk.downsamplers[0](x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True), cache)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, eps = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps
        zc = cfg.latent_channels
        levels = int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(zc, ch[0])
        self.mid_block = _block([ResnetBlock3D(ch[0], ch[0], g, eps, zc) for _ in range(2)])
        self.up_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            res = [ResnetBlock3D(ch[max(i - 1, 0)] if j == 0 else c, c, g, eps, zc)
                   for j in range(cfg.layers_per_block + 1)]
            up = Upsample(c, i < levels) if i < len(ch) - 1 else None
            self.up_blocks.append(_block(res, "upsamplers", up))
        self.norm_out = SpatialNorm3D(ch[-1], zc, g)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, z, cache):
        x = self.conv_in(z, cache)
        for blk in [self.mid_block, *self.up_blocks]:
            for r in blk.resnets:
                x = r(x, cache, z)
            if hasattr(blk, "upsamplers"):
                x = blk.upsamplers[0](x)
        return self.conv_out(F.silu(self.norm_out(x, z), inplace=True), cache)


# ------------------------------------------------------------------------------------------------
# The VAE


class VAE(nn.Module):
    """encode(x [B,3,F,H,W] in [-1,1]) -> (mean, logvar) [B,C,F',H/8,W/8], F' = (F-1)/4 + 1;
    decode(z [B,C,F',h,w]) -> [B,3,F,8h,8w], F = 4F'-3 for odd F' (4F' for even F', as diffusers).
    Inference only (the VAE is frozen): both run without autograd."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def spatial_compression(self):
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def temporal_compression(self):
        return self.config.temporal_compression_ratio

    def _tiles(self):
        """diffusers' tile geometry: (pixel tile, latent tile), as (height, width)."""
        s = self.spatial_compression
        px = (self.config.sample_height // 2, self.config.sample_width // 2)
        return px, (int(px[0] / s), int(px[1] / s))

    def _chunked(self, net, x, size):
        cache = {}
        chunks = frame_chunks(x.shape[2], size)
        return torch.cat([net(x[:, :, a:b], cache) for a, b in chunks], dim=2)

    def _tiled(self, net, x, size, tile_in, tile_out):
        """diffusers' tiled pass: overlapping tiles of `tile_in` in raster order, each with its own
        chunked pass, blended in place with the (blended, uncropped) tile above, then the one to the
        left, and cropped to `limit`. Only the previous row of tiles is kept."""
        sample = f"{self.config.sample_height}x{self.config.sample_width}"
        stride = [int(t * (1 - f)) for t, f in zip(tile_in, TILE_OVERLAP)]
        extent = [int(t * f) for t, f in zip(tile_out, TILE_OVERLAP)]
        limit = [t - e for t, e in zip(tile_out, extent)]
        if min(stride) < 1:
            raise ValueError(f"tiling needs tiles of >= 2 latents: sample_height/width = {sample} "
                             "in the VAE config is too small")
        rows, above = [], None
        for i in range(0, x.shape[3], stride[0]):
            row = []
            for j in range(0, x.shape[4], stride[1]):
                t = self._chunked(net, x[:, :, :, i:i + tile_in[0], j:j + tile_in[1]], size)
                if above is not None:
                    blend(above[len(row)], t, extent[0], 3)
                if row:
                    blend(row[-1], t, extent[1], 4)
                row.append(t)
            rows.append(torch.cat([t[:, :, :, :limit[0], :limit[1]] for t in row], dim=4))
            above = row
        out = torch.cat(rows, dim=3)
        want = [n * o // i for n, o, i in zip(x.shape[3:], tile_out, tile_in)]
        if list(out.shape[3:]) != want:  # diffusers returns such a wrong-size result silently
            raise ValueError(f"VAE tiling: the tiles of this config (sample {sample}) do not add "
                             f"up at this size ({list(out.shape[3:])} instead of {want}); run "
                             "without tiling")
        return out

    def _check(self, x, what, channels):
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"VAE.{what} takes [B,{channels},frames,H,W] (B C T H W layout); "
                             f"got {list(x.shape)}")

    @torch.no_grad()
    def encode(self, x, tile=False):
        self._check(x, "encode", self.config.in_channels)
        F_, H, W = x.shape[2:]
        tc, s = self.temporal_compression, self.spatial_compression
        if F_ < 1 or (F_ - 1) % tc:
            raise ValueError(f"VAE.encode takes 1 or {tc}k+1 frames (1, {tc + 1}, {2 * tc + 1}, "
                             f"..., 49, ...; 8k+1 is what the model was trained on); got {F_}")
        if H % s or W % s or H < s or W < s:
            raise ValueError(f"VAE.encode needs height and width that are positive multiples of "
                             f"{s}; got {H}x{W}")
        p = next(self.parameters())
        x = x.to(p.device, p.dtype)
        px, lat = self._tiles()
        if tile and (H > px[0] or W > px[1]):
            h = self._tiled(self.encoder, x, ENCODE_CHUNK, px, lat)
        else:
            h = self._chunked(self.encoder, x, ENCODE_CHUNK)
        c = self.config.latent_channels
        return h[:, :c], h[:, c:].clamp(-30.0, 20.0)

    @torch.no_grad()
    def decode(self, z, tile=False):
        self._check(z, "decode", self.config.latent_channels)
        if min(z.shape[2:]) < 1:
            raise ValueError(f"VAE.decode got an empty latent {list(z.shape)}")
        p = next(self.parameters())
        z = z.to(p.device, p.dtype)
        px, lat = self._tiles()
        if tile and (z.shape[3] > lat[0] or z.shape[4] > lat[1]):
            return self._tiled(self.decoder, z, DECODE_CHUNK, lat, px)
        return self._chunked(self.decoder, z, DECODE_CHUNK)


def load_vae(path, dtype=torch.float32, device="cpu"):
    """The official `vae/` folder (config.json, safetensors: one or sharded) -> VAE in eval mode."""
    cfg = VAEConfig.from_dict(read_config(path), f"{path}/config.json")
    with torch.device("meta"):
        vae = VAE(cfg)
    return check_and_load(vae, read_state_dict(path), dtype, device).eval().requires_grad_(False)
