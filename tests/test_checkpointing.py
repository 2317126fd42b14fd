"""Checksummed checkpoints: damage is detected, set aside, and the run resumes from
the newest good step; quarantine works on a gs:// workdir (in memory)."""

import logging
import os
import pathlib
import shutil
import subprocess
import threading
import time

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simple_diffusion import checkpointing
from simple_diffusion import models
from simple_diffusion import sharding
from simple_diffusion import train
from simple_diffusion import train_step as train_step_lib

from test_workdir_lock import memory_gs  # pylint: disable=g-bad-import-order,unused-import


def _read_state(workdir, step) -> dict[str, np.ndarray]:
    """Every array of checkpoint ``step``, as NumPy, by path ('ema/1/...')."""
    path = pathlib.Path(workdir, "checkpoints", str(step), "state").absolute()
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=meta, restore_args=args))
    return {k: np.asarray(x) for k, x in checkpointing._named_leaves(restored).items()}  # pylint: disable=protected-access


def _assert_states_equal(workdir_a, workdir_b, step):
    a, b = _read_state(workdir_a, step), _read_state(workdir_b, step)
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} arrays differ, e.g. {differ[:3]}"


def _flip_one_bit(workdir, step, clean: dict[str, np.ndarray], prefix: str = "") -> list[str]:
    """Flips one bit of a data file of ``step`` such that orbax still reads the step,
    with one array silently changed (whose path starts with ``prefix``).

    Which file holds which array varies between runs, so candidates are tried
    (the middle of the largest files first). Returns the changed arrays.
    """
    files = sorted((f for f in pathlib.Path(workdir, "checkpoints", str(step), "state").rglob("*")
                    if f.is_file() and f.parent.name == "d"), key=lambda f: -f.stat().st_size)
    for f in files:
        original = f.read_bytes()
        for fraction in (0.5, 0.3, 0.7):
            data = bytearray(original)
            data[int(len(data) * fraction)] ^= 0x10
            f.write_bytes(bytes(data))
            try:
                state = _read_state(workdir, step)
            except Exception:  # pylint: disable=broad-except  # orbax noticed; not this one.
                state = {}
            changed = [k for k in state if not np.array_equal(state[k], clean[k])]
            if changed and all(k.startswith(prefix) for k in changed):
                return changed
        f.write_bytes(original)
    raise AssertionError("no bit flip found that orbax reads back silently")


def _numpy_checksum(x: np.ndarray) -> str:
    """The documented checksum (checkpointing's comment block), re-derived in NumPy
    with 64-bit integers reduced mod 2**32 by hand."""
    mask = np.uint64(0xFFFFFFFF)

    def fmix(h):
        h = h ^ (h >> np.uint64(16))
        h = (h * np.uint64(0x85EBCA6B)) & mask
        h = h ^ (h >> np.uint64(13))
        h = (h * np.uint64(0xC2B2AE35)) & mask
        return h ^ (h >> np.uint64(16))

    x = np.ascontiguousarray(x)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    words = x.reshape(-1).view(unsigned).astype(np.uint64)
    position = np.arange(words.size, dtype=np.uint64)
    position_hash = fmix((position * np.uint64(0x9E3779B1) + np.uint64(0x7F4A7C15)) & mask)
    h = fmix(words ^ position_hash)
    first = int(h.sum(dtype=np.uint64) & mask)
    second = int(((h * (position_hash | np.uint64(1))) & mask).sum(dtype=np.uint64) & mask)
    return f"{first:08x}{second:08x}"


def test_checksums_match_a_numpy_rederivation():
    # Many arrays of one shape (they share a reduction, in chunks) among others.
    rs = np.random.RandomState(1)
    tree = {"same": [rs.randn(3, 5).astype(np.float32) for _ in range(37)],
            "bf16": rs.randn(4, 6).astype(jnp.bfloat16), "int": np.arange(-7, 8, dtype=np.int32),
            "bool": np.array([[True, False, True]]), "scalar": np.float32(-2.5)}
    got = checkpointing.tree_checksums(jax.tree.map(jnp.asarray, tree))
    want = {f"same/{i}": _numpy_checksum(x) for i, x in enumerate(tree["same"])}
    want.update({k: _numpy_checksum(np.asarray(tree[k])) for k in ("bf16", "int", "scalar")})
    want["bool"] = _numpy_checksum(tree["bool"].astype(np.uint8))
    assert got == want


