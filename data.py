"""Video data for video2lora: PyAV reading/writing, datasets of (target, same-category reference)
pairs, and an on-disk cache of VAE posteriors and T5 embeddings.

Videos are [F,3,H,W] in [-1,1] as read; the cache keeps VAE.encode's output per clip in the VAE
layout [C,F',h,w]. Build a cache (under torchrun the ranks split the clips):
    python data.py cache --model CogVideoX-5b-I2V --data clips/ --out cache/
"""
import argparse
import csv
import hashlib
import json
import logging
import os
import random
from collections import namedtuple
from datetime import timedelta
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from lightlora import save_atomic

log = logging.getLogger("data")
VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".gif"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The --help style of sample.py, train.py and data.py: the module docstring (its example commands) as the
    description, and each flag's default after its help unless the default is unset (the help says what then)."""

    def _get_help_string(self, action):
        d = action.default
        return action.help if d is None or d is False or d == "" or d == [] else super()._get_help_string(action)


class VideoError(Exception):
    """A video or image that cannot be used; the message names the file and the reason."""


def _rgb(frame, height, width):
    """PyAV frame -> uint8 [3,height,width]: resize the short side to cover, centre-crop."""
    x = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None]  # channels-last view
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):  # antialias so 1080p does not alias; uint8 runs ~6x faster than float here
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[0, :, top:top + height, left:left + width]


def _to_float(x):  # in place after one allocation: fresh large allocations dominated the read time
    return x.float().div_(127.5).sub_(1)


def read_video(path, frames=49, fps=8, height=480, width=720, allow_short=False):
    """-> [frames,3,height,width] in [-1,1]. Frame i is the source frame on screen at time
    start + i/fps (the latest with pts <= it), so any source frame rate gives the same motion speed.
    allow_short=True pads a short video by repeating its last frame and returns (video, n_real)."""
    try:
        c = av.open(str(path))
        stream = c.streams.video[0]
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:  # missing, unreadable, corrupt, audio only
        raise VideoError(f"{path}: cannot open as a video ({e or 'no video stream'})") from None
    with c:
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        targets, picked, prev, t = None, [], None, 0.0
        try:
            for n, f in enumerate(c.decode(stream)):
                t = f.time if f.pts is not None else n / rate
                targets = targets or [t + i / fps for i in range(frames)]
                while len(picked) < frames and targets[len(picked)] < t - 1e-6:  # shown by the previous frame
                    picked.append(prev)
                if len(picked) == frames:
                    break  # past the last target: the rest need not be decoded
                prev = f
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed after {len(picked)} sampled frames ({e})") from None
        if prev is None:
            raise VideoError(f"{path}: no decodable frames")
        end = t + 1 / rate  # the last frame stays on screen for one frame period
        while len(picked) < frames and targets[len(picked)] < end - 1e-6:
            picked.append(prev)
        n_real = len(picked)
        if n_real < frames and not allow_short:
            raise VideoError(f"{path}: too short: {end - targets[0]:.2f} s at {rate:g} fps gives {n_real} frames "
                             f"at {fps:g} fps, needs {frames} ({frames / fps:.2f} s)")
        picked += [prev] * (frames - n_real)
        rgb = {id(f): f for f in picked}  # each distinct source frame converted once (low-fps sources repeat)
        rgb = {k: _rgb(f, height, width) for k, f in rgb.items()}
        video = _to_float(torch.stack([rgb[id(f)] for f in picked]))
    return (video, n_real) if allow_short else video


def read_image(path, height, width):
    """png/jpg/... (anything FFmpeg decodes; a video gives its first frame) -> [3,height,width] in [-1,1]."""
    return read_video(path, 1, 1, height, width)[0]


