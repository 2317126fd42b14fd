"""One trainer per workdir: a lease file ``<workdir>/LOCK`` with a heartbeat.

The lock is a small JSON file (host, pid, start time, heartbeat time and a
random token) written through ``etils.epath``, so it works alike on local
disks, ``gs://`` and other shared filesystems. The holder refreshes the
heartbeat every ``HEARTBEAT_SECONDS`` from a daemon thread. A lock is stale,
and is taken over with a warning, when its heartbeat is older than
``STALE_AFTER_SECONDS`` or its process no longer runs on this host; otherwise a
second trainer is refused with a one-line message naming the holder.

Object stores have no exclusive create, so acquiring writes the lock and reads
it back after ``SETTLE_SECONDS``: of two trainers starting together the last
writer wins and the other is refused. The heartbeat re-reads the file before
each refresh and ``check`` reads it before each checkpoint, so a trainer whose
lock was taken over or deleted stops before writing another checkpoint.

In a multi-process run only process 0 touches the file; ``acquire`` and
``check`` are collective and give every process the same answer.

Heartbeat ages compare the holder's clock with the reader's, so hosts sharing a
workdir are assumed to keep their clocks roughly in step (NTP); a skew of
minutes would make a live lock look stale or a dead one look fresh.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging
from etils import epath

LOCK_NAME = "LOCK"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
SETTLE_SECONDS = 0.5

# Tokens of the locks this process holds (a lock naming our own pid but a token
# not in here was left by an earlier process that had the same pid).
_HELD_TOKENS: set[str] = set()


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir."""


class WorkdirLockLostError(RuntimeError):
    """This trainer's lock was taken over or deleted while it ran."""


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


