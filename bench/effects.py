"""Synthetic semantic-effects generator: procedural still images, 21 parametrised effects that turn
an image into a clip, a dataset writer in the training layout, and motion/quality measurements.

    python bench/effects.py list
    python bench/effects.py image --seed 3 --out img.png
    python bench/effects.py clip zoom_in --seed 1 --image-seed 3 --out ref.mp4   # or --image any.png
    python bench/effects.py dataset --out data/fx --n 20 [--heldout] [--split test]

Clips are [F,3,H,W] in [0,1] (frames first, like the DiT's B F C H W). Every effect is a deterministic
function of (image, category, params, frames): the .json written beside each clip is its exact
ground truth (`ground_truth(meta, image)` re-renders it, also on another image). Every effect is the
identity at t=0 and frame 0 is a copy of the image, so frame 0 == image exactly (bit for bit).
Effects are defined over normalised time t in [0,1], so the frame count only changes the sampling.
Geometry works in a "unit frame": y in [-1,1] top to bottom, x in [-W/H, W/H], so circles stay round.
Directions name how the picture content moves on screen (pan_right: content slides right, dx > 0).
Measurements for tests and the reproduction table: estimate_shift / estimate_scale (two frames),
track (a whole clip against its frame 0), effect_amount (how much of a fade, pan or zoom a clip shows at its
last frame: "does the output do what the reference does?"), psnr, ssim.
Everything runs on the CPU (a 17x64x64 clip takes milliseconds).
"""
import argparse
import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CATEGORIES = ["zoom_in", "zoom_out", "pan_left", "pan_right", "pan_up", "pan_down", "rotate",
              "dolly_zoom", "fade_black", "fade_white", "hue_cycle", "blur_in", "pixel_dissolve",
              "shatter", "melt", "inflate", "ripple", "spin_out", "shake", "vignette_in", "swirl"]
# Zero-shot categories, never trained on. Each is a composition or a mirror of seen motions, so
# transfer is possible but has to be earned: spin_out = rotate + zoom_out (+ black border);
# dolly_zoom = zoom on the periphery with the centre held still (zoom_in/out + inflate); swirl =
# a rotation whose angle falls off with radius (rotate + the radial warps inflate/ripple);
# pan_up = the one pan direction not seen (pan_down/left/right are).
HELDOUT = ["dolly_zoom", "spin_out", "swirl", "pan_up"]
SEEN = [c for c in CATEGORIES if c not in HELDOUT]
EASES = {"linear": lambda t: t, "ease_in": lambda t: t * t, "ease_out": lambda t: 1 - (1 - t) ** 2,
         "ease_in_out": lambda t: t * t * (3 - 2 * t)}  # progress s(t), t in [0,1]
# Default captions never name the effect: the model has to read it from the reference video.
# The category stays in the dataset layout (root/<category>/) and in each clip's .json.
CAPTIONS = ["a picture", "a video of a picture", "an animated image", "a short clip of an image",
            "a moving picture"]
_PAN_ANGLE = {"pan_right": 0.0, "pan_down": 90.0, "pan_left": 180.0, "pan_up": 270.0,  # y points down
              "pan_down_right": 45.0, "pan_down_left": 135.0, "pan_up_left": 225.0, "pan_up_right": 315.0}
# The diagonal pans are in no category list, so no training set has them: bench/toy.py's probe uses them as
# zero-shot moves that lie between seen directions (down-*) or half in the unseen one (up-*).
DIAGONALS = ["pan_down_right", "pan_down_left", "pan_up_left", "pan_up_right"]
KNOWN = CATEGORIES + DIAGONALS  # everything apply_effect renders


def _crc(s):
    return zlib.crc32(s.encode())


# ---------------------------------------------------------------------------- procedural images
_FONT = {c: rows.split("/") for c, rows in dict(
    A=".###./#...#/#####/#...#/#...#", E="#####/#..../####./#..../#####", F="#####/#..../####./#..../#....",
    H="#...#/#...#/#####/#...#/#...#", K="#...#/#..#./###../#..#./#...#", L="#..../#..../#..../#..../#####",
    N="#...#/##..#/#.#.#/#..##/#...#", T="#####/..#../..#../..#../..#..", V="#...#/#...#/#...#/.#.#./..#..",
    X="#...#/.#.#./..#../.#.#./#...#", Y="#...#/.#.#./..#../..#../..#..", Z="#####/...#./..#../.#.../#####",
).items()}


