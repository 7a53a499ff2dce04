"""The latent cache: each clip's VAE posterior and each caption's T5 embedding, encoded once.

    python cache.py --model CogVideoX-5b-I2V --data clips/ --out cache/  # frames/size: the model's
    torchrun --nproc_per_node 8 cache.py --model ... --data ... --out ...  # ranks split the clips

A safetensors file per clip and caption, so a run resumes; rank 0 indexes them for train.py."""
import hashlib
import json
import logging
import os
import shutil
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

import common
import data
import model
from vae import load_vae


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
    """Read side of a folder built by `python cache.py`."""

    def __init__(self, root):
        self.root, index = Path(root), Path(root) / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"--cache {root}: no index.json there (build it with `python cache.py`)")
        vars(self).update(json.loads(index.read_text()))  # settings, text_model, clips, texts

    def check(self, mdir):
        """ValueError unless the cache was built with this model's VAE and text encoder."""
        root, built = self.root, self.settings.get("model", "?")
        if "vae" not in self.settings:
            raise ValueError(f"--cache {root}: an older data.py built it and did not record the model: rebuild it")
        want, have = common.depends(mdir), dict(vae=self.settings["vae"], text=getattr(self, "text_model", None))
        if bad := [k for k in ("vae", "text") if have[k] != want[k]]:
            what = " and ".join({"vae": "VAE", "text": "text encoder/tokenizer"}[k] for k in bad)
            raise ValueError(f"--cache {root} was built with another {what} than --model {mdir} "
                             f"has (built from {built}): rebuild it (python cache.py) or pass it")

    def why_missing(self, clip):  # None when usable: a deleted source is fine, a changed one stale
        e = self.clips.get(_key(clip.path), {"bad": "not in the cache"})
        if e.get("bad") or _stamp(clip.path) in (e["stamp"], None):
            return e.get("bad") or None
        return "changed since it was cached (re-run cache.py)"

    def has(self, clip):
        return self.why_missing(clip) is None

    def latents(self, clip):
        """-> {"mean", "logvar"} bf16 [C,F',h,w] (VAE layout), "first": frame 0, uint8 [3,H,W]."""
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
            out.append((c, stamp, data.read_video(c.path, **kw)))
        except data.VideoError as e:
            out.append((c, stamp, str(e).removeprefix(f"{c.path}: ")))
    return out


