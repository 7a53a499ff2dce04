"""Every user mistake on the three command lines (train.py, cache.py, sample.py): exit status 2,
one line on stderr naming the file or option, no traceback, nothing written or overwritten. One
table; the scripts run in-process (their main/cli return the status), and once each as processes.
    python -m pytest -q tests/test_cli.py"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cache
import data
import sample
import train
from test_sample import _image, _video

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """Clips, an image, a reference, an empty folder, a hypernet checkpoint and one with a key
    missing, a run folder holding a checkpoint, a cache of the tiny model and one 'built by another
    model'."""
    import hypernet
    import model
    from PIL import Image
    w = tmp_path_factory.mktemp("cliworld")
    for cat in ("pan", "fade"):
        (w / "clips" / cat).mkdir(parents=True)
        for k in range(2):
            data.write_video(w / "clips" / cat / f"{k}.mp4", _video(12, seed=k))
    Image.fromarray((_image().permute(1, 2, 0) * 255).byte().numpy()).save(w / "img.png")
    data.write_video(w / "ref.mp4", _video(12))
    (w / "empty").mkdir()
    (w / "file.txt").write_text("x")
    dit = model.load_dit(tiny_model_dir / "transformer")
    torch.manual_seed(0)
    hypernet.save(w / "hn.safetensors", hypernet.Video2LoRA(dit, "tiny", a=8, b=4))
    sd = load_file(str(w / "hn.safetensors"))
    from safetensors import safe_open
    with safe_open(str(w / "hn.safetensors"), "pt") as fh:
        md = fh.metadata()
    save_file({k: v for k, v in sd.items() if not k.startswith("hypernet.head_A")},
              str(w / "nokeys.safetensors"), md)
    (w / "run").mkdir()
    shutil.copy(w / "nokeys.safetensors", w / "run" / "ckpt-000002.safetensors")
    torch.set_num_threads(1)
    cache.build_cache(tiny_model_dir, w / "clips", w / "cache", workers=0)
    shutil.copytree(w / "cache", w / "cache2")
    index = json.loads((w / "cache2" / "index.json").read_text())
    index["settings"]["vae"]["weights"] = "0" * 32  # as a cache built from another VAE records it
    (w / "cache2" / "index.json").write_text(json.dumps(index))
    (w / "ro").mkdir()
    os.chmod(w / "ro", 0o555)
    return w


def _train(w, m, *extra, out=None):
    return ["--model", str(m), "--data", str(w / "clips"), "--out", str(out or w / "new"),
            "--hypernet", "tiny", "--num-workers", "0", "--steps", "1", "--device", "cpu", *extra]


def _sample(w, m, *extra, out=None, paths=None):
    paths = paths or [str(w / "ref.mp4"), str(w / "img.png")]
    return [*paths, "--model", str(m), "--ckpt", str(w / "hn.safetensors"), "--out",
            str(out or w / "o.mp4"), "--steps", "1", "--device", "cpu", *extra]


