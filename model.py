"""CogVideoX backbone: the DiT (every official variant), the T5 v1.1 text encoder, its tokenizer and
the loaders that read the official Hugging Face folders (`transformer/`, `text_encoder/`, `tokenizer/`).

Layout: DiT latents are `B F C H W` (frames before channels, as the diffusers pipelines hold them).
Numbers follow diffusers 0.42 / transformers 5 (see /work/shared/cogvideox-spec.md §3, §6, §9);
tests/test_model.py checks them on tiny random models:  python -m pytest -q tests/test_model.py
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

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


def read_state_dict(folder, device="cpu"):
    """All tensors of a folder: one `*.safetensors` file, or the shards an `*.safetensors.index.json` names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    device = str(device)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{folder} holds several index files ({_few(p.name for p in indexes)}); keep one")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        sd = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{indexes[0]} names the shard {shard}, which is missing in {folder}")
            sd.update(load_file(folder / shard, device=device))
        absent = set(weight_map) - set(sd)
        if absent:
            raise ValueError(f"{indexes[0]} lists {len(absent)} keys absent from its shards: {_few(absent)}")
        return sd
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return load_file(files[0], device=device)
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
