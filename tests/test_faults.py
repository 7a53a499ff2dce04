"""train.py under faults: an error or a signal ends every process of the run within seconds
(DataLoader workers > 0, one process, torchrun/gloo); a stopped run saves and exits 128 + signal.
    python -m pytest -q tests/test_faults.py"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data
from test_train import ARGS, ENV, ROOT, moving


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("fclips")
    for kind in ("pan", "fade"):
        (root / kind).mkdir()
        for k in range(2):
            data.write_video(root / kind / f"{k}.mp4", moving(kind, k))
    return root


def leftovers(tag):
    """Processes still alive whose command line names `tag` (the run folder): the ranks and their
    DataLoader workers (forked, so they keep the parent's command line)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag in cmd and state != "Z":
            found.append((int(pid), cmd.replace("\0", " ")[:200]))
    return found


def start(model_dir, data_dir, out, *args, nproc=1):
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(model_dir), "--data",
           str(data_dir), "--out", str(out), *ARGS, *map(str, args)]
    if nproc > 1:
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd[1:2] = [*torchrun, cmd[1]]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, out, timeout):
    """-> (exit status, log); kills what is left (and fails) if the run outlives `timeout` or
    leaves processes."""
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid, _ in leftovers(str(out)):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        pytest.fail(f"train.py still running after {timeout} s:\n{proc.communicate()[0][-3000:]}")
    deadline = time.time() + 10  # workers follow their parent (DataLoader's watchdog: every 5 s)
    while (left := leftovers(str(out))) and time.time() < deadline:
        time.sleep(0.2)
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}\n{log[-3000:]}"
    return proc.returncode, log


def test_error_in_loop_with_workers_ends_the_run(tiny_model_dir, tmp_path):
    """An exception in the training loop with 2 DataLoader workers (here: every clip is unreadable)
    printed its traceback, then waited forever at exit for the workers (which ignored SIGTERM)."""
    (tmp_path / "bad" / "a").mkdir(parents=True)
    for name in ("x.mp4", "y.mp4"):
        (tmp_path / "bad" / "a" / name).write_bytes(os.urandom(3000))
    proc = start(tiny_model_dir, tmp_path / "bad", tmp_path / "run", "--steps", 3,
                 "--num-workers", 2)
    code, log = finish(proc, tmp_path / "run", 90)
    assert code == 1 and "Traceback" in log and "no usable clip left" in log, log[-3000:]


def test_error_in_one_rank_ends_every_rank(tiny_model_dir, clips, tmp_path):
    """torchrun, 2 ranks (gloo), 1 worker each: rank 1 fails at step 2 while rank 0 waits for it in
    the all-reduce; the whole run ends non-zero within seconds."""
    proc = start(tiny_model_dir, clips, tmp_path / "run", "--steps", 4, "--num-workers", 1,
                 "--debug-raise-at", "2:1", nproc=2)
    t0 = time.time()
    code, log = finish(proc, tmp_path / "run", 150)
    assert code != 0 and "step 2 fails on rank 1" in log, log[-3000:]
    print(f"torchrun ended {time.time() - t0:.0f} s after its start")


def _signal_when(proc, prefix, sig):
    log = []
    for line in proc.stdout:
        log.append(line)
        if line.startswith(prefix):
            os.kill(proc.pid, sig)
            break
    return "".join(log)


def test_signal_during_setup_stops_at_once(tiny_model_dir, clips, tmp_path):
    """A signal while the models load used to be noted for 'after this step' and the run went on;
    now it stops (128 + signal), saves nothing and leaves no run folder."""
    run = tmp_path / "run"
    proc = start(tiny_model_dir, clips, run, "--steps", 3, "--num-workers", 2)
    head = _signal_when(proc, "loading ", signal.SIGTERM)
    code, log = finish(proc, run, 60)
    log = head + log
    assert code == 128 + signal.SIGTERM and "SIGTERM: stopping now" in log, log[-3000:]
    assert not run.exists(), sorted(run.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_in_loop_saves_and_exits_nonzero(tiny_model_dir, clips, tmp_path, sig):
    run = tmp_path / "run"
    proc = start(tiny_model_dir, clips, run, "--steps", 50, "--num-workers", 2)
    head = _signal_when(proc, "step 1 |", sig)
    code, log = finish(proc, run, 90)
    log = head + log
    assert code == 128 + sig, log[-3000:]
    ckpts = sorted(run.glob("ckpt-*.safetensors"))
    said = f"stopped by {sig.name}" in log and f"exit status {128 + sig}" in log
    assert len(ckpts) == 1 and said, log[-3000:]