NON_UTF8 = b"caf\xe9".decode(errors="surrogateescape")
# (script, case) -> (argv builder(world, model dir), text the error line must contain)
CASES = {
    ("train", "missing --data"): (lambda w, m: [*_train(w, m)[:3], str(w / "nowhere"),
                                                *_train(w, m)[4:]], "nowhere"),
    ("train", "empty --model"): (lambda w, m: _train(w, w / "empty"), "not a CogVideoX I2V folder"),
    ("train", "missing --cache"): (lambda w, m: _train(w, m, "--cache", w / "nocache"),
                                   "no index.json"),
    ("train", "run without --resume"): (lambda w, m: _train(w, m, out=w / "run"), "--resume"),
    ("train", "frames the model cannot take"): (lambda w, m: _train(w, m, "--frames", 17),
                                                "takes only"),
    ("train", "--lr nan"): (lambda w, m: _train(w, m, "--lr", "nan"), "--lr"),
    ("train", "--steps 0"): (lambda w, m: _train(w, m, "--steps", 0), "--steps"),
    ("train", "--caption-dropout 2"): (lambda w, m: _train(w, m, "--caption-dropout", 2),
                                       "--caption-dropout"),
    ("train", "unknown preset"): (lambda w, m: _train(w, m, "--hypernet", "huge"), "presets"),
    ("train", "--fsdp alone"): (lambda w, m: _train(w, m, "--fsdp"), "torchrun"),
    ("train", "--out is a file"): (lambda w, m: _train(w, m, out=w / "file.txt"), "not a folder"),
    ("train", "cache of another model"): (lambda w, m: _train(w, m, "--cache", w / "cache2"),
                                          "another VAE"),
    ("train", "checkpoint with missing keys"): (lambda w, m: _train(w, m, "--resume",
                                                                    out=w / "run"), "Missing key"),
    ("train", "missing required option"): (lambda w, m: ["--model", str(m)], "required"),
    ("cache", "missing --data"): (lambda w, m: ["--model", str(m), "--data", str(w / "nowhere"),
                                                "--out", str(w / "c")], "nowhere"),
    ("cache", "empty --model"): (lambda w, m: ["--model", str(w / "empty"), "--data",
                                               str(w / "clips"), "--out", str(w / "c")],
                                 "not a CogVideoX I2V folder"),
    ("cache", "--frames nan"): (lambda w, m: ["--model", str(m), "--data", str(w / "clips"),
                                              "--out", str(w / "c"),
                                              "--frames", "nan"], "--frames"),
    ("cache", "--out is a file"): (lambda w, m: ["--model", str(m), "--data", str(w / "clips"),
                                                 "--out", str(w / "file.txt")], "not a folder"),
    ("sample", "--guidance nan"): (lambda w, m: _sample(w, m, "--guidance", "nan"), "--guidance"),
    ("sample", "--steps 0"): (lambda w, m: _sample(w, m, "--steps", "0"), "--steps"),
    ("sample", "--seed -1"): (lambda w, m: _sample(w, m, "--seed", "-1"), "--seed"),
    ("sample", "--lora-scale inf"): (lambda w, m: _sample(w, m, "--lora-scale", "inf"),
                                     "--lora-scale"),
    ("sample", "--ref-start -1"): (lambda w, m: _sample(w, m, "--ref-start", "-1"), "--ref-start"),
    ("sample", "--ref-start past the end"): (lambda w, m: _sample(w, m, "--ref-start", "30"),
                                             "past its end"),
    ("sample", "ref weight nan"): (lambda w, m: _sample(w, m, "--ref", f"{w / 'ref.mp4'}:nan"),
                                   "weight"),
    ("sample", "--out .gif"): (lambda w, m: _sample(w, m, out=w / "o.gif"), ".mp4"),
    ("sample", "--out without extension"): (lambda w, m: _sample(w, m, out=w / "o"), ".mp4"),
    ("sample", "--out a folder"): (lambda w, m: _sample(w, m, out=w / "empty.mp4")
                                   if (w / "empty.mp4").mkdir() is None else None, "is a folder"),
    ("sample", "--save-lora a folder"): (lambda w, m: _sample(w, m, "--save-lora", w / "empty"),
                                         "--save-lora"),
    ("sample", "--export-lora no folder"): (lambda w, m: _sample(w, m, "--export-lora",
                                                                 w / "no" / "l.st"),
                                            "--export-lora"),
    ("sample", "non-UTF-8 prompt"): (lambda w, m: _sample(w, m, "--prompt", NON_UTF8), "UTF-8"),
    ("sample", "image then reference"): (lambda w, m: _sample(w, m, paths=[str(w / "img.png"),
                                                                           str(w / "ref.mp4")]),
                                         "reference video, then the image"),
    ("sample", "checkpoint with missing keys"): (lambda w, m: _sample(w, m, "--ckpt",
                                                                      w / "nokeys.safetensors"),
                                                 "Missing key"),
    ("sample", "--frames 0"): (lambda w, m: _sample(w, m, "--frames", "0"), "--frames"),
}
if NO_CUDA:
    CASES[("train", "--device cuda")] = (lambda w, m: _train(w, m) + ["--device", "cuda"],
                                         "not available")
    CASES[("sample", "--device cuda")] = (lambda w, m: _sample(w, m) + ["--device", "cuda"],
                                          "not available")
if os.geteuid() != 0:  # root writes into a 0555 folder anyway (and then so would the run)
    CASES[("sample", "read-only folder")] = (lambda w, m: _sample(w, m, out=w / "ro" / "o.mp4"),
                                             "cannot write")


def snapshot(*folders):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders
            for p in sorted(Path(f).rglob("*"))}


