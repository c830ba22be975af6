"""One run per run folder, and runs that stop cleanly on Ctrl-C / SIGTERM.

- the folder is locked (fcntl.flock on RUN_DIR/.lock) for the run's life: a second run on it
  fails at once, naming the holder's pid;
- the first Ctrl-C or SIGTERM lets the step in progress end, writes a checkpoint and prints a
  ``--resume`` command; that command, run as printed, ends bitwise where an uninterrupted run
  ends (same thread count);
- temporary files of a killed write are removed when the folder is next opened.

Every run is tiny (a 12 x 12 grid, hidden 32): a few ms per step.
"""
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from nca_fast.train import cli_main, train
from nca_fast.training import run_folder, trainer as T
from nca_fast.training.options import TrainOptions

TINY = dict(size=8, pad=2, hidden=32, batch=4, pool_size=16, rollout_min=6, rollout_max=10,
            experiment="persist", backend="torch", device="cpu", seed=5)
TINY_ARGS = ["--size", "8", "--pad", "2", "--hidden", "32", "--batch", "4", "--pool-size", "16",
             "--rollout", "6", "10", "--experiment", "persist", "--backend", "torch",
             "--device", "cpu", "--seed", "5", "--threads", "1"]
BIN = pathlib.Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    # The printed commands start with `python` or `nca-fast`: this environment's, first on PATH.
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _hold_lock(folder):
    """A process holding the run folder's lock (as a running training would), and its pid."""
    code = ("import sys, time, pathlib; from nca_fast.training.run_folder import RunFolderLock; "
            "RunFolderLock(pathlib.Path(sys.argv[1])).acquire(); print('held', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


# ----------------------------------------------------------------------------- the lock
def test_second_run_on_a_locked_folder_fails_at_once_naming_the_pid(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = _hold_lock(run)
    try:
        start = time.monotonic()
        rc = cli_main([*TINY_ARGS, "--steps", "2", "--out", str(run), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"pid {holder.pid}" in err and str(run) in err and "--out" in err
        assert time.monotonic() - start < 30
        assert not (run / "checkpoint.safetensors").exists()        # nothing was written
    finally:
        holder.kill()
        holder.wait()
    # The OS released the killed holder's lock: the folder is usable again.
    assert cli_main([*TINY_ARGS, "--steps", "2", "--out", str(run), "--no-progress"]) == 0


def test_resume_of_a_locked_folder_is_refused(tmp_path, capsys):
    train(TrainOptions(**TINY, steps=1, save_every=1), run_dir=tmp_path)
    holder = _hold_lock(tmp_path)
    try:
        rc = cli_main(["--resume", str(tmp_path), "--steps", "2"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and f"pid {holder.pid}" in err and "--resume" in err
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_held_for_the_run_and_released_after(tmp_path):
    seen = []

    def probe(trainer):
        with pytest.raises(run_folder.RunFolderBusy, match=f"pid {os.getpid()}"):
            run_folder.RunFolderLock(tmp_path).acquire()
        seen.append(trainer.step)

    train(TrainOptions(**TINY, steps=2, save_every=1), run_dir=tmp_path, on_step=probe)
    assert seen == [1, 2]
    assert not (tmp_path / ".lock").exists()
    run_folder.RunFolderLock(tmp_path).acquire().release()


def test_run_folder_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = cli_main([*TINY_ARGS, "--steps", "1", "--out", str(blocker / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"--out {blocker / 'run'}" in err and "cannot create the folder" in err


def test_run_folder_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    import tempfile
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o500)
    if os.geteuid() == 0:
        # root writes into a read-only folder anyway: make the write check itself fail
        monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")))
    try:
        rc = cli_main([*TINY_ARGS, "--steps", "1", "--out", str(run)])
    finally:
        run.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"--out {run}: cannot write in the folder" in err


# ----------------------------------------------------------------------------- interrupts
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_the_printed_resume_works(tmp_path, sig):
    steps = 300
    whole = train(TrainOptions(**TINY, steps=steps, save_every=1000), run_dir=tmp_path / "whole")

    run = tmp_path / "cut"
    # --save-every 1000: no checkpoint exists before the signal; the one written on the signal
    # is what the printed resume command continues from.
    cmd = [sys.executable, "-m", "nca_fast.train", *TINY_ARGS, "--steps", str(steps),
           "--save-every", "1000", "--out", str(run), "--no-progress", "--log-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ck = (run / "checkpoint.safetensors")
    info = run_folder.read_checkpoint(ck)[1]
    assert 3 <= info["step"] < steps
    assert f"at step {info['step']}; checkpoint saved" in err
    printed = err.strip().splitlines()[-1].split("continue with: ", 1)[1]
    assert printed == f"python -m nca_fast.train --resume {shlex.quote(str(run))}"

    r = subprocess.run(shlex.split(printed), capture_output=True, text=True, env=_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (run / "loss.csv").read_text().strip().splitlines()[1:]
    assert [float(row.split(",")[1]) for row in rows] == whole.losses


def test_second_ctrl_c_stops_at_once_a_repeated_sigterm_does_not():
    stop = T.GracefulStop()
    stop._handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT
    stop._handle(signal.SIGTERM, None)          # torchrun's answer to the same Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    term = T.GracefulStop()
    term._handle(signal.SIGTERM, None)
    term._handle(signal.SIGTERM, None)          # a scheduler's repeated SIGTERM
    assert term.signum == signal.SIGTERM


def test_stop_request_checkpoints_the_current_step(tmp_path):
    class Requested:
        signum = None

    o = TrainOptions(**TINY, steps=10, save_every=100)
    tr = T.Trainer(o, tmp_path)
    tr.stop = Requested()

    def at_step(trainer):
        if trainer.step == 3:
            Requested.signum = signal.SIGTERM

    with pytest.raises(T.TrainingInterrupted, match="SIGTERM at step 3"):
        tr.run(on_step=at_step)
    assert run_folder.read_checkpoint(tmp_path / "checkpoint.safetensors")[1]["step"] == 3


def test_orphaned_temporary_files_are_removed_when_the_folder_is_opened(tmp_path):
    train(TrainOptions(**TINY, steps=1, save_every=1), run_dir=tmp_path)
    orphans = [tmp_path / ".checkpoint.safetensors.0123abcd.tmp.safetensors",
               tmp_path / ".loss.csv.deadbeef.tmp.csv"]
    for p in orphans:
        p.write_bytes(b"\0" * 1024)          # what a SIGKILL during atomic_write leaves
    keep = [tmp_path / ".notes", tmp_path / "mine.tmp"]
    for p in keep:
        p.write_text("the user's")
    assert cli_main(["--resume", str(tmp_path), "--steps", "2", "--no-progress"]) == 0
    assert not any(p.exists() for p in orphans)
    assert all(p.read_text() == "the user's" for p in keep)
