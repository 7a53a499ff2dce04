"""Video data for video2lora: PyAV reading/writing, datasets with same-category reference pairs,
and an on-disk cache of VAE posteriors and T5 embeddings.

Videos here are [F,3,H,W] (frame-major, as read); the cache stores VAE.encode's output per clip in
the VAE layout [C,F',h,w]. Build a cache (also under torchrun, ranks split the clips):
    python data.py cache --model CogVideoX-5b-I2V --data clips/ --out cache/
"""
import argparse
import csv
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm


class VideoError(Exception):
    """A video or image that cannot be used; the message names the file and the reason."""


def _cover_crop(x, height, width):
    """uint8 [N,h,w,3] -> uint8 [N,3,height,width]: resize the short side to cover, centre-crop."""
    x = x.permute(0, 3, 1, 2)  # a channels-last view, which is what the fast uint8 kernel wants
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):  # antialias so downscaling 1080p does not alias; uint8 is ~6x faster than float
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[:, :, top:top + height, left:left + width]


def _to_float(x):  # uint8 -> [-1,1], in place after the one allocation (large fresh allocations are slow)
    return x.float().div_(127.5).sub_(1)


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
        video = _to_float(torch.stack([arrays[id(f)] for f in picked]))
    return (video, n_real) if allow_short else video


def read_image(path, height, width):
    """png/jpg/... (anything FFmpeg decodes as a single frame) -> [3,height,width] in [-1,1]."""
    with _open(path) as c:
        try:
            f = next(c.decode(video=0))
        except (av.FFmpegError, StopIteration) as e:
            raise VideoError(f"{path}: cannot decode image ({e or 'no frames'})") from None
        return _to_float(_cover_crop(torch.from_numpy(f.to_ndarray(format="rgb24"))[None], height, width)[0])


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


# ---------------------------------------------------------------------------------------------
# Datasets: root/<category>/<clip>.<ext> (+ <clip>.txt caption) or a CSV/JSONL manifest
# ---------------------------------------------------------------------------------------------
VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".gif"}
log = logging.getLogger("data")


@dataclass(frozen=True)
class Clip:
    path: str
    caption: str
    category: str