def write_video(path, video, fps=8, crf=18):
    """[F,3,H,W] float in [0,1] -> H.264 yuv420p file, via a temporary file and a rename.
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
            s.width, s.height, s.pix_fmt, s.options = x.shape[2], x.shape[1], "yuv420p", {"crf": str(crf)}
            for frame in x:
                c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            c.mux(s.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---- datasets: root/<category>/<clip>.<ext> (+ <clip>.txt caption) or a CSV/JSONL manifest ----
Clip = namedtuple("Clip", "path caption category")


def scan(path):
    """A folder root/<category>/<clip>.<ext> or a .csv/.jsonl manifest (columns video, caption,
    category; video paths relative to the manifest) -> list[Clip] in a stable order."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        txt = lambda v: v.with_suffix(".txt").read_text().strip() if v.with_suffix(".txt").is_file() else ""
        clips = [Clip(str(v), txt(v), d.name) for d in sorted(p for p in path.iterdir() if p.is_dir())
                 for v in sorted(d.iterdir()) if v.suffix.lower() in VIDEO_EXTS]
    elif (ext := path.suffix.lower()) in (".csv", ".jsonl") and path.is_file():
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh)) if ext == ".csv" else [json.loads(l) for l in fh if l.strip()]
        for n, r in enumerate(rows, 1):
            if not r.get("video") or r.get("category") is None:
                raise ValueError(f"{path}: row {n} needs 'video' and 'category' (has {sorted(r)})")
        clips = [Clip(str(path.parent / r["video"]), (r.get("caption") or "").strip(), str(r["category"]))
                 for r in rows]
    else:
        raise FileNotFoundError(f"data {path}: expected a folder root/<category>/<clip> or a .csv/.jsonl manifest")
    if not clips:
        raise ValueError(f"data {path}: no clips found (video extensions: {' '.join(sorted(VIDEO_EXTS))})")
    return clips


def pair(clips, i, seed, epoch, groups):
    """Reference for target i: another clip of its category, a pure function of (seed, epoch, i) so all
    workers, ranks and resumed runs agree (str seeds go through sha512, not PYTHONHASHSEED)."""
    others = [j for j in groups[clips[i].category] if j != i]
    return random.Random(f"{seed}:{epoch}:{i}").choice(others) if others else i


class VideoPairs(torch.utils.data.Dataset):
    """item i -> {"video", "ref", "caption", "index", "ref_index"}, or None when the target or its
    reference is unusable. Without a cache "video"/"ref" are [F,3,H,W] in [-1,1]; with one they are
    {"mean","logvar"} bf16 [C,F',h,w] (VAE layout), plus "text" [L,D] bf16 and "first" [3,H,W] (frame
    0 in [-1,1], bit-equal to read_video's). Each bad clip is logged once and listed in
    run_dir/bad_clips.txt (path TAB reason), which also tells other workers and ranks it was reported."""

    def __init__(self, clips, frames=49, fps=8, height=480, width=720, seed=0, cache=None, run_dir=None):
        self.clips, self.frames, self.fps, self.size, self.seed = clips, frames, fps, (height, width), seed
        self.cache, self.epoch, self.bad, self.groups = cache, 0, {}, {}
        self.bad_file = Path(run_dir) / "bad_clips.txt" if run_dir is not None else None
        for i, c in enumerate(clips):
            self.groups.setdefault(c.category, []).append(i)
        if single := sorted(k for k, v in self.groups.items() if len(v) == 1):
            log.warning(f"warning: {len(single)} categories have one clip, its own reference: {', '.join(single)}")
        want = dict(frames=frames, fps=fps, height=height, width=width)
        if cache is not None and {k: cache.settings[k] for k in want} != want:
            raise ValueError(f"cache {cache.root} was built with {cache.settings}, not {want}")

    def set_epoch(self, epoch):
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
        """{path: reason} of the clips found unusable so far, here or (via the file) in other processes."""
        lines = self.bad_file.read_text().splitlines() if self.bad_file and self.bad_file.is_file() else []
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


def collate(items):
    """Drop None items (bad clips) and stack the rest (dicts of tensors stay dicts); None if none is left."""
    items = [x for x in items if x is not None]
    return torch.utils.data.default_collate(items) if items else None


# ---- cache: one safetensors file per clip and per caption, each with its own metadata, so an interrupted
# run resumes from what is on disk; index.json is rebuilt from those files by rank 0 at the end ----
def _key(s):
    return hashlib.sha1(s.encode()).hexdigest()[:24]