def test_checksums_do_not_depend_on_the_layout_and_see_every_bit():
    rs = np.random.RandomState(0)
    x = rs.randn(16, 24).astype(np.float32)
    tree = {"a": x, "b": np.arange(5, dtype=np.int32), "c": np.float32(3.0),
            "d": [x.astype(jnp.bfloat16), np.array([True, False])]}
    ref = checkpointing.tree_checksums(jax.tree.map(jnp.asarray, tree))
    assert set(ref) == {"a", "b", "c", "d/0", "d/1"}
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
    for spec in [P("x", "y"), P("y", None), P(None, "x"), P()]:
        sharded = jax.tree.map(
            lambda v: jax.device_put(v, jax.sharding.NamedSharding(mesh, P())), tree)
        sharded["a"] = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
        assert checkpointing.tree_checksums(sharded) == ref, spec
    # Any single flipped bit, and a swap of two elements, change the checksum.
    y = rs.randn(2, 3).astype(np.float32)
    base = checkpointing.tree_checksums({"y": y})["y"]
    flips = np.repeat(y.reshape(1, -1).view(np.uint32), 6 * 32, axis=0)
    for i in range(6 * 32):
        flips[i, i // 32] ^= np.uint32(1 << (i % 32))
    flipped = checkpointing.tree_checksums(list(flips.view(np.float32).reshape(-1, 2, 3)))
    assert base not in flipped.values() and len(set(flipped.values())) == 6 * 32
    swapped = y.reshape(-1)[[1, 0, 2, 3, 4, 5]].reshape(2, 3)
    assert checkpointing.tree_checksums({"y": swapped})["y"] != base


def test_one_flipped_bit_is_quarantined_and_the_run_resumes_from_the_previous_step(
        tiny_run, tiny_config, tmp_path, caplog):
    src, _ = tiny_run
    workdir = tmp_path / "bitflip"
    shutil.copytree(src, workdir)
    # Without checksums this step loads, with one array changed.
    changed = _flip_one_bit(workdir, 20, _read_state(src, 20))
    tiny_config.sample.every_steps = 0
    with caplog.at_level(logging.WARNING):
        summary = train.train_and_evaluate(tiny_config, str(workdir))
    assert summary["step"] == 20
    assert (workdir / "checkpoints_corrupt" / "20" / "state").is_dir()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    resumed = [m for m in warnings if m.startswith("Resuming from checkpoint 10")]
    assert len(resumed) == 1 and "\n" not in resumed[0], warnings
    assert "do not match their saved checksums" in resumed[0]
    assert changed[0] in resumed[0]
    _assert_states_equal(workdir, src, 20)


def test_missing_state_metadata_is_damage_not_a_config_change(tiny_run, tiny_config, tmp_path,
                                                             caplog):
    src, _ = tiny_run
    workdir = tmp_path / "nometa"
    shutil.copytree(src, workdir)
    (workdir / "checkpoints" / "20" / "state" / "_METADATA").unlink()
    tiny_config.sample.every_steps = 0
    summary = train.train_and_evaluate(tiny_config, str(workdir))
    assert summary["step"] == 20
    assert (workdir / "checkpoints_corrupt" / "20").is_dir()
    assert "_METADATA is missing" in caplog.text
    _assert_states_equal(workdir, src, 20)


def test_a_checkpoint_without_checksums_restores_unverified(tiny_run, tiny_config, tmp_path,
                                                           caplog):
    src, _ = tiny_run
    workdir = tmp_path / "old"
    shutil.copytree(src, workdir)
    shutil.rmtree(workdir / "checkpoints" / "20" / "checksums")  # As saved before checksums.
    summary = train.train_and_evaluate(tiny_config, str(workdir))  # Restore only.
    assert summary["step"] == 20
    assert not (workdir / "checkpoints_corrupt").exists()
    assert "has no checksums" in caplog.text and "restored unverified" in caplog.text


def test_restore_params_refuses_a_damaged_step(tiny_run, tiny_config, tmp_path):
    src, _ = tiny_run
    workdir = tmp_path / "sample"
    shutil.copytree(src, workdir)
    mesh = sharding.create_mesh(8, 1)
    abstract, _ = train_step_lib.sharded_abstract_params(
        models.create_model(tiny_config.model), tiny_config, mesh)
    ckpt = checkpointing.Checkpointer(str(workdir), async_save=False)
    good = ckpt.restore_params(20, abstract, ema_index=0)
    _flip_one_bit(workdir, 20, _read_state(src, 20), prefix="ema/1/")
    with pytest.raises(checkpointing.CorruptCheckpointError, match="use an older step"):
        ckpt.restore_params(20, abstract, ema_index=1)
    # Only the arrays read are verified: EMA copy 0 is intact.
    for a, b in zip(jax.tree.leaves(good),
                    jax.tree.leaves(ckpt.restore_params(20, abstract, ema_index=0))):
        np.testing.assert_array_equal(a, b)


def test_save_never_skips_an_existing_step(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
    config = ml_collections.ConfigDict({"a": 1})
    state = {"x": jnp.arange(4.0)}
    ckpt.save(1, state, config)
    with pytest.raises(checkpointing.CheckpointExistsError, match="already exists"):
        ckpt.save(1, state, config)
    # A step another trainer wrote after this one listed the directory.
    shutil.copytree(tmp_path / "checkpoints" / "1", tmp_path / "checkpoints" / "2")
    with pytest.raises(checkpointing.CheckpointExistsError, match="another trainer"):
        ckpt.save(2, state, config)
    ckpt.close()
    assert checkpointing.Checkpointer(str(tmp_path)).all_steps() == [1, 2]


def _mount_tmpfs(path: pathlib.Path, size: str) -> bool:
    """Mounts a tmpfs of ``size`` at ``path``; False where this process may not."""
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, check=False).returncode == 0


def _orbax_threads_waiting() -> list[str]:
    from orbax.checkpoint._src.futures import future  # pylint: disable=g-import-not-at-top
    return [t.name for t in threading.enumerate()
            if isinstance(t, future._SignalingThread) and t.is_alive()]  # pylint: disable=protected-access


@pytest.mark.parametrize("fault,async_save", [("read_only", False), ("read_only", True),
                                              ("full", True)])
def test_a_refused_write_stops_with_one_line_naming_the_path(tmp_path, fault, async_save):
    """A disk that turns read-only or full under a run: one line with the checkpoint
    directory and the OS's words, and nothing left hanging (orbax's threads)."""
    root = tmp_path / "disk"
    root.mkdir()
    mounted = _mount_tmpfs(root, "256k")
    if not mounted and (fault == "full" or os.geteuid() == 0):
        pytest.skip("needs a tmpfs mount (root) to fill a disk or refuse root's writes")
    try:
        ckpt = checkpointing.Checkpointer(str(root / "wd"), async_save=async_save)
        config = ml_collections.ConfigDict({"a": 1})
        ckpt.save(1, {"x": jnp.arange(4.0)}, config)
        ckpt.wait()
        if fault == "full":
            state, cause = {"x": jnp.arange(100_000.0)}, "No space left on device"  # 400 kB.
        elif mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
            state, cause = {"x": jnp.arange(4.0)}, "Read-only file system"
        else:
            for d in (root / "wd", root / "wd" / "checkpoints"):
                d.chmod(0o555)
            state, cause = {"x": jnp.arange(4.0)}, "Permission denied"
        with pytest.raises(checkpointing.CheckpointWriteError) as error:
            ckpt.save(2, state, config)
            ckpt.save(3, state, config)  # An async failure shows at the next save at the latest.
        message = str(error.value)
        assert "\n" not in message and cause in message
        assert f"Cannot write checkpoint step 2 to {ckpt.directory}:" in message
        assert isinstance(error.value, OSError)
        ckpt.close()  # Neither raises again nor waits for orbax's timeout (300 s).
        deadline = time.time() + 10  # The released threads exit within moments.
        while _orbax_threads_waiting() and time.time() < deadline:
            time.sleep(0.1)
        assert not _orbax_threads_waiting()
        assert sorted(p.name for p in (root / "wd" / "checkpoints").iterdir()
                      if p.name.isdigit()) == ["1"]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], check=False)
        else:
            for d in (root / "wd", root / "wd" / "checkpoints"):
                if d.exists():
                    d.chmod(0o755)