@torch.no_grad()
def build_cache(model_dir, data_dir, out, frames=None, fps=8, height=None, width=None, batch=1,
                workers=2, tile=False, limit=None):
    """-> (usable clips, bad clips) in the index. frames/height/width default to the model's own."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out, model_dir, clips = Path(out), Path(model_dir), data.scan(data_dir)
    native, dep = common.model_sizes(model_dir), common.depends(model_dir)
    frames, height, width = frames or native[0], height or native[1], width or native[2]
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=24))  # for the barriers only
    dev = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    settings = dict(frames=frames, fps=fps, height=height, width=width, vae=dep["vae"])
    file = lambda kind, s: out / kind / f"{_key(s)}.safetensors"
    save = lambda f, t, **m: common.save_safetensors(f, t, {k: json.dumps(v) for k, v in m.items()})

    def done(c):  # encoded (or found bad) from this very file with these settings
        m = _meta(file("clips", c.path))
        return m.get("settings") == settings and _stamp(c.path) in (m["stamp"], None)

    if todo := [c for c in clips[rank::world] if not done(c)][:limit]:
        vae, bar = load_vae(model_dir / "vae", dtype, dev), tqdm(total=len(todo), desc=f"cache clips (rank {rank})")
        read = partial(_decode, frames=frames, fps=fps, height=height, width=width)
        for items in torch.utils.data.DataLoader(todo, batch, num_workers=workers, collate_fn=read):
            for c, s, v in items:
                if isinstance(v, str):
                    data.log.warning(f"warning: skipping {c.path}: {v}")
                    save(file("clips", c.path), {}, path=c.path, stamp=s, settings=settings, bad=v)
            if good := [(c, s, v) for c, s, v in items if torch.is_tensor(v)]:
                x = torch.stack([v for _, _, v in good]).transpose(1, 2)  # -> [B,3,F,H,W]
                mean, logvar = vae.encode(x.to(dev, dtype), tile=tile)
                for (c, s, v), m, lv in zip(good, mean, logvar):
                    first = ((v[0] + 1) * 127.5).round().to(torch.uint8)  # frame 0 as read
                    t = dict(mean=m.bfloat16().cpu(), logvar=lv.bfloat16().cpu(), first=first)
                    save(file("clips", c.path), t, path=c.path, stamp=s, settings=settings)
            bar.update(len(items))
        bar.close()
        del vae
    captions = sorted({c.caption for c in clips})[rank::world]
    if todo := [t for t in captions if _meta(file("texts", t)).get("model") != dep["text"]]:
        tok, t5 = model.Tokenizer(model_dir / "tokenizer"), model.load_t5(model_dir / "text_encoder", dtype, dev)
        for k in tqdm(range(0, len(todo), 8), desc=f"cache captions (rank {rank})"):
            for t, e in zip(todo[k:k + 8], t5(tok(todo[k:k + 8]).to(dev))):
                save(file("texts", t), {"text": e.bfloat16().cpu()}, caption=t, model=dep["text"])
        del t5
    if world > 1:
        dist.barrier()  # every rank's files are on disk
    meta = lambda kind: {f.stem: _meta(f) for f in sorted((out / kind).glob("*.safetensors"))}
    index = dict(settings=dict(settings, model=str(model_dir.resolve())), text_model=dep["text"],
                 texts={k: {"caption": m["caption"]} for k, m in meta("texts").items()
                        if m.get("model") == dep["text"]},
                 clips={k: {n: m[n] for n in ("path", "stamp", "bad") if n in m}
                        for k, m in meta("clips").items() if m.get("settings") == settings})
    if rank == 0:  # index what is on disk now, whichever rank (or earlier run) wrote it
        with common.atomic(out / "index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=1))
    bad = sum("bad" in e for e in index["clips"].values())
    if world > 1:
        dist.destroy_process_group()
    return len(index["clips"]) - bad, bad


def cli():
    p, num = common.Parser(description=__doc__, formatter_class=common.HelpFormatter), common.number
    arg = p.add_argument
    arg("--model", required=True, metavar="DIR", help="CogVideoX I2V folder (train.py's --model)")
    arg("--data", required=True, help="folder root/<category>/<clip>.<ext> (+ <clip>.txt caption) "
        "or a .csv/.jsonl manifest (video, caption, category)")
    arg("--out", required=True, metavar="DIR", help="the cache folder, for train.py --cache (an "
        "interrupted run resumes; a re-run encodes only what is missing or changed)")
    arg("--frames", type=num(int, 1), help="frames per clip (default: the model's, as train.py)")
    arg("--height", type=num(int, 16), help="default: the model's sample height, as train.py")
    arg("--width", type=num(int, 16), help="default: the model's sample width, as train.py")
    arg("--fps", type=num(float, 1e-3), default=8, help="frames read per second (train.py --fps)")
    arg("--batch", type=num(int, 1), default=1, help="clips per VAE encode")
    arg("--workers", type=num(int, 0), default=2, help="video decoding processes per rank")
    arg("--tile", action="store_true", help="tiled VAE encode (less memory, other numbers)")
    return p


def main(argv=None):
    a = cli().parse_args(argv)
    logging.basicConfig(format="%(message)s")
    out, made = Path(a.out), not Path(a.out).exists()
    try:  # every check that needs no model weights, before anything is written
        common.check_model_dir(a.model)
        n = len(data.scan(a.data))
        common.check_out_dir(out, "--out")
        good, bad = build_cache(a.model, a.data, out, a.frames, a.fps, a.height, a.width, a.batch, a.workers, a.tile)
    except (OSError, ValueError) as e:
        if made and out.is_dir() and not any(out.rglob("*.safetensors")):
            shutil.rmtree(out)  # only what this run made: empty clips/ texts/ folders
        return common.error_line(e)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"cache {out}: {good} clips, {bad} bad, of {n}")
        if not good:
            return common.error_line(f"no usable clip was cached from --data {a.data} (the reasons are above); check "
                                     "--frames/--fps (a clip needs frames/fps seconds) or the clips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