def _stamp(path):
    st = os.stat(path) if os.path.exists(path) else None
    return st and {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _meta(path):  # a missing, foreign or damaged file counts as absent (and is rewritten)
    try:
        with safe_open(str(path), "pt") as fh:
            return {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
    except Exception:
        return {}


class Cache:
    """Read side of a folder built by `python data.py cache`."""

    def __init__(self, root):
        self.root = Path(root)
        if not (self.root / "index.json").is_file():
            raise FileNotFoundError(f"cache {root}: no index.json (build it with `python data.py cache`)")
        vars(self).update(json.loads((self.root / "index.json").read_text()))  # settings, clips, texts

    def why_missing(self, clip):  # -> None when cached and usable (a deleted source is fine, a changed one stale)
        e = self.clips.get(_key(clip.path))
        return ("not in the cache" if e is None else e.get("bad") or (None if _stamp(clip.path) in (e["stamp"], None)
                else "changed since it was cached (re-run data.py cache)"))

    def has(self, clip):
        return self.why_missing(clip) is None

    def latents(self, clip):
        """-> {"mean", "logvar"} bf16 [C,F',h,w] (VAE layout) and "first": frame 0 as uint8 [3,H,W]."""
        return load_file(str(self.root / "clips" / f"{_key(clip.path)}.safetensors"))

    def has_text(self, caption):
        return _key(caption) in self.texts

    def text(self, caption):
        return load_file(str(self.root / "texts" / f"{_key(caption)}.safetensors"))["text"]


def _decode(clips, **kw):  # the DataLoader's collate_fn, so decoding runs in its workers
    out = []
    for c in clips:
        stamp = _stamp(c.path)  # before reading, so a change during the read is caught next time
        try:
            out.append((c, stamp, read_video(c.path, **kw)))
        except VideoError as e:
            out.append((c, stamp, str(e).removeprefix(f"{c.path}: ")))
    return out


@torch.no_grad()
def build_cache(model_dir, data, out, frames=49, fps=8, height=480, width=720, batch=1, workers=2, tile=False,
                limit=None):
    import model as M  # the frozen encoders are needed only here
    import vae as V
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=24))  # for the barriers only
    dev = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out, model_dir, clips = Path(out), Path(model_dir), scan(data)
    settings = dict(frames=frames, fps=fps, height=height, width=width, model=str(model_dir.resolve()))
    file = lambda kind, s: out / kind / f"{_key(s)}.safetensors"

    save = lambda f, tensors, **meta: save_atomic(tensors, f, {k: json.dumps(v) for k, v in meta.items()})

    def done(c):  # encoded (or found bad) from this very file with these settings
        m = _meta(file("clips", c.path))
        return m.get("settings") == settings and _stamp(c.path) in (m["stamp"], None)

    if todo := [c for i, c in enumerate(clips) if i % world == rank and not done(c)][:limit]:
        vae, bar = V.load_vae(model_dir / "vae", dtype, dev), tqdm(total=len(todo), desc=f"cache clips (rank {rank})")
        for items in torch.utils.data.DataLoader(todo, batch_size=batch, num_workers=workers, collate_fn=partial(
                _decode, frames=frames, fps=fps, height=height, width=width)):
            for c, s, v in items:
                if isinstance(v, str):
                    log.warning(f"warning: skipping {c.path}: {v}")
                    save(file("clips", c.path), {}, path=c.path, stamp=s, settings=settings, bad=v)
            if good := [(c, s, v) for c, s, v in items if torch.is_tensor(v)]:
                x = torch.stack([v for _, _, v in good]).transpose(1, 2)  # [B,F,3,H,W] -> VAE [B,3,F,H,W]
                mean, logvar = vae.encode(x.to(dev, dtype), tile=tile)
                for (c, s, v), m, lv in zip(good, mean, logvar):  # frame 0 back to the uint8 it was made from
                    first = ((v[0] + 1) * 127.5).round().to(torch.uint8)
                    save(file("clips", c.path), dict(mean=m.bfloat16().cpu(), logvar=lv.bfloat16().cpu(), first=first),
                         path=c.path, stamp=s, settings=settings)
            bar.update(len(items))
        bar.close()
        del vae
    captions = sorted({c.caption for c in clips})
    if todo := [t for j, t in enumerate(captions)
                if j % world == rank and _meta(file("texts", t)).get("model") != settings["model"]]:
        tok, t5 = M.Tokenizer(model_dir / "tokenizer"), M.load_t5(model_dir / "text_encoder", dtype, dev)
        for k in tqdm(range(0, len(todo), 8), desc=f"cache captions (rank {rank})"):
            for t, e in zip(todo[k:k + 8], t5(tok(todo[k:k + 8]).to(dev))):
                save(file("texts", t), {"text": e.bfloat16().cpu()}, caption=t, model=settings["model"])
        del t5
    if world > 1:
        dist.barrier()  # every rank's files are on disk
    if rank == 0:  # index what is on disk now, whichever rank (or earlier run) wrote it
        meta = lambda kind: {f.stem: _meta(f) for f in sorted((out / kind).glob("*.safetensors"))}
        index = dict(settings=settings, texts={k: {"caption": m["caption"]} for k, m in meta("texts").items()
                                               if m.get("model") == settings["model"]},
                     clips={k: {n: m[n] for n in ("path", "stamp", "bad") if n in m} for k, m in meta("clips").items()
                            if m.get("settings") == settings})
        (out / "index.json.tmp").write_text(json.dumps(index, indent=1))
        os.replace(out / "index.json.tmp", out / "index.json")
        bad = sum("bad" in e for e in index["clips"].values())
        print(f"cache {out}: {len(index['clips']) - bad} clips, {bad} bad, {len(index['texts'])} captions")
    if world > 1:
        dist.destroy_process_group()