def scan(path):
    """A folder root/<category>/<clip>.<ext> or a .csv/.jsonl manifest (columns video, caption,
    category; video paths relative to the manifest) -> list[Clip], in a stable order."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        clips = [Clip(str(v), v.with_suffix(".txt").read_text().strip() if v.with_suffix(".txt").is_file() else "",
                      d.name)
                 for d in sorted(p for p in path.iterdir() if p.is_dir())
                 for v in sorted(d.iterdir()) if v.suffix.lower() in VIDEO_EXTS]
    elif path.suffix.lower() in (".csv", ".jsonl"):
        with open(path, newline="") as fh:
            rows = (list(csv.DictReader(fh)) if path.suffix.lower() == ".csv"
                    else [json.loads(line) for line in fh if line.strip()])
        clips = []
        for n, r in enumerate(rows, 1):
            if not r.get("video") or r.get("category") is None:
                raise ValueError(f"{path}: row {n} needs 'video' and 'category' (has {sorted(r)})")
            clips.append(Clip(str(path.parent / r["video"]), (r.get("caption") or "").strip(), str(r["category"])))
    elif not path.exists():
        raise FileNotFoundError(f"data {path} does not exist")
    else:
        raise ValueError(f"data {path}: expected a folder root/<category>/<clip> or a .csv/.jsonl manifest")
    if not clips:
        raise ValueError(f"data {path}: no clips found (video extensions: {' '.join(sorted(VIDEO_EXTS))})")
    return clips


def pair(clips, i, seed, epoch, groups):
    """Reference for target i: another clip of its category, a pure function of (seed, epoch, i) so
    every worker/rank and a resumed run agree. A category with one clip pairs it with itself."""
    others = [j for j in groups[clips[i].category] if j != i]
    # str seeds go through sha512 in `random`, independent of PYTHONHASHSEED
    return random.Random(f"{seed}:{epoch}:{i}").choice(others) if others else i


class VideoPairs(torch.utils.data.Dataset):
    """item i -> {"video", "ref", "caption", "index", "ref_index"} (+ "text" [L,D] with a cache),
    or None when the target or its reference is unusable. Without a cache "video"/"ref" are
    [F,3,H,W] in [-1,1]; with one they are {"mean","logvar"} bf16 [C,F',h,w] (VAE layout).
    Bad clips are logged once and listed in run_dir/bad_clips.txt (shared by workers and ranks)."""

    def __init__(self, clips, frames=49, fps=8, height=480, width=720, seed=0, cache=None, run_dir=None):
        self.clips, self.frames, self.fps, self.size, self.seed, self.cache = clips, frames, fps, (height, width), seed, cache
        self.epoch, self.bad = 0, {}
        self.bad_file = Path(run_dir) / "bad_clips.txt" if run_dir is not None else None
        self.groups = {}
        for i, c in enumerate(clips):
            self.groups.setdefault(c.category, []).append(i)
        single = sorted(k for k, v in self.groups.items() if len(v) == 1)
        if single:
            log.warning(f"warning: {len(single)} categories have a single clip, which is its own reference: "
                        + ", ".join(single))
        want = dict(frames=frames, fps=fps, height=height, width=width)
        if cache is not None and {k: cache.settings[k] for k in want} != want:
            raise ValueError(f"cache {cache.root} was built with {cache.settings}, "
                             f"not frames={frames} fps={fps} height={height} width={width}")

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.clips)

    def _mark_bad(self, clip, reason):
        if clip.path in self.bad:
            return
        self.bad[clip.path] = reason
        if self.bad_file is not None:
            if self.bad_file.is_file() and any(l.split("\t")[0] == clip.path for l in self.bad_file.read_text().splitlines()):
                return  # another worker or rank already reported it
            with open(self.bad_file, "a") as fh:
                fh.write(f"{clip.path}\t{reason}\n")
        log.warning(f"warning: skipping {clip.path}: {reason}")

    def bad_clips(self):
        """{path: reason} of every clip found unusable so far, in this process or (via the file) any other."""
        out = dict(self.bad)
        if self.bad_file is not None and self.bad_file.is_file():
            out.update(l.split("\t", 1) for l in self.bad_file.read_text().splitlines() if "\t" in l)
        return out

    def _load(self, clip):
        if self.cache is None:
            try:
                return read_video(clip.path, self.frames, self.fps, *self.size)
            except VideoError as e:
                return self._mark_bad(clip, str(e).removeprefix(f"{clip.path}: "))
        if not self.cache.has(clip):
            return self._mark_bad(clip, self.cache.why_missing(clip))
        mean, logvar = self.cache.latents(clip)
        return {"mean": mean, "logvar": logvar}

    def __getitem__(self, i):
        j = pair(self.clips, i, self.seed, self.epoch, self.groups)
        clip = self.clips[i]
        video = self._load(clip)
        ref = self._load(self.clips[j]) if video is not None else None
        if video is None or ref is None:
            return None
        out = {"video": video, "ref": ref, "caption": clip.caption, "index": i, "ref_index": j}
        if self.cache is not None:
            if not self.cache.has_text(clip.caption):
                return self._mark_bad(clip, f"caption not in cache: {clip.caption[:60]!r}")
            out["text"] = self.cache.text(clip.caption)
        return out


def collate(items):
    """Drop None items (bad clips) and stack the rest; None if nothing is left."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    stack = lambda v: ({k: torch.stack([x[k] for x in v]) for k in v[0]} if isinstance(v[0], dict) else torch.stack(v))
    out = {k: stack([x[k] for x in items]) for k in ("video", "ref", "text") if k in items[0]}
    out["caption"] = [x["caption"] for x in items]
    out["index"] = torch.tensor([x["index"] for x in items])
    out["ref_index"] = torch.tensor([x["ref_index"] for x in items])
    return out


# ---------------------------------------------------------------------------------------------
# Cache: one small safetensors file per clip (VAE mean/logvar) and per caption (T5), each carrying
# its own metadata, so an interrupted run resumes by looking at what is on disk; index.json is
# rebuilt from those files by rank 0 at the end.
# ---------------------------------------------------------------------------------------------
def _key(s):
    return hashlib.sha1(s.encode()).hexdigest()[:24]


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _save(path, tensors, meta):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.to(torch.bfloat16).contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def _meta(path):
    try:
        with safe_open(str(path), "pt") as fh:
            return {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
    except Exception:  # a foreign or damaged file counts as absent and is rewritten
        return None


class Cache:
    """Read side of a cache folder built by `python data.py cache`."""

    def __init__(self, root):
        self.root = Path(root)
        if not (self.root / "index.json").is_file():
            raise FileNotFoundError(f"cache {root}: no index.json (build it with `python data.py cache`)")
        d = json.loads((self.root / "index.json").read_text())
        self.settings, self.clips, self.texts = d["settings"], d["clips"], d["texts"]

    def has(self, clip):
        e = self.clips.get(_key(clip.path))
        s = _stamp(clip.path)  # a deleted source is fine (train from the cache alone); a changed one is not
        return e is not None and "bad" not in e and (s is None or s == e["stamp"])

    def why_missing(self, clip):
        e = self.clips.get(_key(clip.path))
        return ("not in cache" if e is None else e["bad"] if "bad" in e
                else "changed since it was cached (re-run data.py cache)")

    def latents(self, clip):
        t = load_file(str(self.root / "clips" / f"{_key(clip.path)}.safetensors"))
        return t["mean"], t["logvar"]

    def has_text(self, caption):
        return _key(caption) in self.texts

    def text(self, caption):
        return load_file(str(self.root / "texts" / f"{_key(caption)}.safetensors"))["text"]


def _decode(clips, **kw):
    """Runs in DataLoader workers (as collate_fn): [(clip, stamp, video or error string)]."""
    out = []
    for c in clips:
        stamp = _stamp(c.path)  # taken before reading so a change during the read is caught next time
        try:
            out.append((c, stamp, read_video(c.path, **kw)))
        except VideoError as e:
            out.append((c, stamp, str(e)))
    return out


def build_cache(model_dir, data, out, frames=49, fps=8, height=480, width=720, batch=1, workers=2,
                tile=False, limit=None):
    import model as M  # the frozen encoders are needed only to build a cache
    import vae as V
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=24))  # only used for one barrier
    dev = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out, model_dir = Path(out), Path(model_dir)
    for sub in ("clips", "texts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    settings = dict(frames=frames, fps=fps, height=height, width=width, model=str(model_dir.resolve()))
    clips = scan(data)

    def done(c):  # encoded from this very file with these settings (or found bad with them)
        m = _meta(out / "clips" / f"{_key(c.path)}.safetensors")
        return m is not None and m["settings"] == settings and (m["stamp"] == _stamp(c.path) or _stamp(c.path) is None)

    todo = [c for i, c in enumerate(clips) if i % world == rank and not done(c)][:limit]
    if todo:
        vae = V.load_vae(model_dir / "vae", dtype, dev)
        loader = torch.utils.data.DataLoader(todo, batch_size=batch, num_workers=workers, collate_fn=partial(
            _decode, frames=frames, fps=fps, height=height, width=width))
        bar = tqdm(total=len(todo), desc=f"cache clips (rank {rank})", unit="clip")
        for items in loader:
            good = [(c, s, v) for c, s, v in items if torch.is_tensor(v)]
            for c, s, v in items:
                if not torch.is_tensor(v):
                    log.warning(f"warning: skipping {v}")
                    _save(out / "clips" / f"{_key(c.path)}.safetensors", {}, dict(
                        path=c.path, stamp=s, settings=settings, bad=v.removeprefix(f"{c.path}: ")))
            if good:
                x = torch.stack([v for _, _, v in good]).transpose(1, 2).to(dev, dtype)  # [B,F,3,H,W] -> VAE [B,3,F,H,W]
                with torch.no_grad():
                    mean, logvar = vae.encode(x, tile=tile)
                for (c, s, _), m, lv in zip(good, mean, logvar):
                    _save(out / "clips" / f"{_key(c.path)}.safetensors", {"mean": m, "logvar": lv},
                          dict(path=c.path, stamp=s, settings=settings))
            bar.update(len(items))
        bar.close()
        del vae
    captions = sorted({c.caption for c in clips})
    todo = [t for j, t in enumerate(captions) if j % world == rank
            and (_meta(out / "texts" / f"{_key(t)}.safetensors") or {}).get("model") != settings["model"]]
    if todo:
        tok, t5 = M.Tokenizer(model_dir / "tokenizer"), M.load_t5(model_dir / "text_encoder", dtype, dev)
        for k in tqdm(range(0, len(todo), max(batch, 8)), desc=f"cache captions (rank {rank})"):
            chunk = todo[k:k + max(batch, 8)]
            with torch.no_grad():
                emb = t5(tok(chunk).to(dev))
            for t, e in zip(chunk, emb):
                _save(out / "texts" / f"{_key(t)}.safetensors", {"text": e}, dict(caption=t, model=settings["model"]))
        del t5
    if world > 1:
        dist.barrier()
    if rank == 0:  # the index lists what is on disk now, so it is right whichever rank did the work
        index = {"settings": settings, "clips": {}, "texts": {}}
        for f in sorted((out / "clips").glob("*.safetensors")):
            m = _meta(f)
            if m is not None and m["settings"] == settings:
                index["clips"][f.stem] = {k: m[k] for k in ("path", "stamp", "bad") if k in m}
        for f in sorted((out / "texts").glob("*.safetensors")):
            m = _meta(f)
            if m is not None and m.get("model") == settings["model"]:
                index["texts"][f.stem] = {"caption": m["caption"]}
        tmp = out / f"index.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, out / "index.json")
        bad = sum("bad" in e for e in index["clips"].values())
        print(f"cache {out}: {len(index['clips']) - bad} clips, {bad} bad, {len(index['texts'])} captions")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="video2lora data tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="encode every clip (VAE) and caption (T5) once")
    c.add_argument("--model", required=True, help="CogVideoX I2V folder (vae/ text_encoder/ tokenizer/)")
    c.add_argument("--data", required=True, help="folder root/<category>/<clip> or .csv/.jsonl manifest")
    c.add_argument("--out", required=True)
    c.add_argument("--frames", type=int, default=49)
    c.add_argument("--fps", type=float, default=8)
    c.add_argument("--height", type=int, default=480)
    c.add_argument("--width", type=int, default=720)
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--workers", type=int, default=2, help="decoding processes per rank")
    c.add_argument("--tile", action="store_true", help="tiled VAE encode (less memory, slightly different numbers)")
    a = p.parse_args()
    logging.basicConfig(format="%(message)s")
    build_cache(a.model, a.data, a.out, a.frames, a.fps, a.height, a.width, a.batch, a.workers, a.tile)
