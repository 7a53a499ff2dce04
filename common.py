"""What train.py, sample.py and cache.py share: argparse style (one-line errors, checked numbers),
checks of common arguments (--device, --model, video size, output paths), what a model folder is
(native size, the fingerprint cache.py records) and the one atomic write all file writers use.
"""
import argparse
import hashlib
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

import model


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the module docstring (its example commands) as the description, and
    each flag's default after its help unless the default is unset (the help says what then)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == "" or d == []:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line and exit status 2, like every other user error of the
    scripts (argparse's own prints the whole usage block first)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def exit_status(fn, *args, errors=()):
    """fn(*args) -> 0; a user's mistake (OSError, ValueError, `errors`) -> 2, one line on stderr."""
    try:
        return fn(*args) or 0
    except (OSError, ValueError, *errors) as e:
        return error_line(e)


def error_line(e):
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2


def number(typ=int, lo=None, hi=None):
    """argparse type: a finite int/float in [lo, hi] (float("nan") parses, and `nan > 1` is False:
    --guidance nan would silently turn guidance off)."""
    def parse(s):
        try:
            x = typ(s)
        except ValueError:
            what = "an integer" if typ is int else "a number"
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
        if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
            rng = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{s} is out of range (a finite number {rng})")
        return x
    return parse


def weighted(s):
    """"file" or "file:0.5" (a weight for blending with other references and LoRAs) -> (path, w)."""
    path, _, w = s.rpartition(":")
    if not path or Path(s).exists() or not Path(path).exists():
        return s, 1.0
    try:
        return path, number(float, 1e-12)(w)
    except argparse.ArgumentTypeError:
        msg = f"{s}: the weight after ':' must be a finite number > 0, got {w!r}"
        raise ValueError(msg) from None


def check_device(name):
    """-> the torch device for --device (default: cuda if there is one); ValueError lists those."""
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device (cpu, cuda, cuda:N)") from None
    n = torch.cuda.device_count() if dev.type == "cuda" else 1
    if dev.type not in ("cpu", "cuda") or (dev.index or 0) >= n:
        have = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())])
        raise ValueError(f"--device {name}: not available on this machine (have: {have})")
    return dev


def check_model_dir(d, option="--model"):
    """FileNotFoundError unless `d` has an I2V folder's parts: before a minute on 5B weights."""
    if not Path(d).is_dir():
        raise FileNotFoundError(f"no model at {d}/: pass {option} the folder of a CogVideoX I2V "
                                "model")
    parts = ("transformer/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
             "scheduler/scheduler_config.json")
    for sub in parts:
        if not (Path(d) / sub).exists():
            raise FileNotFoundError(f"{option} {d}: not a CogVideoX I2V folder (no {sub}; expected "
                                    "the layout of THUDM/CogVideoX-5b-I2V)")


def model_sizes(model_dir):
    """(frames, height, width) the model was made for: what the scripts default to."""
    cfg = model.read_config(Path(model_dir) / "transformer")
    vcfg = model.read_config(Path(model_dir) / "vae")
    s = 2 ** (len(vcfg.get("block_out_channels", (128, 256, 256, 512))) - 1)
    h, w = cfg.get("sample_height", 60) * s, cfg.get("sample_width", 90) * s
    return cfg.get("sample_frames", 49), h, w


def video_size(cfg, native, frames=None, height=None, width=None, step=8):
    """(frames, height, width) a DiT config `cfg` can take, the native ones for what is not given;
    ValueError otherwise. Frames are step*k+1: sample.py decodes 8k+1 (the VAE's 9-frame chunk,
    then 8-frame ones); training encodes 4k+1."""
    frames, height, width = frames or native[0], height or native[1], width or native[2]
    size = "x".join(map(str, (frames, height, width)))
    if frames < 1 or (frames - 1) % step:
        raise ValueError(f"frames must be {step}k+1 (1, {step + 1}, {2 * step + 1}, ...), "
                         f"got {frames}")
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        bad = width if 0 < height and height % 16 == 0 else height
        raise ValueError(f"height and width must be multiples of 16 (VAE /8, 2x2 patches), got "
                         f"{height}x{width}: instead of {bad}, a multiple of 16 such as "
                         f"{max(16, bad // 16 * 16)}")
    if cfg.use_learned_positional_embeddings and (frames, height, width) != native:
        own = "x".join(map(str, native))
        raise ValueError(f"this model's learned positional embedding only takes {own} "
                         f"(frames x height x width), got {size}: the model takes only its own "
                         "size")
    if cfg.patch_size_t and (height > native[1] or width > native[2]):  # 1.5: the RoPE table's size
        raise ValueError(f"{height}x{width} exceeds this model's {native[1]}x{native[2]} position "
                         "grid")
    return frames, height, width


