"""Video data for video2lora: PyAV reading/writing and the datasets of (target, same-category
reference) pairs train.py reads. Videos are [F,3,H,W] in [-1,1] as read. The latent cache (VAE
posteriors, T5 embeddings) is cache.py.
"""
import csv
import functools
import json
import logging
import os
import random
import sys
from collections import namedtuple
from fractions import Fraction
from pathlib import Path

import av
import torch
import torch.nn.functional as F

import common

log = logging.getLogger("data")
VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".gif"}
OUT_EXTS = (".mp4", ".mov", ".mkv", ".m4v")  # containers that take H.264, which write_video encodes
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class VideoError(Exception):
    """A video or image that cannot be used; the message names the file and the reason."""


def _rgb(frame, height, width):
    """PyAV frame -> uint8 [3,height,width]: resize the short side to cover, centre-crop."""
    x = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None]  # a channels-last view
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):  # antialias: 1080p must not alias; uint8 runs ~6x faster than float
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[0, :, top:top + height, left:left + width]


def _to_float(x):  # in place after one allocation: fresh large allocations dominated the read time
    return x.float().div_(127.5).sub_(1)


def read_video(path, frames=49, fps=8, height=480, width=720, allow_short=False, start=0.0):
    """-> [frames,3,height,width] in [-1,1]. Frame i is the source frame on screen at time
    t0 + start + i/fps (t0: the first frame's time; the latest frame with pts <= it), so any frame
    rate gives the same motion speed. allow_short=True pads a short video by repeating its last
    frame and returns (video, n_real)."""
    try:
        c = av.open(str(path))
        stream = c.streams.video[0]
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:  # missing, corrupt, audio only
        raise VideoError(f"{path}: cannot open as a video ({e or 'no video stream'})") from None
    with c:
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        targets, picked, prev, t = None, [], None, 0.0
        try:
            for n, f in enumerate(c.decode(stream)):
                t = f.time if f.pts is not None else n / rate
                targets = targets or [t + start + i / fps for i in range(frames)]
                while len(picked) < frames and targets[len(picked)] < t - 1e-6:  # prev shows it
                    picked.append(prev)
                if len(picked) == frames:
                    break  # past the last target: the rest need not be decoded
                prev = f
        except av.FFmpegError as e:
            msg = f"{path}: decoding failed after {len(picked)} sampled frames ({e})"
            raise VideoError(msg) from None
        if prev is None:
            raise VideoError(f"{path}: no decodable frames")
        end = t + 1 / rate  # the last frame stays on screen for one frame period
        while len(picked) < frames and targets[len(picked)] < end - 1e-6:
            picked.append(prev)
        n_real = len(picked)
        if n_real == 0 and start > 0:
            raise VideoError(f"{path}: starts past its end: {start:g} s into a {end - targets[0] + start:.2f} s video")
        if n_real < frames and not allow_short:
            raise VideoError(f"{path}: too short: {end - targets[0]:.2f} s at {rate:g} fps gives {n_real} frames "
                             f"at {fps:g} fps, needs {frames} ({frames / fps:.2f} s)")
        picked += [prev] * (frames - n_real)
        rgb = {id(f): f for f in picked}  # each distinct frame converted once
        rgb = {k: _rgb(f, height, width) for k, f in rgb.items()}
        video = _to_float(torch.stack([rgb[id(f)] for f in picked]))
    return (video, n_real) if allow_short else video


def duration(path):
    """Seconds the video lasts by its container (None when it does not say): for messages only."""
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            return float(s.duration * s.time_base) if s.duration else c.duration and c.duration / 1e6
    except (av.FFmpegError, OSError, IndexError):
        return None


def read_reference(path, frames, height, width, start=0.0):
    """A reference video for sample.py -> [F,3,H,W] in [0,1] at 8 fps from `start` s: `frames` of
    them, or a short video's longest 8k+1 prefix (not a frozen tail). Notes go to stderr."""
    v, n = read_video(path, frames, 8, height, width, allow_short=True, start=start)
    keep = frames if n >= frames else (n - 1) // 8 * 8 + 1
    if keep < 9:
        raise ValueError(f"{path}: too short: {n} frames at 8 fps from {start:g} s on, a reference "
                         "needs at least 9")
    span = f"{start:.2f}-{start + keep / 8:.2f} s"
    length = duration(path) if keep == frames else None
    if keep < frames:
        print(f"note: {path} gives only {n} frames at 8 fps (< {frames}): using its first {keep} "
              f"({span})", file=sys.stderr)
    elif length and length > start + (keep + 1) / 8:
        print(f"note: {path} lasts {length:.2f} s; the model reads {keep} frames at 8 fps: using "
              f"{span} (--ref-start SECONDS picks another span)", file=sys.stderr)
    return (v[:keep] + 1) / 2