def _texture(rng, x, y):
    """[H,W,3] fill: solid, stripes, checker or smooth noise blobs."""
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    kind, a = rng.integers(4), rng.uniform(0, math.pi)
    u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    period = rng.uniform(0.12, 0.4)
    if kind == 0:
        m = np.zeros_like(x)
    elif kind == 1:
        m = (u / period) % 1.0 < 0.5
    elif kind == 2:
        m = (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    else:  # low-res noise upsampled: soft blobs that still give phase correlation something to lock on
        n = torch.tensor(rng.uniform(0, 1, (1, 3, rng.integers(3, 8), rng.integers(3, 8))))
        return F.interpolate(n, size=x.shape, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    return np.where(m[..., None], c1, c0)


def make_image(seed, height=64, width=64):
    """Deterministic procedural picture [3,H,W] in [0,1]: a gradient background, 5-9 textured
    shapes (circles, rotated rectangles, triangles) and 1-2 short block-letter words. Draws that
    came out nearly featureless (< 6% edge pixels; ~1 in 5) are redrawn, so motion is measurable."""
    if seed < 0:
        raise ValueError(f"image seed must be >= 0, got {seed}")
    for attempt in range(20):
        img = _draw(np.random.default_rng([seed, 0x1A6E, attempt]), height, width)
        edges = ((img[:, :, 1:] - img[:, :, :-1]).abs().amax(0) > 0.1).float().mean()
        if edges >= 0.06:
            break
    return img


def _draw(rng, height, width):
    A = width / height
    y, x = np.meshgrid((np.arange(height) * 2 + 1) / height - 1,
                       ((np.arange(width) * 2 + 1) / width - 1) * A, indexing="ij")
    c0, c1, a = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), rng.uniform(0, 2 * math.pi)
    g = np.hypot(x - rng.uniform(-1, 1), y - rng.uniform(-1, 1)) / 2 if rng.random() < 0.3 else \
        0.5 + 0.35 * (x * math.cos(a) + y * math.sin(a))
    img = c0 + (c1 - c0) * np.clip(g, 0, 1)[..., None]
    for _ in range(rng.integers(5, 10)):
        kind, cx, cy, r = rng.integers(3), rng.uniform(-A, A), rng.uniform(-1, 1), rng.uniform(0.15, 0.55)
        if kind == 0:
            m = np.hypot(x - cx, y - cy) < r
        elif kind == 1:
            b = rng.uniform(0, math.pi)
            u, v = (x - cx) * math.cos(b) + (y - cy) * math.sin(b), (y - cy) * math.cos(b) - (x - cx) * math.sin(b)
            m = (np.abs(u) < r) & (np.abs(v) < r * rng.uniform(0.3, 1.0))
        else:  # inside a triangle = on the same side of all three edges
            px, py = cx + rng.uniform(-r, r, 3) * 1.5, cy + rng.uniform(-r, r, 3) * 1.5
            s = np.stack([(px[i - 2] - px[i]) * (y - py[i]) - (py[i - 2] - py[i]) * (x - px[i]) for i in range(3)])
            m = (s > 0).all(0) | (s < 0).all(0)
        img = np.where(m[..., None], _texture(rng, x, y), img)
    cell = max(1, round(min(height, width) * rng.uniform(0.03, 0.05)))
    letters = sorted(_FONT)
    for _ in range(rng.integers(1, 3)):
        word, col = rng.choice(letters, rng.integers(1, 4)), rng.uniform(0, 1, 3)
        top, left = rng.integers(0, max(1, height - 5 * cell)), rng.integers(0, max(1, width - 6 * cell))
        for k, ch in enumerate(word):
            for i, row in enumerate(_FONT[ch]):
                for j, bit in enumerate(row):
                    if bit == "#":
                        y0, x0 = top + i * cell, left + (6 * k + j) * cell
                        img[y0:y0 + cell, x0:x0 + cell] = col
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1).clamp(0, 1)


# ---------------------------------------------------------------------------- effects
def _center(r, spread=0.3):
    return [r.uniform(-spread, spread), r.uniform(-spread, spread)]


def _sign(r):
    return float(r.choice([-1.0, 1.0]))