def model_size(model_dir, frames=None, height=None, width=None, step=8):
    """video_size for the model in a folder -> ((frames, height, width), native size)."""
    cfg = model.DiTConfig.from_dict(model.read_config(Path(model_dir) / "transformer"))
    native = model_sizes(model_dir)
    return video_size(cfg, native, frames, height, width, step), native


def check_outputs(*outs):
    """(option, file or None) of files to write: OSError/ValueError before any work for a folder,
    a missing folder, an unwritable place, or two options naming the same file."""
    outs = [(option, f) for option, f in outs if f]
    for option, f in outs:
        if Path(f).is_dir():
            raise IsADirectoryError(f"{option} {f}: is a folder; give a file name")
        if not Path(f).resolve().parent.is_dir():
            raise FileNotFoundError(f"{option} {f}: its folder does not exist")
        check_writable(f, option)
    if len({Path(f).resolve() for _, f in outs}) < len(outs):
        raise ValueError(f"{', '.join(o for o, _ in outs)} must be different files")


def check_out_dir(path, option):
    """OSError unless `path` is a folder we can create or write in."""
    if Path(path).exists() and not Path(path).is_dir():
        raise NotADirectoryError(f"{option} {path}: exists and is not a folder")
    check_writable(Path(path) / "x", option)


def check_writable(path, option):
    """OSError unless we could create (or replace) `path`: not a folder, and its nearest existing
    folder is writable. Run before any work, so a bad output path costs nothing."""
    path = Path(os.path.abspath(path))
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        raise NotADirectoryError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: cannot write in {parent} (choose another path)")


def fingerprint(folder):
    """sha256 of a model folder's files: json/model files whole; for a weight file its size, its
    safetensors header (names, dtypes, shapes, offsets) and 16 evenly spaced 64 KiB pieces of its
    data. Another or retrained model changes it; ~1 MB read per file, not T5-XXL's 9.5 GB."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(f.name.encode())
        size = f.stat().st_size
        with open(f, "rb") as fh:
            if f.suffix != ".safetensors" or size < 2 ** 21:
                h.update(fh.read())
                continue
            n = int.from_bytes(fh.read(8), "little")  # 8-byte header length, JSON header, data
            h.update(str(size).encode() + fh.read(n))
            for i in range(16):
                fh.seek(8 + n + (size - 8 - n - 65536) * i // 15)
                h.update(fh.read(65536))
    return h.hexdigest()[:32]


def depends(model_dir):
    """What cache.py's tensors are a function of: {"vae", "text"}: configs, weight fingerprints."""
    d = Path(model_dir)
    part = lambda sub: dict(config=model.read_config(d / sub), weights=fingerprint(d / sub))
    text = dict(part("text_encoder"), tokenizer=fingerprint(d / "tokenizer"))
    return dict(vae=part("vae"), text=text)


@contextmanager
def atomic(path):
    """Yields a temporary path beside `path` (same suffix, for writers that pick the format by it)
    and renames it over `path` once written: readers never see half a file, a crash keeps the old
    one. Named per process, so no two writers share it; made 0666 & ~umask (safetensors: 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        umask = os.umask(0o022)  # reading it means setting it (no threads here); put back at once
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(path, tensors, metadata):
    with atomic(path) as tmp:
        sd = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(sd, str(tmp), metadata=metadata)
