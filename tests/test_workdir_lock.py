"""One trainer per workdir (simple_diffusion/workdir_lock.py), on a local disk and on
a ``gs://`` path served from memory (etils epath's fsspec backend)."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations import memory
import pytest

from simple_diffusion import workdir_lock

REPO = pathlib.Path(__file__).resolve().parent.parent


class _MemoryGcs(memory.MemoryFileSystem):
    """fsspec's in-memory filesystem under the ``gs://`` scheme (its own store)."""
    protocol = ("gs", "gcs")
    root_marker = ""
    cachable = False
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.strip("/")


@pytest.fixture
def memory_gs(monkeypatch, tmp_path):
    """Routes every ``epath.Path('gs://...')`` to a fresh in-memory filesystem,
    through epath's fsspec backend (the one it uses for gs:// without TensorFlow).
    The cwd is an empty tmp dir, to check nothing lands in a local ``gs:`` folder."""
    fs = _MemoryGcs()
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]

    class Backend(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
        def fs(self, path):
            return fs

    gs_backend = Backend()
    original = gpath._GPath._backend  # pylint: disable=protected-access
    monkeypatch.setattr(gpath._GPath, "_backend", property(  # pylint: disable=protected-access
        lambda self: gs_backend if self._uri_scheme == "gs" else original.fget(self)))
    monkeypatch.chdir(tmp_path)
    yield fs
    assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was written to the local disk"


def _write(path, **fields):
    info = dict(host=socket.gethostname(), pid=os.getpid(), started=time.time(),
                heartbeat=time.time(), token="someone-else", command="train")
    info.update(fields)
    epath.Path(path).write_text(json.dumps(info))


@pytest.mark.parametrize("kind", ["local", "gs"])
def test_lock_refuses_a_live_holder_and_releases(kind, tmp_path, request):
    if kind == "gs":
        request.getfixturevalue("memory_gs")
        workdir = epath.Path("gs://bucket/run")
    else:
        workdir = epath.Path(tmp_path / "run")
    workdir.mkdir(parents=True)
    lock = workdir_lock.WorkdirLock(str(workdir), settle_seconds=0.01).acquire()
    info = json.loads((workdir / "LOCK").read_text())
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
    assert info["started_utc"].endswith("UTC")
    with pytest.raises(workdir_lock.WorkdirLockedError) as e:
        workdir_lock.WorkdirLock(str(workdir), settle_seconds=0.01).acquire()
    msg = str(e.value)
    assert "\n" not in msg
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in msg
    assert "delete" in msg and str(workdir / "LOCK") in msg
    lock.check()
    lock.release()
    assert not (workdir / "LOCK").exists()
    workdir_lock.WorkdirLock(str(workdir), settle_seconds=0.01).acquire().release()


@pytest.mark.parametrize("kind", ["local", "gs"])
def test_stale_lock_is_taken_over_with_a_warning(kind, tmp_path, request, caplog):
    if kind == "gs":
        request.getfixturevalue("memory_gs")
        workdir = epath.Path("gs://bucket/run")
    else:
        workdir = epath.Path(tmp_path / "run")
    workdir.mkdir(parents=True)
    # Another host, fresh heartbeat: refused.
    _write(workdir / "LOCK", host="other-host", pid=1)
    with pytest.raises(workdir_lock.WorkdirLockedError, match="host other-host, pid 1"):
        workdir_lock.WorkdirLock(str(workdir), settle_seconds=0.01).acquire()
    # Another host, no heartbeat for 10 minutes: taken over.
    _write(workdir / "LOCK", host="other-host", pid=1, heartbeat=time.time() - 600)
    with workdir_lock.WorkdirLock(str(workdir), settle_seconds=0.01):
        assert json.loads((workdir / "LOCK").read_text())["pid"] == os.getpid()
    assert "Taking over the stale workdir lock" in caplog.text
    assert "no heartbeat for 600 s" in caplog.text
    # This host, a process that no longer runs: taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _write(workdir / "LOCK", pid=int(dead.stdout))
    with workdir_lock.WorkdirLock(str(workdir), settle_seconds=0.01):
        pass
    assert f"pid {int(dead.stdout)} no longer runs on this host" in caplog.text


def test_heartbeat_refreshes_and_a_lost_lock_is_noticed(tmp_path):
    workdir = epath.Path(tmp_path)
    lock = workdir_lock.WorkdirLock(str(workdir), heartbeat_seconds=0.05, settle_seconds=0.01)
    with lock:
        first = json.loads((workdir / "LOCK").read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((workdir / "LOCK").read_text())["heartbeat"] > first
        lock.check()
        # Someone deleted the lock and another trainer took the workdir.
        _write(workdir / "LOCK", host="other-host", pid=7)
        with pytest.raises(workdir_lock.WorkdirLockLostError, match="host other-host, pid 7"):
            lock.check()
    # Releasing does not delete the other trainer's lock.
    assert json.loads((workdir / "LOCK").read_text())["pid"] == 7


def test_of_two_trainers_starting_together_exactly_one_wins(tmp_path):
    results = []

    def start():
        try:
            results.append(workdir_lock.WorkdirLock(str(tmp_path), settle_seconds=0.2).acquire())
        except workdir_lock.WorkdirLockedError as e:
            results.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, workdir_lock.WorkdirLock)]
    assert len(won) == 1, results
    won[0].release()