# Per-category parameter distributions. Units: lengths in the unit frame (image height = 2),
# pan distance as a fraction of the image height, angles in degrees (positive = clockwise on screen).
_PARAMS = {
    "zoom_in": lambda r: dict(scale=r.uniform(1.4, 2.2), center=_center(r)),
    "zoom_out": lambda r: dict(scale=1 / r.uniform(1.4, 2.2), center=_center(r)),
    **{k: (lambda r, k=k: dict(distance=r.uniform(0.15, 0.4), angle=_PAN_ANGLE[k] + r.uniform(-15, 15)))
       for k in _PAN_ANGLE},
    "rotate": lambda r: dict(angle=_sign(r) * r.uniform(30, 120), center=_center(r)),
    "dolly_zoom": lambda r: dict(strength=_sign(r) * r.uniform(0.3, 0.6), radius=r.uniform(0.3, 0.6),
                                 center=_center(r, 0.2)),
    "fade_black": lambda r: dict(amount=r.uniform(0.85, 1.0)),
    "fade_white": lambda r: dict(amount=r.uniform(0.85, 1.0)),
    "hue_cycle": lambda r: dict(angle=_sign(r) * r.uniform(120, 360)),
    "blur_in": lambda r: dict(sigma=r.uniform(0.04, 0.1)),  # fraction of the image height
    "pixel_dissolve": lambda r: dict(block=int(r.choice([1, 2, 4])), color=list(r.uniform(0, 0.3, 3)),
                                     amount=r.uniform(0.85, 1.0), noise_seed=int(r.integers(2**31))),
    "shatter": lambda r: dict(tiles=int(r.integers(3, 7)), speed=r.uniform(0.6, 1.2), spin=r.uniform(0, 90),
                              center=_center(r), noise_seed=int(r.integers(2**31))),
    "melt": lambda r: dict(drop=r.uniform(0.3, 0.8), columns=list(r.uniform(0.2, 1.0, r.integers(6, 16)))),
    "inflate": lambda r: dict(strength=r.uniform(0.4, 0.7), radius=r.uniform(0.5, 1.0), center=_center(r)),
    "ripple": lambda r: dict(amplitude=r.uniform(0.06, 0.14), wavelength=r.uniform(0.25, 0.5),
                             cycles=_sign(r) * r.uniform(1, 3), center=_center(r)),
    "spin_out": lambda r: dict(angle=_sign(r) * r.uniform(90, 360), scale=r.uniform(0.15, 0.5),
                               center=_center(r, 0.15)),
    "shake": lambda r: dict(amplitude=r.uniform(0.05, 0.12), freq=r.uniform(2.5, 5),
                            phase=list(r.uniform(0, 2 * math.pi, 2))),
    "vignette_in": lambda r: dict(radius=r.uniform(0.05, 0.4), softness=r.uniform(0.1, 0.3),
                                  center=_center(r, 0.2)),
    "swirl": lambda r: dict(angle=_sign(r) * r.uniform(180, 360), radius=r.uniform(0.7, 1.4), center=_center(r)),
}


def _tidy(v):  # plain, short JSON-able numbers (the rounded values ARE the params, so no drift)
    if isinstance(v, dict):
        return {k: _tidy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_tidy(x) for x in v]
    return round(float(v), 4) if isinstance(v, (float, np.floating)) else v


def sample_params(category, seed):
    """Parameters of one clip of `category`, deterministic in (category, seed)."""
    if category not in _PARAMS:
        raise ValueError(f"unknown effect category {category!r}; known: {KNOWN}")
    r = np.random.default_rng([seed, _crc(category)])
    return _tidy(dict(_PARAMS[category](r), ease=list(EASES)[int(r.integers(len(EASES)))]))


def _rot(x, y, deg):
    a = deg * (math.pi / 180)
    return x * torch.cos(a) - y * torch.sin(a), x * torch.sin(a) + y * torch.cos(a)


def _warp(img, xs, ys, A, padding="reflection"):
    """Sample img at unit-frame source coordinates xs, ys (broadcast to [F,H,W]) -> [F,3,H,W]."""
    xs, ys = torch.broadcast_tensors(xs, ys)
    grid = torch.stack([xs / A, ys], -1)
    return F.grid_sample(img.expand(len(grid), -1, -1, -1), grid, mode="bilinear", padding_mode=padding,
                         align_corners=False)