@dataclasses.dataclass
class LockInfo:
    """The content of a lock file."""
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    command: str = ""

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["started_utc"], d["heartbeat_utc"] = _utc(self.started), _utc(self.heartbeat)
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LockInfo:
        d = json.loads(text)
        return cls(host=str(d["host"]), pid=int(d["pid"]), started=float(d["started"]),
                   heartbeat=float(d["heartbeat"]), token=str(d["token"]),
                   command=str(d.get("command", "")))

    def describe(self, now: float | None = None) -> str:
        age = (time.time() if now is None else now) - self.heartbeat
        return (f"host {self.host}, pid {self.pid}, since {_utc(self.started)} "
                f"(last heartbeat {max(age, 0):.0f} s ago)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Exists, another user's.
        return True
    except OSError:
        return True
    return True


def stale_reason(info: LockInfo, *, now: float | None = None,
                 stale_after: float = STALE_AFTER_SECONDS) -> str | None:
    """Why the lock ``info`` is stale, or None if its holder may still run."""
    now = time.time() if now is None else now
    if info.token in _HELD_TOKENS:
        return None  # This process holds it (e.g. a second trainer in the same process).
    if info.host == socket.gethostname():
        if info.pid == os.getpid():
            return f"pid {info.pid} is this process, which does not hold the lock"
        if not _pid_alive(info.pid):
            return f"pid {info.pid} no longer runs on this host"
    if now - info.heartbeat > stale_after:
        return f"no heartbeat for {now - info.heartbeat:.0f} s"
    return None


def read_lock(path: epath.Path) -> LockInfo | None:
    """The lock at ``path``; None if there is none. Unparsable content raises ValueError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LockInfo.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable lock file {path}: {e}") from e


def _write_lock(path: epath.Path, info: LockInfo) -> None:
    text = info.to_json()
    if "://" in str(path):
        path.write_text(text)  # Object stores replace an object atomically.
    else:
        tmp = path.parent / f"{path.name}.{info.token}.tmp"
        tmp.write_text(text)
        tmp.replace(path)


class WorkdirLock:
    """The lease on a workdir. Use as a context manager around training.

    Args:
      workdir: the run's directory (local path or URI); it must exist.
      heartbeat_seconds, stale_after_seconds, settle_seconds: see the module doc.
      is_leader: whether this process touches the lock file; defaults to
        ``jax.process_index() == 0``.
    """

    def __init__(self, workdir: str, *, heartbeat_seconds: float | None = None,
                 stale_after_seconds: float | None = None, settle_seconds: float | None = None,
                 is_leader: bool | None = None):
        self.path = epath.Path(workdir) / LOCK_NAME
        self._heartbeat = HEARTBEAT_SECONDS if heartbeat_seconds is None else heartbeat_seconds
        self._stale_after = (STALE_AFTER_SECONDS if stale_after_seconds is None
                             else stale_after_seconds)
        self._settle = SETTLE_SECONDS if settle_seconds is None else settle_seconds
        self._is_leader = is_leader
        self._collective = is_leader is None  # Explicit leadership: no collectives (tests).
        self._info: LockInfo | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io_lock = threading.Lock()

    # -- collective helpers (multi-process runs) --

    @staticmethod
    def _process_count() -> int:
        import jax  # pylint: disable=g-import-not-at-top
        return jax.process_count()

    def _leader(self) -> bool:
        if self._is_leader is None:
            import jax  # pylint: disable=g-import-not-at-top
            self._is_leader = jax.process_index() == 0
        return self._is_leader

    def _agree(self, ok: bool) -> bool:
        """Process 0's ``ok`` on every process."""
        if not self._collective or self._process_count() == 1:
            return ok
        import numpy as np  # pylint: disable=g-import-not-at-top
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))

    # -- public API --

    def acquire(self) -> WorkdirLock:
        """Takes the lock (process 0) or raises WorkdirLockedError on every process."""
        error = None
        if self._leader():
            try:
                self._acquire_file()
            except WorkdirLockedError as e:
                error = e
        if not self._agree(error is None):
            if error is None:  # Not process 0: it logged the holder.
                error = WorkdirLockedError(
                    f"Process 0 could not lock the workdir {self.path.parent}; see its log.")
            raise error
        return self

    def check(self) -> None:
        """Raises WorkdirLockLostError (on every process) if the lock is no longer ours.

        Reads the lock file (process 0), so call it at checkpoint time, not every step.
        """
        if self._leader() and self._info is not None and self._lost is None:
            try:
                with self._io_lock:
                    current = read_lock(self.path)
                if current is None or current.token != self._info.token:
                    self._set_lost(current)
            except Exception as e:  # pylint: disable=broad-except
                logging.warning("Could not read the workdir lock %s: %r", self.path, e)
        if not self._agree(self._lost is None):
            raise WorkdirLockLostError(
                self._lost or f"Process 0 lost the workdir lock {self.path}; see its log.")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._info is None:
            return
        _HELD_TOKENS.discard(self._info.token)
        try:
            with self._io_lock:
                current = read_lock(self.path)
                if current is not None and current.token == self._info.token:
                    self.path.unlink()
        except Exception as e:  # pylint: disable=broad-except
            logging.warning("Could not remove the workdir lock %s: %r", self.path, e)
        self._info = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- process 0 --

    def _refused(self, holder: LockInfo) -> WorkdirLockedError:
        return WorkdirLockedError(
            f"The workdir {self.path.parent} is in use by another trainer: {holder.describe()}. "
            f"Wait for it to finish, or, if you are sure it is not running, delete {self.path} "
            f"(a lock without heartbeat for {self._stale_after:.0f} s is taken over "
            "automatically).")

    def _acquire_file(self) -> None:
        now = time.time()
        try:
            holder = read_lock(self.path)
        except ValueError as e:
            logging.warning("Taking over the workdir lock: %s.", e)
            holder = None
        if holder is not None:
            reason = stale_reason(holder, now=now, stale_after=self._stale_after)
            if reason is None:
                raise self._refused(holder)
            logging.warning("Taking over the stale workdir lock %s of %s: %s.",
                            self.path, holder.describe(now), reason)
        info = LockInfo(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                        token=uuid.uuid4().hex, command=" ".join(sys.argv)[:500])
        _write_lock(self.path, info)
        # Of two trainers that wrote at the same time, the last writer wins.
        time.sleep(self._settle)
        try:
            current = read_lock(self.path)
        except ValueError:
            current = None
        if current is None or current.token != info.token:
            if current is not None:
                raise self._refused(current)
            raise WorkdirLockedError(
                f"The workdir lock {self.path} vanished while it was being taken: another "
                "trainer may be starting on this workdir. Try again.")
        self._info = info
        _HELD_TOKENS.add(info.token)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                        name=f"workdir-lock-heartbeat:{self.path}")
        self._thread.start()
        logging.info("Locked the workdir: %s.", self.path)

    def _set_lost(self, current: LockInfo | None) -> None:
        by = ("it was deleted" if current is None
              else f"it is now held by {current.describe()}")
        self._lost = (f"This trainer lost the workdir lock {self.path}: {by}. Stopping "
                      "without writing more checkpoints, so the other trainer's run is kept.")
        logging.error(self._lost)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._heartbeat):
            try:
                with self._io_lock:
                    if self._stop.is_set() or self._info is None:
                        return
                    current = read_lock(self.path)
                    if current is None or current.token != self._info.token:
                        self._set_lost(current)
                        return
                    self._info.heartbeat = time.time()
                    _write_lock(self.path, self._info)
            except Exception as e:  # pylint: disable=broad-except
                logging.warning("Workdir lock heartbeat failed (will retry): %r", e)