def test_the_trainer_log_keeps_one_line_of_orbax_write_failures():
    error = ValueError('RESOURCE_EXHAUSTED: Error writing "x/0": Failed to write 356853 bytes '
                       "to file 7: No space left on device [os_error_code='28']\nmore")
    record = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/x.py", 1,
                               "Save failed: %s", (error,), (ValueError, error, None))
    assert checkpointing.OrbaxLogFilter().filter(record)
    assert record.exc_info is None and "\n" not in record.getMessage()
    assert "No space left on device" in record.getMessage()
    bug = ValueError("a bug")
    record = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/x.py", 1,
                               "failed", (), (ValueError, bug, None))
    assert checkpointing.OrbaxLogFilter().filter(record) and record.exc_info
    info = logging.LogRecord("absl", logging.INFO, "/site-packages/orbax/checkpoint/x.py", 1,
                             "chatter", (), None)
    assert not checkpointing.OrbaxLogFilter().filter(info)


def test_empty_workdir_is_refused_by_the_checkpointer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="workdir is empty"):
        checkpointing.Checkpointer("")
    assert not os.listdir(tmp_path)


def _fake_step(step_dir: epath.Path, with_metadata: bool) -> None:
    (step_dir / "state" / "d").mkdir(parents=True)
    (step_dir / "state" / "d" / "0123").write_bytes(b"\0" * 64)
    if with_metadata:
        (step_dir / "state" / "_METADATA").write_text("{}")
    (step_dir / "_CHECKPOINT_METADATA").write_text("{}")
    (step_dir / "commit_success.txt").write_text("ok")