def read_image(path, height, width):
    """An image (anything FFmpeg decodes; a video gives frame 0) -> [3,height,width] in [-1,1]."""
    return read_video(path, 1, 1, height, width)[0]


def check_video_out(path, option):
    """ValueError unless write_video can write `path`: an H.264 container name and libx264."""
    if Path(path).suffix.lower() not in OUT_EXTS:
        raise ValueError(f"{option} {path}: the video is H.264, so the name must end in one of "
                         f"{' '.join(OUT_EXTS)}")
    try:
        av.codec.Codec("libx264", "w")
    except Exception:
        raise ValueError("this PyAV/FFmpeg build has no libx264 encoder (pip install av ships one)") from None


@functools.cache
def _x264_options(crf):
    """Options that make the file a function of the frames alone. A fixed thread count: x264's output
    depends on it, and by default it follows the CPUs we may use (taskset, cgroups, other machines).
    SIMD up to AVX2: its AVX-512 code wrote other bytes on every run on an AMD EPYC; only flags
    /proc/cpuinfo lists (a forced flag the CPU lacks is an illegal instruction), else x264's choice."""
    opts, cpuinfo = {"crf": str(crf), "threads": "4"}, Path("/proc/cpuinfo")
    have = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    if {"sse2", "ssse3", "sse4_2", "avx"} <= have:
        opts["x264-params"] = "asm=MMX2,SSE2,SSE2Fast,SSSE3,SSE4.2,AVX" + ",AVX2" * ("avx2" in have)
    return opts


def write_video(path, video, fps=8, crf=18):
    """[F,3,H,W] float in [0,1] -> H.264 yuv420p file, via a temporary file and a rename.
    yuv420p needs even sizes: an odd height/width is padded by repeating the last row/column."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"write_video {path}: expected [F,3,H,W], got {tuple(video.shape)}")
    H, W = video.shape[-2:]
    x = F.pad(video.float(), (0, W % 2, 0, H % 2), mode="replicate") if H % 2 or W % 2 else video
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    with common.atomic(path) as tmp, av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = x.shape[2], x.shape[1], "yuv420p"
        s.options = dict(_x264_options(crf))  # a copy: the cached dict stays as made
        for frame in x:
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode(None))
    return Path(path)


# ---- datasets: root/<category>/<clip>.<ext> (+ <clip>.txt caption) or a CSV/JSONL manifest ----
Clip = namedtuple("Clip", "path caption category")


def scan(path):
    """A folder root/<category>/<clip>.<ext> or a .csv/.jsonl manifest (columns video, caption,
    category; video paths relative to the manifest) -> list[Clip] in a stable order."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        text = lambda f: f.read_text().strip() if f.is_file() else ""
        dirs = sorted(p for p in path.iterdir() if p.is_dir())
        clips = [Clip(str(v), text(v.with_suffix(".txt")), d.name) for d in dirs
                 for v in sorted(d.iterdir()) if v.suffix.lower() in VIDEO_EXTS]
    elif (ext := path.suffix.lower()) in (".csv", ".jsonl") and path.is_file():
        with open(path, newline="") as fh:
            rows = (list(csv.DictReader(fh)) if ext == ".csv"
                    else [json.loads(l) for l in fh if l.strip()])
        for n, r in enumerate(rows, 1):
            if not r.get("video") or r.get("category") is None:
                raise ValueError(f"{path}: row {n} needs 'video' and 'category' (has {sorted(r)})")
        clips = [Clip(str(path.parent / r["video"]), (r.get("caption") or "").strip(),
                      str(r["category"])) for r in rows]
    else:
        raise FileNotFoundError(f"data {path}: expected a folder root/<category>/<clip> or a "
                                ".csv/.jsonl manifest")
    if not clips:
        raise ValueError(f"data {path}: no clips found (video extensions: {' '.join(sorted(VIDEO_EXTS))})")
    return clips


def pair(clips, i, seed, epoch, groups):
    """Reference for target i: another clip of its category, a pure function of (seed, epoch, i)
    so workers, ranks and resumed runs agree (str seeds go through sha512, not PYTHONHASHSEED)."""
    others = [j for j in groups[clips[i].category] if j != i]
    return random.Random(f"{seed}:{epoch}:{i}").choice(others) if others else i


