"""train.py end to end on tiny models (CPU, fp32, gloo): DDP == one process, SIGTERM + exact resume,
bad clips, cache == no cache, small checkpoints, non-finite steps, FSDP2 + activation checkpointing.
    python -m pytest -q tests/test_train.py"""
import io
import json
import os
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cache as cache_lib
import data
import train as train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def moving(kind, k, frames=9, h=64, w=96):
    """[F,3,H,W] in [0,1]: a square that pans, zooms (grows) or fades (blinks); k: its colour, x."""
    v = torch.full((frames, 3, h, w), 0.1 + 0.1 * k)
    for f in range(frames):
        s = 12 + (3 * f if kind == "zoom" else 0)
        x = 8 + (6 * f if kind == "pan" else 0) + 4 * k
        v[f, k % 3, 16:16 + s, x:x + s] = 0.9 if kind != "fade" else f / frames
    return v


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for kind in ("pan", "zoom", "fade"):
        (root / kind).mkdir()
        for k in range(2):
            data.write_video(root / kind / f"{k}.mp4", moving(kind, k))
            (root / kind / f"{k}.txt").write_text(f"a square {kind} video" if k else "")
    (root / "pan" / "corrupt.mp4").write_bytes(os.urandom(3000))
    data.write_video(root / "zoom" / "short.mp4", moving("zoom", 0, frames=3))
    return root


ARGS = ["--hypernet", "tiny", "--num-workers", "0", "--warmup", "2", "--lr", "1e-3",
        "--a", "8", "--b", "4"]