@pytest.mark.parametrize("script,case", list(CASES), ids=[f"{s}: {c}" for s, c in CASES])
def test_cli_error(capsys, world, tiny_model_dir, script, case):
    build, match = CASES[script, case]
    argv = [str(a) for a in build(world, tiny_model_dir)]
    before = snapshot(world, tiny_model_dir)
    entry = {"train": train.main, "cache": cache.main, "sample": sample.main}[script]
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        code = entry(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    err = capsys.readouterr().err.strip()
    lines = [l for l in err.splitlines() if not l.startswith(("note:", "warning:"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert match in lines[0] and "Traceback" not in err, err
    assert snapshot(world, tiny_model_dir) == before, "something was written or changed"


def test_scripts_exit_2(world, tiny_model_dir):
    """The same, as real processes: status 2 and exactly one stderr line."""
    for argv in (["train.py", *_train(world, world / "empty")],
                 ["cache.py", "--model", str(tiny_model_dir), "--data", str(world / "nowhere"),
                  "--out", str(world / "c")]):
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
    assert not (world / "new").exists() and not (world / "c").exists()


def _notes(capsys, argv):
    code = sample.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.err


def test_reference_span_and_ref_start(capsys, world, tiny_model_dir, tmp_path):
    """A reference longer than the model's frames: the CLI says which span it reads; --ref-start
    moves it."""
    long = tmp_path / "long.mp4"
    data.write_video(long, _video(24))  # 3 s at 8 fps; the tiny model reads 9 frames = 1.12 s
    err = _notes(capsys, _sample(world, tiny_model_dir, out=tmp_path / "a.mp4",
                                 paths=[str(long), str(world / "img.png")]))
    assert "lasts 3.00 s" in err and "using 0.00-1.12 s" in err and "--ref-start" in err, err
    err = _notes(capsys, _sample(world, tiny_model_dir, "--ref-start", "1.5",
                                 out=tmp_path / "b.mp4", paths=[str(long), str(world / "img.png")]))
    assert "using 1.50-2.62 s" in err, err
    assert sample.main(_sample(world, tiny_model_dir, "--ref-start", "2.5", out=tmp_path / "c.mp4",
                               paths=[str(long), str(world / "img.png")])) == 2
    assert "4 frames at 8 fps from 2.5 s on" in capsys.readouterr().err


def test_far_from_native_size_warns(capsys, world, tiny_model_dir, tmp_path):
    """--frames far from the model's size runs (RoPE models take any size) but says so first."""
    import model
    m = tmp_path / "rope"
    shutil.copytree(tiny_model_dir, m)
    cfg = json.loads((m / "transformer" / "config.json").read_text())
    cfg["use_learned_positional_embeddings"] = False
    (m / "transformer" / "config.json").write_text(json.dumps(cfg))
    f = next((m / "transformer").glob("*.safetensors"))
    sd = load_file(str(f))
    save_file({k: v for k, v in sd.items() if k != "patch_embed.pos_embedding"}, str(f))
    shutil.copy(world / "hn.safetensors", m / "hypernet.safetensors")
    argv = [str(world / "img.png"), "--no-ref", "--model", str(m), "--out", str(tmp_path / "o.mp4"),
            "--steps", "1", "--device", "cpu", "--frames"]
    err = _notes(capsys, argv + ["25"])
    assert "warning: 25x64x96" in err and "far from the 9x64x96" in err, err
    err = _notes(capsys, argv + ["17"])
    assert "warning" not in err, err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_follow_the_umask(tmp_path, umask):
    """Checkpoints, cache files and LoRA exports (all via common.save_safetensors) were 0600
    whatever the umask: teammates on a cluster could not read them; videos already followed it."""
    import common
    old = os.umask(umask)
    try:
        common.save_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {"format": "pt"})
        data.write_video(tmp_path / "v.mp4", _video(1))
    finally:
        os.umask(old)
    for f in ("x.safetensors", "v.mp4"):
        assert oct((tmp_path / f).stat().st_mode & 0o777) == oct(0o666 & ~umask), f


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to vary the encoder's default threads")
def test_same_frames_same_file(tmp_path):
    """The same frames must give the same file: x264's default thread count follows the CPUs the
    process may use and its output depends on it, so another machine (or taskset, a cgroup) wrote
    other pixels; and its AVX-512 code wrote other bytes on every run on an AMD EPYC."""
    import hashlib
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.interpolate(torch.rand(33, 3, 16, 24, generator=g), (192, 288),
                                        mode="bilinear")
    cpus, digests = os.sched_getaffinity(0), []
    try:
        for allowed in ({min(cpus)}, cpus):
            os.sched_setaffinity(0, allowed)
            written = data.write_video(tmp_path / "v.mp4", v).read_bytes()
            digests.append(hashlib.sha1(written).hexdigest())
    finally:
        os.sched_setaffinity(0, cpus)
    assert digests[0] == digests[1]