def _radial(img, p, x, y, A, factor, padding="reflection"):
    """Warp with source = centre + (p - centre) * factor(r)."""
    cx, cy = p["center"]
    k = factor(torch.hypot(x - cx, y - cy))
    return _warp(img, cx + (x - cx) * k, cy + (y - cy) * k, A, padding)


def _spin(img, p, s, x, y, A, scale, padding):
    cx, cy = p["center"]
    xr, yr = _rot(x - cx, y - cy, -p["angle"] * s)
    return _warp(img, cx + xr / scale, cy + yr / scale, A, padding)


def _blur(img, sigma):
    if sigma < 1e-3:
        return img
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=img.dtype) / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
    out = F.pad(img[None], (r, r, 0, 0), mode="replicate")
    out = F.conv2d(out, k, groups=3)
    out = F.pad(out, (0, 0, r, r), mode="replicate")
    return F.conv2d(out, k.transpose(2, 3), groups=3)[0]


def _shatter(img, p, s, x, y, A):
    """Tiles fly outward from the centre, each with its own speed jitter and spin, over black."""
    H, W = img.shape[1:]
    n, (cx, cy) = p["tiles"], p["center"]
    r = np.random.default_rng(p["noise_seed"])
    out = torch.zeros(len(s), 3, H, W)
    for i in range(n):
        for j in range(n):  # tile (i,j) spans the unit-frame box [x0,x1] x [y0,y1]
            x0, x1, y0, y1 = A * (2 * j / n - 1), A * (2 * j + 2) / n - A, 2 * i / n - 1, (2 * i + 2) / n - 1
            tx, ty = (x0 + x1) / 2, (y0 + y1) / 2
            v = np.array([tx - cx, ty - cy]) + r.normal(0, 0.3, 2)
            v = v / (np.linalg.norm(v) + 1e-6) * p["speed"] * r.uniform(0.6, 1.4)
            xr, yr = _rot(x - tx - s * v[0], y - ty - s * v[1], -p["spin"] * r.uniform(-1, 1) * s)
            xs, ys = torch.broadcast_tensors(tx + xr, ty + yr)
            inside = ((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1))[:, None]
            out = torch.where(inside, _warp(img, xs, ys, A, "border"), out)
    return out


