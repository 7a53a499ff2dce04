"""The README stays true: its CPU walkthrough runs as written (fewer clips and steps), its Python
API and diffusers examples run on what the walkthrough wrote, and each script's --help gives every
flag a help line, its default and its choices."""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cache
import common
import sample

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def readme_block(after, lang):
    """The first ```lang code block after the line containing `after`."""
    text = (ROOT / "README.md").read_text()
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, text.index(after))
    return m.group(1)


def shorten(text, subs):
    for old, new in subs:  # each must still be there: a README edit must come with an edit here
        assert old in text, f"the README no longer has {old!r}"
        text = text.replace(old, new)
    return text


def commands(block):
    """bash lines -> argv lists (comments dropped, backslash continuations joined)."""
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(l) for l in lines if l.strip() and not l.lstrip().startswith("#")]


def _frames(path):
    import av
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_walkthrough_and_examples(tmp_path, monkeypatch):
    walk = f"{tmp_path}/"
    block = shorten(readme_block("<!-- walkthrough", "bash"), [
        ("--n 4", "--n 1"), ("--steps 1500", "--steps 2"), ("--save-every 500", "--save-every 1"),
        ("ckpt-001500", "ckpt-000002"), ("walk/", walk)])
    out = {}
    for argv in commands(block):
        assert argv[0] == "python", argv
        if argv[1] == "sample.py":
            argv += ["--steps", "2"]
        r = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(argv)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        out.setdefault(argv[1], []).append(r.stdout)
    assert len(list((tmp_path / "clips").glob("*/*.mp4"))) == 17  # one clip of each seen category
    size = common.model_sizes(ROOT / "assets")  # (9, 128, 128): the cache's default, as train.py
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert tuple(index["settings"][k] for k in ("frames", "height", "width")) == size
    log = out["train.py"][0]
    assert "step 1 |" in log and "step 2 |" in log and "done: step 2 of 2" in log, log
    assert f"last checkpoint {tmp_path}/run/ckpt-000002.safetensors" in log, log
    last = out["sample.py"][0].strip().splitlines()[-1]
    assert last.startswith(f"wrote {walk}out.mp4 ({size[0]}x{size[1]}x{size[2]}, 8 fps), "
                           f"{walk}fade.safetensors")
    assert " s | " in last, last
    assert _frames(tmp_path / "out.mp4").shape == _frames(tmp_path / "out2.mp4").shape == (*size, 3)

    monkeypatch.chdir(ROOT)  # examples use assets/ and the walkthrough's files, as a reader would
    api = shorten(readme_block("## Python API", "python"), [
        ("steps=50", "steps=2"), ("ckpt-001500", "ckpt-000002"), ("walk/", walk)])
    exec(compile(api, "README: Python API", "exec"), {})
    assert _frames(tmp_path / "api.mp4").shape == (*size, 3)
    diff = shorten(readme_block("## Reusable LoRAs and diffusers", "python"), [
        ("num_inference_steps=50", "num_inference_steps=2"), ("walk/", walk)])
    exec(compile(diff, "README: diffusers", "exec"), {})
    assert _frames(tmp_path / "diffusers.mp4").shape == (*size, 3)


def _parsers():
    import train
    return {"sample.py": sample.cli(), "train.py": train.p, "cache.py": cache.cli()}


@pytest.mark.parametrize("name", ["sample.py", "train.py", "cache.py"])
def test_help_shows_every_default_and_choice(name):
    p = _parsers()[name]
    text = p.format_help()
    assert p.formatter_class is common.HelpFormatter
    for a in p._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        assert a.help, f"{name}: {a.option_strings or a.dest} has no help line"
        d, shown = a.default, p._get_formatter()._expand_help(a)  # as --help prints it
        assert " ".join(shown.split()) in " ".join(text.split())
        if not (d is None or d is False or d == "" or d == []):
            assert shown.endswith(f"(default: {d})"), (name, shown)
        if a.choices:
            assert "{" + ",".join(a.choices) + "}" in text, (name, a.dest)
    if name == "sample.py":
        assert p.format_usage().rstrip().endswith("[ref.mp4] img.png")
    if name == "train.py":
        assert "{default,tiny,toy}" in text and "--log-every LOG_EVERY" in text


def test_cache_and_train_sizes_are_the_models(tiny_model_dir):
    """cache.py's defaults (common.model_sizes) = what train.py and sample.py take."""
    import torch
    sizes = sample.load(tiny_model_dir, torch.float32, "cpu").sizes()
    assert common.model_sizes(tiny_model_dir) == sizes == (9, 64, 96)
