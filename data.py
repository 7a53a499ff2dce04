"""Video data for video2lora: PyAV reading/writing, datasets with same-category reference pairs,
and an on-disk cache of VAE posteriors and T5 embeddings.

Videos here are [F,3,H,W] (frame-major, as read); the cache stores VAE.encode's output per clip in
the VAE layout [C,F',h,w]. Build a cache (also under torchrun, ranks split the clips):
    python data.py cache --model CogVideoX-5b-I2V --data clips/ --out cache/
"""
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F


class VideoError(Exception):
    """A video or image that cannot be used; the message names the file and the reason."""


def _cover_crop(x, height, width):
    """uint8 [N,h,w,3] -> float [N,3,height,width] in [-1,1]: resize the short side to cover, centre-crop."""
    x = x.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):  # antialias so downscaling 1080p does not alias
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 127.5 - 1).clamp(-1, 1)


def _open(path):
    if not Path(path).is_file():
        raise VideoError(f"{path}: no such file")
    try:
        c = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot open ({e})") from None
    if not c.streams.video:
        c.close()
        raise VideoError(f"{path}: no video stream")
    return c


def read_video(path, frames=49, fps=8, height=480, width=720, allow_short=False):
    """-> [frames,3,height,width] in [-1,1]. Frame i is the source frame shown at time start + i/fps
    (the latest with pts <= that time), so any source frame rate gives the same motion speed.
    allow_short=True pads a short video by repeating its last frame and returns (video, n_real)."""
    with _open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        targets, picked, prev, t = None, [], None, None
        try:
            for n, f in enumerate(c.decode(stream)):
                t = f.time if f.pts is not None else n / rate
                if targets is None:
                    targets = [t + i / fps for i in range(frames)]
                # a target strictly before this frame is shown by the previous frame
                while len(picked) < frames and targets[len(picked)] < t - 1e-6:
                    picked.append(prev)
                if len(picked) == frames:
                    break  # past the last target: no need to decode the rest
                prev = f
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed after {len(picked)} sampled frames ({e})") from None
        if prev is None:
            raise VideoError(f"{path}: no decodable frames")
        end = t + 1 / rate  # the last frame stays on screen for one frame period
        while len(picked) < frames and targets[len(picked)] < end - 1e-6:
            picked.append(prev)
        n_real = len(picked)
        if n_real < frames:
            if not allow_short:
                raise VideoError(f"{path}: too short: {end - targets[0]:.2f} s at {rate:g} fps gives "
                                 f"{n_real} frames at {fps:g} fps, needs {frames} ({frames / fps:.2f} s)")
            picked += [prev] * (frames - n_real)
        # convert each distinct source frame once (a low-fps source repeats frames)
        arrays = {}
        for f in picked:
            if id(f) not in arrays:
                arrays[id(f)] = _cover_crop(torch.from_numpy(f.to_ndarray(format="rgb24"))[None], height, width)[0]
        video = torch.stack([arrays[id(f)] for f in picked])
    return (video, n_real) if allow_short else video


def read_image(path, height, width):
    """png/jpg/... (anything FFmpeg decodes as a single frame) -> [3,height,width] in [-1,1]."""
    with _open(path) as c:
        try:
            f = next(c.decode(video=0))
        except (av.FFmpegError, StopIteration) as e:
            raise VideoError(f"{path}: cannot decode image ({e or 'no frames'})") from None
        return _cover_crop(torch.from_numpy(f.to_ndarray(format="rgb24"))[None], height, width)[0]


def write_video(path, video, fps=8, crf=18):
    """[F,3,H,W] float in [0,1] -> H.264 (yuv420p) file, written to a temporary file then renamed.
    yuv420p needs even sizes: an odd height/width is padded by repeating the last row/column."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"write_video {path}: expected [F,3,H,W], got {tuple(video.shape)}")
    H, W = video.shape[-2:]
    x = F.pad(video.float(), (0, W % 2, 0, H % 2), mode="replicate") if H % 2 or W % 2 else video
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        with av.open(str(tmp), "w") as c:
            s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            s.width, s.height, s.pix_fmt = x.shape[2], x.shape[1], "yuv420p"
            s.options = {"crf": str(crf)}
            for frame in x:
                c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            c.mux(s.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