def train(model_dir, data_dir, out, *args, nproc=1, check=True, **kw):
    """train.py with these flags: in this process (one thread, as the subprocesses'
    OMP_NUM_THREADS=1), or under torchrun with nproc > 1. -> (returncode, stdout, stderr)."""
    argv = ["--model", str(model_dir), "--data", str(data_dir), "--out", str(out), *ARGS,
            *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *argv]
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300, **kw)
    else:
        out_, err_ = io.StringIO(), io.StringIO()
        threads, rng = torch.get_num_threads(), torch.get_rng_state()
        torch.set_num_threads(1)
        try:
            with redirect_stdout(out_), redirect_stderr(err_):
                code = train_py.main(argv)
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
        r = SimpleNamespace(returncode=code, stdout=out_.getvalue(), stderr=err_.getvalue())
    if check and r.returncode != 0:
        raise AssertionError(f"train.py {' '.join(argv)} failed ({r.returncode}):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def losses(run):
    return [json.loads(l)["loss"] for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt):
    return {k: v for k, v in load_file(str(ckpt)).items() if k.startswith(("hypernet.", "lora."))}


def close(a, b, tol):
    assert a.keys() == b.keys()
    err = {k: ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a}
    worst = max(err, key=err.get)
    print(f"max relative error {err[worst]:.2e} ({worst})")
    assert err[worst] <= tol, f"{worst}: relative error {err[worst]:.2e} > {tol}"


@pytest.fixture(scope="module")
def cache(tiny_model_dir, clips, tmp_path_factory):
    out, threads = tmp_path_factory.mktemp("cache"), torch.get_num_threads()
    # tiny convolutions: a second (shared, busy) core only adds OpenMP spinning
    torch.set_num_threads(1)
    try:
        cache_lib.build_cache(tiny_model_dir, clips, out, frames=9, height=64, width=96, workers=0)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def straight(tiny_model_dir, clips, cache, tmp_path_factory):
    """One process, batch 2, 4 steps = one epoch, so every clip is visited (from the cache: the tiny
    VAE is the slow part on CPU): the reference the other tests compare to."""
    out = tmp_path_factory.mktemp("straight")
    r = train(tiny_model_dir, clips, out, "--steps", 4, "--batch-size", 2, "--save-every", 1,
              "--keep", 3, "--cache", cache)
    return out, r.stdout + r.stderr


def test_log_and_checkpoints(straight, tiny_model_dir):
    out, log = straight
    lines = [l for l in log.splitlines() if l.startswith("step ")]  # --log-every 10: first, last
    assert [l.split(" |")[0] for l in lines] == ["step 1", "step 4"], log
    assert all(" | loss " in l and " videos/s | mem " in l for l in lines), log
    summary = next(l for l in log.splitlines() if l.startswith("done: "))
    assert summary.startswith("done: step 4 of 4 in "), summary
    assert str(out / "ckpt-000004.safetensors") in summary, summary
    assert str(out / "metrics.jsonl") in summary and str(out / "bad_clips.txt") in summary, summary
    kept = [p.name for p in sorted(out.glob("ckpt-*"))]
    assert kept == [f"ckpt-00000{i}.safetensors" for i in (2, 3, 4)]
    assert len(losses(out)) == 4 and all(l > 0 for l in losses(out))
    bad = (out / "bad_clips.txt").read_text()
    assert "corrupt.mp4" in bad and "short.mp4" in bad, bad
    # no frozen weight in the checkpoint: the trainable part, its AdamW moments and small extras
    ckpt = out / "ckpt-000004.safetensors"
    with safe_open(str(ckpt), "pt") as fh:
        keys = list(fh.keys())
        meta = json.loads(fh.metadata()["meta"])
    assert meta["step"] == 4 and meta["samples"] == 8 and meta["epoch"] == 1
    assert meta["args"]["batch_size"] == 2
    assert all(k.startswith(("hypernet.", "lora.", "optim.", "rng.")) for k in keys), keys
    n_bytes = sum(v.numel() * 4 for v in weights(ckpt).values())
    assert ckpt.stat().st_size < 3 * n_bytes + 100_000
    dit_keys = set(load_file(str(next((tiny_model_dir / "transformer").glob("*.safetensors")))))
    assert not dit_keys & {k.split(".", 1)[1] for k in keys}


def test_sample_reads_training_checkpoint(straight, tiny_model_dir):
    """sample.py --ckpt takes what training wrote, with no conversion."""
    import sample
    ckpt = straight[0] / "ckpt-000004.safetensors"
    pipe = sample.load(tiny_model_dir, torch.float32, "cpu", ckpt=ckpt)
    close({k: v for k, v in pipe.v2l.state_dict().items()}, weights(ckpt), 0)


def test_no_cache_same_losses(straight, tiny_model_dir, clips, tmp_path):
    """Reading and encoding videos every step == the cache (which holds bf16 posteriors and T5
    outputs, hence 1e-3 and not 1e-6); bad clips are skipped and listed on this path too."""
    out, _ = straight
    train(tiny_model_dir, clips, tmp_path, "--steps", 2, "--batch-size", 2)
    assert losses(tmp_path) == pytest.approx(losses(out)[:2], rel=1e-3)
    assert "corrupt.mp4" in (tmp_path / "bad_clips.txt").read_text()


def test_ddp_equals_one_process(straight, tiny_model_dir, clips, cache, tmp_path):
    """2 processes x batch 1 == 1 process x batch 2: same samples and noise, averaged gradients."""
    out, _ = straight
    train(tiny_model_dir, clips, tmp_path, "--steps", 3, "--batch-size", 1, "--cache", cache,
          "--num-workers", 1, nproc=2)
    assert losses(tmp_path) == pytest.approx(losses(out)[:3], rel=1e-5)
    last = "ckpt-000003.safetensors"
    close(weights(tmp_path / last), weights(out / last), 1e-4)


def test_sigterm_then_resume_is_exact(straight, tiny_model_dir, clips, cache, tmp_path):
    """SIGTERM (preemption) saves at the end of the step and exits 143 (128 + 15); --resume then
    gives the uninterrupted run's losses and weights exactly, past a half-written temporary file and
    a damaged checkpoint."""
    out, _ = straight
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(tiny_model_dir), "--data",
           str(clips), "--out", str(tmp_path), "--cache", str(cache), *ARGS, "--steps", "3",
           "--batch-size", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("step 1 |"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(log)
    ckpts = sorted(tmp_path.glob("ckpt-*.safetensors"))
    saved = len(ckpts) == 1 and ckpts[0].name < "ckpt-000003"
    assert "SIGTERM" in "".join(log) and saved, "".join(log)
    (tmp_path / "ckpt-000003.safetensors.tmp").write_bytes(b"\0" * 100)  # a kill during a save
    (tmp_path / "ckpt-000099.safetensors").write_bytes(b"garbage")  # e.g. a full disk
    # --a is the model's (the checkpoint's wins), --log-every is not: both named, run stays exact
    r = train(tiny_model_dir, clips, tmp_path, "--steps", 3, "--batch-size", 2, "--cache", cache,
              "--resume", "--a", 16, "--log-every", 1)
    assert f"resumed from {ckpts[0]}" in r.stdout, r.stdout
    assert "the checkpoint's model is kept: --a 8 (given 16)" in r.stdout, r.stdout
    assert "changed from the checkpoint's: --log-every 10 -> 1" in r.stdout, r.stdout
    assert losses(tmp_path) == losses(out)[:3]
    last = "ckpt-000003.safetensors"
    close(weights(tmp_path / last), weights(out / last), 0)


def test_nonfinite_steps(tiny_model_dir, clips, cache, tmp_path, monkeypatch):
    calls, step_loss = [], train_py.step_loss

    def nan_at_2_4_5(*a):  # the loss of steps 2, 4 and 5 made NaN
        calls.append(1)
        loss = step_loss(*a)
        return loss * float("nan") if len(calls) in (2, 4, 5) else loss
    monkeypatch.setattr(train_py, "step_loss", nan_at_2_4_5)
    r = train(tiny_model_dir, clips, tmp_path, "--steps", 8, "--save-every", 1, "--keep", 10,
              "--cache", cache, "--max-bad-steps", 2, check=False)
    assert r.returncode == 1 and "non-finite steps in a row" in r.stdout, r.stdout + r.stderr
    rec = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped"] for x in rec] == [0, 1, 1, 2, 3]
    ckpt = lambda i: tmp_path / f"ckpt-00000{i}.safetensors"
    close(weights(ckpt(2)), weights(ckpt(1)), 0)
    kept = sorted(p.name for p in tmp_path.glob("ckpt-*"))
    assert kept == [f"ckpt-00000{i}.safetensors" for i in (1, 2, 3, 4)]


def test_fsdp2_checkpointing(straight, tiny_model_dir, clips, cache, tmp_path):
    """FSDP2 on CPU/gloo shards the frozen DiT per block; recomputed activations change nothing."""
    out, _ = straight
    train(tiny_model_dir, clips, tmp_path, "--steps", 3, "--batch-size", 1, "--cache", cache,
          "--fsdp", "--checkpointing", nproc=2)
    assert losses(tmp_path) == pytest.approx(losses(out)[:3], rel=1e-5)
    last = "ckpt-000003.safetensors"
    close(weights(tmp_path / last), weights(out / last), 1e-4)