def cli():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="command")
    c = sub.add_parser("cache", formatter_class=HelpFormatter,
                       help="encode every clip (VAE) and caption (T5) once, for train.py --cache",
                       description="Encode every clip (VAE posterior) and caption (T5) once into --out, for train.py "
                       "--cache.\nUnder torchrun the ranks split the work; a re-run encodes only what is missing or "
                       "changed.")
    c.add_argument("--model", required=True, metavar="DIR", help="CogVideoX I2V folder (the one train.py gets)")
    c.add_argument("--data", required=True, help="folder root/<category>/<clip>.<ext> (+ <clip>.txt caption) or a "
                   ".csv/.jsonl manifest (video, caption, category)")
    c.add_argument("--out", required=True, metavar="DIR", help="cache folder, for train.py --cache")
    c.add_argument("--frames", type=int, help="frames per clip (default: the model's sample_frames, as train.py)")
    c.add_argument("--fps", type=float, default=8, help="frames read per second of video (as train.py)")
    c.add_argument("--height", type=int, help="default: the model's sample_height x 8, as train.py")
    c.add_argument("--width", type=int, help="default: the model's sample_width x 8, as train.py")
    c.add_argument("--batch", type=int, default=1, help="clips per VAE encode")
    c.add_argument("--workers", type=int, default=2, help="video decoding processes per rank")
    c.add_argument("--tile", action="store_true", help="tiled VAE encode (less memory, slightly different numbers)")
    return p


def model_sizes(model_dir):
    """(frames, height, width) the model was made for: the defaults of train.py, sample.py and the cache."""
    import model
    c = model.DiTConfig.from_dict(model.read_config(Path(model_dir) / "transformer"))
    return c.sample_frames, c.sample_height * 8, c.sample_width * 8  # every CogVideoX VAE is /8 in space


if __name__ == "__main__":
    a = cli().parse_args()
    logging.basicConfig(format="%(message)s")
    frames, height, width = (x or d for x, d in zip((a.frames, a.height, a.width), model_sizes(a.model)))
    build_cache(a.model, a.data, a.out, frames, a.fps, height, width, a.batch, a.workers, a.tile)