def _dissolve(img, p, s):
    H, W, b = *img.shape[1:], p["block"]
    u = np.random.default_rng(p["noise_seed"]).uniform(0, 1, (-(-H // b), -(-W // b)))
    u = torch.from_numpy(u).float().repeat_interleave(b, 0).repeat_interleave(b, 1)[:H, :W]
    gone = (u < p["amount"] * s)[:, None]  # [F,1,H,W]; strict < so nothing goes at s = 0
    return torch.where(gone, torch.tensor(p["color"]).view(1, 3, 1, 1), img)


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue(img, p, s):  # rotating the chroma plane of YIQ turns the hue wheel, luma untouched
    yiq = torch.einsum("ij,jhw->ihw", _YIQ, img)
    i, q = _rot(yiq[1], yiq[2], p["angle"] * s)
    yiq = torch.stack([yiq[0].expand_as(i), i, q], 1)  # [F,3,H,W]
    return torch.einsum("ij,fjhw->fihw", torch.linalg.inv(_YIQ), yiq)


def _melt(img, p, s, x, y, A):
    knots = np.asarray(p["columns"])
    d = np.interp(np.linspace(0, 1, x.shape[-1]), np.linspace(0, 1, len(knots)), knots)
    # border padding: the top row stretches down behind the dripping columns
    return _warp(img, x, y - s * 2 * p["drop"] * torch.from_numpy(d).float(), A, "border")


def _vignette(img, p, s, x, y, A):
    cx, cy = p["center"]
    r, soft = torch.hypot(x - cx, y - cy), p["softness"]
    start = math.hypot(A + abs(cx), 1 + abs(cy)) + soft  # fully open at s = 0
    return img * ((start + (p["radius"] - start) * s - r) / soft).clamp(0, 1)[:, None]


def _effect(img, c, p, s, t, x, y, A):
    if c in ("zoom_in", "zoom_out"):
        return _spin(img, dict(p, angle=0.0), s, x, y, A, p["scale"] ** s, "reflection")
    if c in _PAN_ANGLE:
        a, d = math.radians(p["angle"]), 2 * p["distance"]
        return _warp(img, x - s * d * math.cos(a), y - s * d * math.sin(a), A)
    if c == "rotate":
        return _spin(img, p, s, x, y, A, 1.0, "reflection")
    if c == "spin_out":
        return _spin(img, p, s, x, y, A, p["scale"] ** s, "zeros")
    if c == "dolly_zoom":  # factor < 1 past `radius` magnifies the periphery (< 0: shrinks it), centre held
        ramp = lambda r: EASES["ease_in_out"](((r - p["radius"]) / 0.6).clamp(0, 1))
        return _radial(img, p, x, y, A, lambda r: torch.exp(-s * p["strength"] * ramp(r)))
    if c == "inflate":  # monotone in r for strength < 1, so the bulge never folds over
        bump = lambda r: (1 - (r / p["radius"]) ** 2).clamp(min=0)
        return _radial(img, p, x, y, A, lambda r: 1 - s * p["strength"] * bump(r))
    if c == "ripple":  # radial displacement, a wave travelling out (cycles > 0) or in, growing with s
        wave = lambda r: torch.sin(2 * math.pi * (r / p["wavelength"] - p["cycles"] * t)) / r.clamp(min=1e-6)
        return _radial(img, p, x, y, A, lambda r: 1 + p["amplitude"] * s * wave(r))
    if c == "swirl":
        cx, cy = p["center"]
        fall = (1 - torch.hypot(x - cx, y - cy) / p["radius"]).clamp(min=0) ** 2
        xr, yr = _rot(x - cx, y - cy, -p["angle"] * s * fall)
        return _warp(img, cx + xr, cy + yr, A)
    if c == "shake":
        ox, oy = (p["amplitude"] * s * torch.sin(2 * math.pi * p["freq"] * t + ph) for ph in p["phase"])
        return _warp(img, x - ox, y - oy, A)
    if c == "fade_black":
        return img * (1 - p["amount"] * s[:, None])
    if c == "fade_white":
        return img + (1 - img) * p["amount"] * s[:, None]
    if c == "hue_cycle":
        return _hue(img, p, s)
    if c == "blur_in":  # frame 0 is sharp (I2V conditions on it); the picture defocuses over time
        return torch.stack([_blur(img, float(si) * p["sigma"] * img.shape[1]) for si in s.flatten()])
    if c == "pixel_dissolve":
        return _dissolve(img, p, s)
    if c == "shatter":
        return _shatter(img, p, s, x, y, A)
    if c == "melt":
        return _melt(img, p, s, x, y, A)
    if c == "vignette_in":
        return _vignette(img, p, s, x, y, A)
    raise ValueError(f"unknown effect category {c!r}; known: {KNOWN}")


def apply_effect(image, category, params, frames=17):
    """Clip [frames,3,H,W] in [0,1]; frame 0 is exactly `image` (every effect is the identity at t=0)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3,H,W], got {list(image.shape)}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    img = image.detach().float().cpu()
    H, W = img.shape[1:]
    A = W / H
    y = ((torch.arange(H, dtype=torch.float32) * 2 + 1) / H - 1).view(1, H, 1)
    x = (((torch.arange(W, dtype=torch.float32) * 2 + 1) / W - 1) * A).view(1, 1, W)
    t = torch.linspace(0, 1, frames).view(-1, 1, 1)
    if params.get("ease") not in EASES:
        raise ValueError(f"params['ease'] must be one of {list(EASES)}, got {params.get('ease')!r}")
    try:
        clip = _effect(img, category, params, EASES[params["ease"]](t), t, x, y, A)
    except KeyError as e:
        raise ValueError(f"params for {category!r} lack key {e}; got {sorted(params)}") from None
    clip = clip.clamp(0, 1)
    clip[0] = img
    return clip


def ground_truth(meta, image=None):
    """Re-render the clip a dataset .json describes, on its own image or on another [3,H,W] image."""
    if image is None and meta.get("image"):  # a clip made from a picture file (`clip --image`)
        image = (_data().read_image(meta["image"], meta["height"], meta["width"]) + 1) / 2
    if image is None:
        image = make_image(meta["image_seed"], meta["height"], meta["width"])
    return apply_effect(image, meta["category"], meta["params"], meta["frames"])


def caption(category, seed, named=False):
    return f"a picture, {category.replace('_', ' ')}" if named else CAPTIONS[seed % len(CAPTIONS)]


# ---------------------------------------------------------------------------- measurements
def _gray(a):
    a = torch.as_tensor(a).double()
    return a.mean(-3) if a.dim() >= 3 else a


def _xcorr(f, g, R):
    """sum_x f(x - s) g(x) for every shift s = (dy, dx) in [-R, R]^2: [..., H, W] x [H, W] -> [..., 2R+1, 2R+1].
    By FFT, zero-padded to twice the size so no shift wraps around."""
    H, W = g.shape[-2:]
    n = (2 * H, 2 * W)
    c = torch.fft.irfft2(torch.fft.rfft2(f, n).conj() * torch.fft.rfft2(g, n), n)
    return torch.roll(c, (R, R), (-2, -1))[..., :2 * R + 1, :2 * R + 1]


def ncc_surface(a, b, radius, valid=None, min_overlap=0.25):
    """Normalised cross-correlation of frame b [H,W] with frame a moved by every integer shift (dy, dx) within
    `radius`, each over only the pixels where the moved a is defined ([..., 2R+1, 2R+1], index R + shift; a may
    carry a batch dim, `valid` marks a's defined pixels). Restricting to the overlap is what makes large shifts
    readable: a whole-frame correlation (phase correlation) is dominated by the pixels a pan pushes out of the
    frame or in from its border, and under-reads or flips on soft frames. Shifts whose overlap is under
    `min_overlap` of the frame get -inf."""
    m = torch.ones_like(a) if valid is None else valid.to(a.dtype)
    am = a * m
    n, sa, saa = _xcorr(m, torch.ones_like(b), radius), _xcorr(am, torch.ones_like(b), radius), \
        _xcorr(am * a, torch.ones_like(b), radius)
    sb, sbb, sab = _xcorr(m, b, radius), _xcorr(m, b * b, radius), _xcorr(am, b, radius)
    k = n.clamp(min=1)
    cov = sab - sa * sb / k
    var = (saa - sa * sa / k).clamp(min=0) * (sbb - sb * sb / k).clamp(min=0)
    ncc = cov / var.sqrt().clamp(min=1e-12)
    return ncc.masked_fill(n < min_overlap * b.numel(), -math.inf)


def _vertex(m0, m1, m2):
    """Offset in [-1, 1] of the top of the parabola through three samples around a maximum."""
    if not all(math.isfinite(m) for m in (m0, m1, m2)):
        return 0.0
    den = m0 - 2 * m1 + m2
    return 0.0 if abs(den) < 1e-12 else max(-1.0, min(1.0, 0.5 * (m0 - m2) / den))


def _peak(c):
    """(dy, dx, height) of a correlation surface's maximum, sub-pixel by a parabola along each axis."""
    R = (c.shape[-1] - 1) // 2
    py, px = divmod(int(c.argmax()), c.shape[-1])
    at = lambda y, x: float(c[y, x]) if 0 <= y <= 2 * R and 0 <= x <= 2 * R else -math.inf
    dy = py - R + _vertex(at(py - 1, px), at(py, px), at(py + 1, px))
    dx = px - R + _vertex(at(py, px - 1), at(py, px), at(py, px + 1))
    return dy, dx, float(c[py, px])


def estimate_shift(a, b, radius=None):
    """(dy, dx) in pixels that frame b's content moved relative to frame a ([3,H,W] or [H,W]), searched up to
    `radius` px (default 45 % of the frame)."""
    a, b = _gray(a), _gray(b)
    return _peak(ncc_surface(a, b, radius or int(0.45 * min(a.shape))))[:2]


SCALES = torch.exp(torch.linspace(math.log(0.4), math.log(2.5), 41, dtype=torch.float64))  # candidate zooms


def scale_scores(a, b):
    """[len(SCALES)]: how well frame b matches frame a zoomed about its centre by each candidate scale, at its
    best shift (a zoom about any other centre is that zoom plus a shift); a zoomed-out a is compared only where
    it is defined."""
    a, b = _gray(a), _gray(b)
    H, W, n = *a.shape, len(SCALES)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / SCALES
    grid = F.affine_grid(theta, [n, 1, H, W], align_corners=False)
    x = torch.stack([a, torch.ones_like(a)])[None].expand(n, 2, H, W)
    az, m = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False).unbind(1)
    valid = m > 1 - 1e-6
    return ncc_surface(torch.where(valid, az, 0), b, int(0.45 * min(H, W)), valid, min_overlap=0.1).flatten(1).amax(1)


def _refine(score, k):
    """Scale at candidate k, refined by the parabola through its neighbours' scores."""
    k = min(max(k, 1), len(SCALES) - 2)
    step = math.log(SCALES[1] / SCALES[0])
    return math.exp(math.log(SCALES[k]) + _vertex(*score[k - 1:k + 2].tolist()) * step)


def estimate_scale(a, b):
    """Magnification of frame b relative to a (>1: b is zoomed in), by brute force over SCALES."""
    score = scale_scores(a, b)
    return _refine(score, int(score.argmax()))


def tracked_scale(clip, within=0.35):
    """Scale of the last frame against frame 0 on the best-scoring path of per-frame scales (each frame still
    compared with frame 0) whose log changes by at most `within` between frames (a Viterbi pass). Why: a
    strong zoom through the toy VAE leaves the last frames so soft that, alone, a zoom the other way matches
    them best (a x2 zoom read as x0.48), and a single soft middle frame must not steer the path either."""
    n, shifts = len(SCALES), range(-int(within / math.log(SCALES[1] / SCALES[0])), 0)
    shifts = [*shifts, *(-d for d in reversed(shifts)), 0]
    idx = torch.arange(n)
    beyond = torch.stack([(idx - d < 0) | (idx - d >= n) for d in shifts])  # roll wraps around: mask those
    best = torch.full((n,), -math.inf, dtype=torch.float64)
    best[int(SCALES.log().abs().argmin())], score = 0, None  # frame 0 against itself: scale 1
    for f in clip[1:]:
        score = scale_scores(clip[0], f)
        best = torch.stack([best.roll(d) for d in shifts]).masked_fill(beyond, -math.inf).amax(0) + score
    return 1.0 if score is None else _refine(score, int(best.argmax()))


def track(clip):
    """Motion of a clip [F,3,H,W] relative to frame 0: (shift [F,2] = (dy, dx) px, scale [F]), each frame
    compared with frame 0 directly (chained small estimates drift)."""
    shift = [torch.tensor(estimate_shift(clip[0], f)) for f in clip]
    return torch.stack(shift).float(), torch.tensor([estimate_scale(clip[0], f) for f in clip])


def effect_amount(clip, category, params):
    """How much of `category`'s effect a clip [F,3,H,W] in [0,1] shows at its last frame: the fraction of
    brightness lost (fade_black) or gained towards white (fade_white), the displacement in px along the pan
    direction (pan_*), the log scale, signed so the category's direction is positive (zoom_in/out). The last
    frame is compared with frame 0 directly; tests/test_effects.py checks that on the ground truth passed
    through the toy VAE this reads the right sign and most of the true displacement."""
    if category in ("fade_black", "fade_white"):
        a, b = float(clip[0].mean()), float(clip[-1].mean())
        return (a - b) / a if category == "fade_black" else (b - a) / (1 - a)
    if category.startswith("pan_"):
        dy, dx = estimate_shift(clip[0], clip[-1])
        t = math.radians(params["angle"])  # y points down
        return dx * math.cos(t) + dy * math.sin(t)
    if category in ("zoom_in", "zoom_out"):
        return math.log(tracked_scale(clip)) * (1 if category == "zoom_in" else -1)
    raise NotImplementedError(f"no measure of how much a clip shows {category}: fades, pans and zooms have one")


def _pair(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"metrics need equal shapes, got {list(a.shape)} and {list(b.shape)}")
    return a, b


def psnr(a, b, data_range=1.0):
    """PSNR in dB over whole videos (or images); identical inputs give inf."""
    a, b = _pair(a, b)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(a, b, data_range=1.0, size=11, sigma=1.5):
    """Mean SSIM (Wang et al. 2004: 11x11 gaussian window, sigma 1.5, valid region) over every
    frame and channel of [...,C,H,W] inputs."""
    a, b = _pair(a, b)
    size = min(size, *a.shape[-2:])
    a, b = a.reshape(-1, 1, *a.shape[-2:]), b.reshape(-1, 1, *b.shape[-2:])
    g = torch.exp(-0.5 * ((torch.arange(size, dtype=a.dtype) - (size - 1) / 2) / sigma) ** 2)
    g = (g / g.sum()).view(1, 1, 1, -1)
    f = lambda z: F.conv2d(F.conv2d(z, g), g.transpose(2, 3))  # separable gaussian window
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return float(s.mean())


# ---------------------------------------------------------------------------- dataset + CLI
def clip_seeds(category, index, seed=0, split="train"):
    """(image_seed, effect_seed) of clip `index`. Train images use seeds < 2**30, test images
    seeds >= 2**30, so held-out images never appear in training."""
    r = np.random.default_rng([seed, _crc(category), index, ["train", "test"].index(split)])
    return int(r.integers(2**30)) + (2**30 if split == "test" else 0), int(r.integers(2**31))


def write_dataset(root, n_per_category, frames=17, height=64, width=64, fps=8, seed=0,
                  categories=SEEN, split="train", named=False):
    """root/<category>/<NNNN>.mp4 + .txt (caption) + .json (seeds, params: the exact ground truth)."""
    paths = []
    for cat in categories:
        (Path(root) / cat).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_category):
            image_seed, effect_seed = clip_seeds(cat, i, seed, split)
            meta = dict(category=cat, image_seed=image_seed, effect_seed=effect_seed,
                        params=sample_params(cat, effect_seed), frames=frames, height=height, width=width,
                        fps=fps, split=split, caption=caption(cat, effect_seed, named))
            paths.append(write_clip(Path(root) / cat / f"{i:04d}.mp4", meta))
    return paths


def _data():  # the repo's data.py (video I/O); bench/ scripts run with bench/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import data
    return data


def write_clip(path, meta, image=None):
    """path (.mp4) + .txt caption + .json meta beside it; returns str(path)."""
    path = Path(path)
    _data().write_video(path, ground_truth(meta, image), fps=meta["fps"])
    path.with_suffix(".txt").write_text(meta["caption"] + "\n")
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return str(path)


def write_png(path, image):
    """[3,H,W] in [0,1] -> PNG via PyAV's image2 muxer (no extra image library)."""
    import av
    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    with av.open(str(path), "w", format="image2") as out:
        st = out.add_stream("png")
        st.width, st.height, st.pix_fmt = arr.shape[1], arr.shape[0], "rgb24"
        for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


def main(args):
    torch.set_num_threads(1)  # many tiny ops: extra threads only add sync overhead (30x on a busy box)
    if args.cmd == "list":
        for c in KNOWN:
            print(f"{c:16s} {'heldout' if c in HELDOUT else 'probe-only' if c in DIAGONALS else 'seen'}")
    elif args.cmd == "image":
        write_png(args.out, make_image(args.seed, args.size, args.size))
    elif args.cmd == "clip":
        meta = dict(category=args.category, image_seed=None if args.image else args.image_seed,
                    image=args.image, effect_seed=args.seed, params=sample_params(args.category, args.seed),
                    frames=args.frames, height=args.size, width=args.size, fps=args.fps,
                    caption=caption(args.category, args.seed))
        write_clip(args.out, meta)
        print(json.dumps(meta))
    else:
        cats = HELDOUT if args.heldout else SEEN
        n = len(write_dataset(args.out, args.n, args.frames, args.size, args.size, args.fps, args.seed,
                              cats, args.split, args.named))
        print(f"wrote {n} clips of {len(cats)} categories to {args.out}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    for name in ("image", "clip", "dataset"):
        q = sub.add_parser(name)
        q.add_argument("--out", required=True)
        q.add_argument("--size", type=int, default=64)
        q.add_argument("--seed", type=int, default=0)
        if name != "image":
            q.add_argument("--frames", type=int, default=17)
            q.add_argument("--fps", type=int, default=8)
    sub.choices["clip"].add_argument("category", choices=KNOWN)
    sub.choices["clip"].add_argument("--image-seed", type=int, default=0)
    sub.choices["clip"].add_argument("--image", help="use this picture instead of a procedural one")
    d = sub.choices["dataset"]
    d.add_argument("--n", type=int, default=20, help="clips per category")
    d.add_argument("--heldout", action="store_true", help="write the zero-shot categories instead")
    d.add_argument("--split", choices=["train", "test"], default="train")
    d.add_argument("--named", action="store_true", help="captions name the effect")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