def test_a_second_trainer_in_another_process_is_refused_then_takes_over_when_it_dies(
        tiny_run, tiny_config, tmp_path, caplog):
    """A real holder process; the trainer is refused before any work, and takes the
    lock over (with a warning) once the holder is killed."""
    from simple_diffusion import train  # pylint: disable=g-import-not-at-top
    src, _ = tiny_run
    workdir = tmp_path / "run"
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.copytree(src, workdir)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from simple_diffusion import workdir_lock as w; "
         f"w.WorkdirLock({str(workdir)!r}, is_leader=True).acquire(); "
         "print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(os.listdir(workdir))
        with pytest.raises(workdir_lock.WorkdirLockedError,
                           match=rf"host {socket.gethostname()}, pid {holder.pid}, since"):
            train.train_and_evaluate(tiny_config, str(workdir))
        assert sorted(os.listdir(workdir)) == before  # No events file, nothing moved.
    finally:
        holder.kill()
        holder.wait()
    assert (workdir / "LOCK").exists()  # A killed holder leaves its lock behind.
    summary = train.train_and_evaluate(tiny_config, str(workdir))  # Already at step 20.
    assert summary["step"] == 20
    assert f"pid {holder.pid} no longer runs on this host" in caplog.text
    assert not (workdir / "LOCK").exists()


def test_a_trainer_refuses_a_workdir_locked_in_this_process(tiny_config, tmp_path):
    from simple_diffusion import train  # pylint: disable=g-import-not-at-top
    with workdir_lock.WorkdirLock(str(tmp_path)):
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
            train.train_and_evaluate(tiny_config, str(tmp_path))
    assert not (tmp_path / "LOCK").exists()


@pytest.mark.parametrize("workdir", ["", "  "])
def test_empty_workdir_is_refused(workdir, tiny_config, tmp_path, monkeypatch):
    from simple_diffusion import train  # pylint: disable=g-import-not-at-top
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="workdir is empty"):
        train.train_and_evaluate(tiny_config, workdir)
    assert not os.listdir(tmp_path)


def test_empty_workdir_flag_is_refused_by_the_cli(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "simple_diffusion.main", f"--config={REPO}/configs/tiny.py",
         "--workdir="], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--workdir is empty" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not os.listdir(tmp_path)


def test_expected_errors_end_the_cli_with_one_line(tmp_path):
    """A config error (here a silent-before value) stops the trainer with the message
    and no traceback, before the workdir is touched."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "simple_diffusion.main", f"--config={REPO}/configs/tiny.py",
         f"--workdir={workdir}", "--config.optimizer.warmup_steps=-5"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert "train: error: config.optimizer.warmup_steps=-5 must be >= 0" in out.stderr, (
        out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    assert not workdir.exists() or not any(workdir.iterdir())