def test_quarantine_on_a_gs_workdir(memory_gs, monkeypatch):  # pylint: disable=redefined-outer-name
    """The damage path of restore_latest on a gs:// workdir (in memory): every
    directory operation goes through epath, none lands on the local disk."""
    del memory_gs
    # orbax asks the real GCS API (google-cloud-storage) whether a bucket has a
    # hierarchical namespace before listing steps; this bucket does not.
    from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    workdir = epath.Path("gs://bucket/run")
    for step in (10, 20):
        _fake_step(workdir / "checkpoints" / str(step), with_metadata=False)
    (workdir / "checkpoints_corrupt" / "20").mkdir(parents=True)  # An earlier incident.
    ckpt = checkpointing.Checkpointer(str(workdir))
    assert ckpt.all_steps() == [10, 20]
    with pytest.raises(RuntimeError, match="No checkpoint in gs://bucket/run/checkpoints could"):
        ckpt.restore_latest({"x": jax.ShapeDtypeStruct((2,), jnp.float32)},
                            ml_collections.ConfigDict())
    assert sorted(p.name for p in (workdir / "checkpoints_corrupt").iterdir()) == [
        "10", "20", "20.1"]
    assert (workdir / "checkpoints_corrupt" / "20.1" / "state" / "d" / "0123").read_bytes() == (
        b"\0" * 64)
    assert not (workdir / "checkpoints" / "10").exists()
    assert ckpt.all_steps() == []


def test_move_tree_copies_where_rename_fails(memory_gs, monkeypatch):  # pylint: disable=redefined-outer-name
    """Object stores that cannot rename a directory: copied file by file, then deleted."""
    del memory_gs
    src, dst = epath.Path("gs://bucket/a/7"), epath.Path("gs://bucket/b/7")
    _fake_step(src, with_metadata=True)

    def no_rename(self, target):
        raise OSError(f"cannot rename {self} to {target}")

    monkeypatch.setattr(type(src), "rename", no_rename)
    checkpointing._move_tree(src, dst)  # pylint: disable=protected-access
    assert not src.exists()
    assert sorted(p.name for p in dst.iterdir()) == [
        "_CHECKPOINT_METADATA", "commit_success.txt", "state"]
    assert (dst / "state" / "_METADATA").read_text() == "{}"