class VideoPairs(torch.utils.data.Dataset):
    """item i -> {"video", "ref", "caption", "index", "ref_index"}, or None when the target or its
    reference is unusable. Without a cache "video"/"ref" are [F,3,H,W] in [-1,1]; with one they
    are {"mean","logvar"} bf16 [C,F',h,w] (VAE layout), plus "text" [L,D] bf16 and "first" [3,H,W]
    (frame 0 in [-1,1], bit-equal to read_video's). Each bad clip is logged once and listed in
    run_dir/bad_clips.txt (path TAB reason), which tells other workers and ranks it was reported."""

    def __init__(self, clips, frames=49, fps=8, height=480, width=720, seed=0, cache=None,
                 run_dir=None):
        self.clips, self.frames, self.fps, self.size = clips, frames, fps, (height, width)
        self.seed, self.cache, self.epoch, self.bad, self.groups = seed, cache, 0, {}, {}
        self.bad_file = Path(run_dir) / "bad_clips.txt" if run_dir is not None else None
        for i, c in enumerate(clips):
            self.groups.setdefault(c.category, []).append(i)
        if single := sorted(k for k, v in self.groups.items() if len(v) == 1):
            log.warning(f"warning: {len(single)} categories have one clip, its own reference: {', '.join(single)}")
        want = dict(frames=frames, fps=fps, height=height, width=width)
        if cache is not None and {k: cache.settings[k] for k in want} != want:
            raise ValueError(f"cache {cache.root} was built with {cache.settings}, not {want}")

    def set_epoch(self, epoch):  # Stream's epoch: the references are drawn per epoch
        self.epoch = epoch

    def __len__(self):
        return len(self.clips)

    def _mark_bad(self, clip, reason):  # -> None, so `return self._mark_bad(...)` drops the item
        if clip.path not in self.bad and clip.path not in self.bad_clips():
            if self.bad_file is not None:
                with open(self.bad_file, "a") as fh:  # one short append: atomic across workers
                    fh.write(f"{clip.path}\t{reason}\n")
            log.warning(f"warning: skipping {clip.path}: {reason}")
        self.bad[clip.path] = reason

    def bad_clips(self):
        """{path: reason} of the clips found unusable so far, here or (the file) by others."""
        f = self.bad_file
        lines = f.read_text().splitlines() if f and f.is_file() else []
        return {**dict(l.split("\t", 1) for l in lines if "\t" in l), **self.bad}

    def _load(self, clip):
        if self.cache is None:
            try:
                return read_video(clip.path, self.frames, self.fps, *self.size)
            except VideoError as e:
                return self._mark_bad(clip, str(e).removeprefix(f"{clip.path}: "))
        why = self.cache.why_missing(clip)
        return self._mark_bad(clip, why) if why else self.cache.latents(clip)

    def __getitem__(self, i):
        clip, j = self.clips[i], pair(self.clips, i, self.seed, self.epoch, self.groups)
        if (video := self._load(clip)) is None or (ref := self._load(self.clips[j])) is None:
            return None
        out = {"video": video, "ref": ref, "caption": clip.caption, "index": i, "ref_index": j}
        if self.cache is not None:
            if not self.cache.has_text(clip.caption):
                return self._mark_bad(clip, f"caption not in the cache: {clip.caption[:60]!r}")
            out.update(text=self.cache.text(clip.caption), first=_to_float(video.pop("first")))
            del ref["first"]
        return out


class Stream(torch.utils.data.Dataset):
    """Global sample number n -> item. Epoch n // N shuffles the clips with a permutation seeded by
    (seed, epoch); a bad clip (None from VideoPairs) is replaced by the permutation's next one, so
    the stream is a pure function of n whatever the workers, ranks or restarts."""

    def __init__(self, pairs, seed):
        self.pairs, self.seed, self.perm = pairs, seed, (None, None)

    def __getitem__(self, n):
        N = len(self.pairs)
        epoch, i = divmod(n, N)
        if self.perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self.perm = (epoch, torch.randperm(N, generator=g).tolist())
        self.pairs.set_epoch(epoch)
        for k in range(N):
            item = self.pairs[self.perm[1][(i + k) % N]]
            if item is not None:
                return dict(item, n=n)
        raise RuntimeError("no usable clip left in the data set "
                           "(see bad_clips.txt in the run folder)")


def sample_numbers(start, bs, rank=0, world=1):
    """A rank's sample numbers from `start` (train.py's sampler): step s: [s*W*bs, (s+1)*W*bs)."""
    while True:
        yield from range(start + rank * bs, start + (rank + 1) * bs)
        start += world * bs


def collate(items):
    """Drops None items (bad clips), stacks the rest (dicts stay dicts); None if none is left."""
    items = [x for x in items if x is not None]
    return torch.utils.data.default_collate(items) if items else None
