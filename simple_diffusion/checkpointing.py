"""Orbax checkpoints of the train state in ``<workdir>/checkpoints``.

Each checkpoint step holds three items: ``state`` (the train-state pytree,
sharded arrays written by every process), ``config`` (the run's config as
JSON, to explain an incompatible resume) and ``checksums`` (JSON, one checksum
per array of ``state``, see ``tree_checksums``). Orbax writes a step to a
temporary directory and renames it when complete, so a crash during a save
leaves the previous checkpoints intact.

Restoring takes an abstract target (``jax.ShapeDtypeStruct`` with shardings),
so a checkpoint restores onto any device count or mesh. Every restored array
is checked against its saved checksum; a damaged step (checksum mismatch,
unreadable or missing files) is moved to ``<workdir>/checkpoints_corrupt/``
and the next older step is tried. All workdir file operations go through
``etils.epath``, so they work alike on local disks and ``gs://``.
"""

import errno
import functools
import json
import logging as std_logging
import os
from typing import Any

from absl import logging
from etils import epath
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


class CorruptCheckpointError(RuntimeError):
    """A checkpoint step is damaged: checksum mismatch or missing metadata."""


class CheckpointExistsError(FileExistsError):
    """A save was asked for a step that already exists on disk."""


class IncompatibleCheckpointError(ValueError):
    """The checkpoint's arrays do not match the current config's train state."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written: disk full, read-only or not permitted.

    The message names the checkpoint directory and the cause in one line.
    """


# Errors of the filesystem, not of the program: (errno, what the OS says).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)
# tensorstore (orbax's array writer) reports them as text in a ValueError.
_WRITE_ERROR_TEXTS = tuple(os.strerror(n) for n in _WRITE_ERRNOS)


def filesystem_write_cause(error: BaseException) -> str | None:
    """What the OS said if ``error`` (or its cause/context chain) is a write refused
    by the filesystem (no space, read-only, permission, quota), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            return f"{os.strerror(error.errno)} [errno {error.errno}]"
        text = str(error)
        for n, message in zip(_WRITE_ERRNOS, _WRITE_ERROR_TEXTS):
            if message in text or f"os_error_code='{n}'" in text:
                return f"{message} [errno {n}]"
        error = error.__cause__ or error.__context__
    return None


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _named_leaves(tree: Any) -> dict[str, Any]:
    """'a/b/0/mu/...' -> leaf, without orbax placeholders (the names of _flat_shapes)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): leaf
            for path, leaf in flat if leaf is not ocp.PLACEHOLDER}


# --- Checksums -------------------------------------------------------------
#
# A checksum is computed on the devices, from the global (sharded) array, and
# does not depend on how the array is laid out: each element's bits are mixed
# with a hash of its flat position by a bijective 32-bit hash (murmur3's
# finaliser), h_i = fmix(bits_i ^ fmix(i)), and two sums are taken modulo
# 2**32: sum(h_i) and sum(h_i * m_i) with odd, position-dependent m_i. Integer
# addition is exact and associative, so any sharding, mesh or process count
# gives the same value, and any change of a single element (one flipped bit)
# always changes both sums. Cost: a few integer ops per element, fused into one
# two-output reduction per array (arrays of one shape share it), in one program
# for the whole tree.

CHECKSUM_ALGORITHM = "fmix32-position-sum2-v1"


def _fmix32(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_uint32_words(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as uint32 words (64-bit elements give two words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    # 8-byte elements become a trailing axis of two uint32 words.
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


# Arrays of one shape share a reduction: one variadic reduce per (shape, dtype,
# sharding) and chunk instead of one per array. A train state holds params, EMAs
# and Adam moments of the same shapes, so the program has ~10x fewer fusions and
# compiles ~3x faster (the tiny model's 354 arrays: 26 s -> 8 s on a loaded CPU).
_MAX_ARRAYS_PER_REDUCE = 16


def _same_shape_checksums(xs: list[jax.Array]) -> jax.Array:
    """uint32[len(xs), 2]: the two sums of each array; all ``xs`` have one shape
    and dtype."""
    words = [_as_uint32_words(jnp.asarray(x)) for x in xs]
    shape = words[0].shape
    position = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        position = position + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(
            stride % 2**32)
        stride *= shape[axis]
    position_hash = _fmix32(position * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15))
    weight = position_hash | jnp.uint32(1)
    operands = []
    for w in words:
        h = _fmix32(w ^ position_hash)
        operands += [h, h * weight]
    zeros = (jnp.uint32(0),) * len(operands)
    sums = lax.reduce(tuple(operands), zeros,
                      lambda a, b: tuple(x + y for x, y in zip(a, b)), tuple(range(len(shape))))
    return jnp.stack(sums).reshape(len(xs), 2)


@functools.lru_cache(maxsize=16)
def _checksum_program(out_sharding: jax.sharding.Sharding | None):
    def checksums(groups):
        return jnp.concatenate([_same_shape_checksums(g) for g in groups])
    return jax.jit(checksums, out_shardings=out_sharding)


def _group_same_shape(leaves: list[Any]) -> tuple[list[list[Any]], list[int]]:
    """Chunks of leaves with one shape, dtype and sharding, and each leaf's row in
    the chunks' concatenated output."""
    by_key: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        key = (tuple(np.shape(x)), str(x.dtype), getattr(x, "sharding", None))
        by_key.setdefault(key, []).append(i)
    groups, order = [], []
    for indices in by_key.values():
        for start in range(0, len(indices), _MAX_ARRAYS_PER_REDUCE):
            chunk = indices[start:start + _MAX_ARRAYS_PER_REDUCE]
            groups.append([leaves[i] for i in chunk])
            order += chunk
    row = [0] * len(leaves)
    for r, i in enumerate(order):
        row[i] = r
    return groups, row


def tree_checksums(tree: Any) -> dict[str, str]:
    """Per-array checksums of ``tree``: ``{'params/...': '16 hex digits'}``.

    Layout-independent (any mesh or process count gives the same values); every
    process must call it (it runs one jitted program over the sharded arrays).
    """
    named = _named_leaves(tree)
    if not named:
        return {}
    leaves = [x if hasattr(x, "dtype") else np.asarray(x) for x in named.values()]
    sharding = getattr(leaves[0], "sharding", None)
    out_sharding = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                    if isinstance(sharding, jax.sharding.NamedSharding) else None)
    groups, row = _group_same_shape(leaves)
    sums = _checksum_program(out_sharding)(groups)
    sums = np.asarray(sums.addressable_data(0))[row]  # Replicated: every process has it all.
    return {name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(named, sums)}


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """'a/b/0/mu/...' -> (shape, dtype). Paths are normalised because orbax's
    metadata turns namedtuples (optax states) into dicts."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in flat if leaf is not ocp.PLACEHOLDER}


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, name + ".")
        elif a != b:
            diffs.append(f"{name}: checkpoint {a!r} vs now {b!r}")
    return diffs


def _type_handler_registry():
    """orbax's default handlers, but replicated arrays under 1 MiB are copied to
    the host whole: splitting every small array over its replicas compiles one
    slicing program per array (23 s for the tiny model's first save on 8 CPU
    devices), for no gain at that size."""
    from orbax.checkpoint._src.serialization import type_handlers  # pylint: disable=g-import-not-at-top
    scalar = type_handlers.ScalarHandler()
    return ocp.type_handlers.create_type_handler_registry(
        (int, scalar), (float, scalar), (np.number, scalar),
        (np.ndarray, type_handlers.NumpyHandler()),
        (jax.Array, type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=1 << 20)),
        (type(ocp.PLACEHOLDER), type_handlers.PlaceholderHandler()))


def _restore_args(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore onto ``abstract``'s shapes, dtypes and shardings (any mesh)."""
    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial)


def _is_uri(path: str) -> bool:
    return "://" in path


def _move_tree(src: epath.Path, dst: epath.Path) -> None:
    """Moves directory ``src`` to ``dst`` (which must not exist), on any filesystem."""
    try:
        src.rename(dst)
        return
    except Exception as e:  # pylint: disable=broad-except
        if not src.exists():
            raise
        # Object stores may not rename directories: copy every file, then delete.
        logging.info("Renaming %s failed (%r); copying it instead.", src, e)
    _copy_tree(src, dst)
    src.rmtree()


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():  # Not glob('**'): epath refuses it on gs://.
        if child.is_dir():
            _copy_tree(child, dst / child.name)
        else:
            child.copy(dst / child.name, overwrite=True)


def _release_orbax_waiters() -> None:
    """Ends orbax's save threads still waiting for a signal of a failed save.

    When a save fails early (e.g. a read-only filesystem refuses its temporary
    directory), orbax leaves non-daemon threads waiting for signals that never
    come, for its coordination timeout (minutes): the process could not exit.
    Each is cancelled and its signals set, so it wakes and returns. Best effort
    (orbax internals), only after a CheckpointWriteError.
    """
    try:
        import threading  # pylint: disable=g-import-not-at-top
        from orbax.checkpoint._src.futures import future as ocp_future  # pylint: disable=g-import-not-at-top
        waiting = [t for t in threading.enumerate()
                   if isinstance(t, ocp_future._SignalingThread) and t.is_alive()]  # pylint: disable=protected-access
        for thread in waiting:
            thread.cancel()
            ocp_future.set_signals(thread._receive_signals,  # pylint: disable=protected-access
                                   operation_id=thread._operation_id)  # pylint: disable=protected-access
        for thread in waiting:
            thread.join(timeout=10)
    except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not release orbax's waiting save threads (%r); the process may "
                        "wait for orbax's timeout before it exits.", e)


def require_workdir(workdir: Any) -> str:
    """``workdir`` as a string; ValueError if it is empty (it would mean the cwd)."""
    workdir = "" if workdir is None else str(workdir)
    if not workdir.strip():
        raise ValueError(
            "The workdir is empty: give the run's directory, e.g. --workdir=workdirs/run1 "
            "(an empty value would write the run into the current directory).")
    return workdir


class Checkpointer:
    """Keep-last-N plus keep-every-K checkpoints with async saves."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True):
        workdir = require_workdir(workdir)
        if not _is_uri(workdir):  # orbax needs absolute local paths.
            workdir = str(epath.Path(workdir).resolve())
        self._workdir_path = epath.Path(workdir)
        self.directory = str(self._workdir_path / "checkpoints")
        self._workdir = workdir
        self._pending_step: int | None = None  # The async save in flight.
        self._write_failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every or None,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        # Registering the handlers lets a fresh process read item metadata
        # (shapes) before restoring, for the compatibility check.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(
                type_handler_registry=_type_handler_registry()),
                           "config": ocp.JsonCheckpointHandler(),
                           "checksums": ocp.JsonCheckpointHandler()})

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def resolve_step(self, step: int | None) -> int:
        """``step`` if it exists, the latest step if None; else FileNotFoundError."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"No checkpoint {'' if step is None else step} in {self.directory} "
                f"(available: {self.all_steps()}).")
        return step

    def save(self, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
        """Starts an (async) save of ``state`` at ``step``, with per-array checksums.

        Raises:
          CheckpointExistsError: step ``step`` already exists (a run only saves
            steps after the one it resumed from, so another trainer wrote it).
        """
        step_dir = epath.Path(self.directory) / str(step)
        if step in self._manager.all_steps() or step_dir.exists():
            raise CheckpointExistsError(
                f"Checkpoint {step_dir} already exists, so step {step} was not saved: another "
                "trainer may be writing to this workdir. Nothing was overwritten.")
        checksums = {"algorithm": CHECKSUM_ALGORITHM, "arrays": tree_checksums(state)}
        try:
            # Also waits for the previous async save, whose failure surfaces here.
            saved = self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                config=ocp.args.JsonSave(config.to_dict()),
                checksums=ocp.args.JsonSave(checksums)), force=True)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointExistsError(
                f"Checkpoint {step_dir} already exists, so step {step} was not saved: another "
                "trainer may be writing to this workdir. Nothing was overwritten.") from e
        except Exception as e:  # pylint: disable=broad-except
            self._raise_if_write_refused(e, self._pending_step or step)
            raise
        if not saved:
            raise RuntimeError(f"orbax did not save checkpoint step {step} in {self.directory}.")
        self._pending_step = step

    def _raise_if_write_refused(self, error: Exception, step: int) -> None:
        """Raises CheckpointWriteError (one line) if the filesystem refused the write."""
        cause = filesystem_write_cause(error)
        if cause is None:
            return
        self._write_failed = True
        raise CheckpointWriteError(
            f"Cannot write checkpoint step {step} to {self.directory}: {cause}. The training "
            "stopped; the checkpoints already complete there are intact. Free space or make "
            "the workdir writable, then rerun the same command to resume from the latest "
            "complete checkpoint.") from None

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            self._raise_if_write_refused(e, self._pending_step)
            raise
        self._pending_step = None

    def close(self) -> None:
        """Waits for a pending save and releases orbax's threads.

        After a CheckpointWriteError it only releases them: the failed save
        would raise again.
        """
        if self._write_failed:
            try:
                self._manager.close()
            except Exception:  # pylint: disable=broad-except
                pass  # Already reported as the CheckpointWriteError.
            _release_orbax_waiters()
            return
        try:
            self.wait()
        finally:
            self._manager.close()

    def check_compatible(self, step: int, abstract_state: Any,
                         config: ml_collections.ConfigDict) -> None:
        """Raises IncompatibleCheckpointError if shapes/dtypes differ from the target."""
        saved = _flat_shapes(self._state_metadata(step))
        wanted = _flat_shapes(abstract_state)
        if saved == wanted:
            return
        mismatched = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        lines = [f"  {k}: checkpoint {saved.get(k, 'missing')} vs config {wanted.get(k, 'missing')}"
                 for k in mismatched[:10]]
        try:
            old_config = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            # A JSON round trip makes tuples and lists compare equal.
            config_lines = _config_diff(old_config, json.loads(config.to_json()))
        except Exception:  # pylint: disable=broad-except
            config_lines = ["(the checkpoint's config could not be read)"]
        raise IncompatibleCheckpointError(
            f"The checkpoint at {self.directory}/{step} does not match the current config: "
            f"{len(mismatched)} arrays differ, e.g.\n" + "\n".join(lines) +
            "\nConfig differences:\n  " + "\n  ".join(config_lines[:20] or ["(none recorded)"]) +
            "\nResume with the config the run was started with, or use a new --workdir.")

    def _state_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata; CorruptCheckpointError if unreadable."""
        meta_file = epath.Path(self.directory) / str(step) / "state" / "_METADATA"
        if not meta_file.exists():
            raise CorruptCheckpointError(f"{meta_file} is missing")
        meta = self._manager.item_metadata(step)["state"]
        tree = meta.tree if hasattr(meta, "tree") else meta
        if not tree:
            raise CorruptCheckpointError(f"{meta_file} lists no arrays")
        return tree

    def verify(self, step: int, restored: Any) -> bool:
        """Checks ``restored`` (the state, or part of it) against the checksums saved
        with ``step``. Every process must call it.

        Returns:
          True if verified, False for a checkpoint saved without checksums.

        Raises:
          CorruptCheckpointError: some array differs from what was saved.
        """
        if not (epath.Path(self.directory) / str(step) / "checksums").exists():
            logging.warning("Checkpoint %s/%d has no checksums (saved by an older version): "
                            "restored unverified.", self.directory, step)
            return False
        saved = self._manager.restore(step, args=ocp.args.Composite(
            checksums=ocp.args.JsonRestore()))["checksums"]
        if saved.get("algorithm") != CHECKSUM_ALGORITHM:
            logging.warning("Checkpoint %s/%d has checksums of an unknown kind (%s): restored "
                            "unverified.", self.directory, step, saved.get("algorithm"))
            return False
        actual = tree_checksums(restored)
        expected = saved["arrays"]
        bad = sorted(k for k in actual if expected.get(k) != actual[k])
        if bad:
            raise CorruptCheckpointError(
                f"{len(bad)} of {len(actual)} arrays do not match their saved checksums, e.g. "
                + ", ".join(bad[:3]))
        return True

    def restore_latest(self, abstract_state: Any, config: ml_collections.ConfigDict
                       ) -> tuple[Any, int] | None:
        """Restores the newest good checkpoint onto ``abstract_state``'s shardings.

        Every array is verified against the checksums saved with it. A damaged
        checkpoint (checksum mismatch, missing metadata, files that fail to
        read) is moved to ``<workdir>/checkpoints_corrupt/`` (never deleted)
        and the next older one is tried, so training resumes from the last good
        state.

        Returns:
          (state, step), or None if there is no checkpoint.

        Raises:
          IncompatibleCheckpointError: the checkpoint is from a different model.
          RuntimeError: checkpoints exist but none could be read.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        errors = []
        for step in steps:
            try:
                self.check_compatible(step, abstract_state, config)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=_restore_args(abstract_state)))
                self.verify(step, restored["state"])
                if errors:
                    logging.warning(
                        "Resuming from checkpoint %d: newer checkpoints were damaged and moved "
                        "to %s (%s).", step, self._corrupt_dir(), "; ".join(errors))
                return restored["state"], step
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # pylint: disable=broad-except
                reason = f"step {step}: {type(e).__name__}: {e}".replace("\n", " ")
                moved_to = self._quarantine(step)
                logging.warning("Checkpoint %s/%d is damaged (%s); moved it to %s.",
                                self.directory, step, reason, moved_to)
                errors.append(reason)
        raise RuntimeError(
            f"No checkpoint in {self.directory} could be restored:\n  " + "\n  ".join(errors) +
            f"\nThey were moved to {self._corrupt_dir()}. Start a new --workdir "
            "or restore a good copy.")

    def restore_params(self, step: int, abstract_params: Any, *, ema_index: int | None = 0) -> Any:
        """Restores only one parameter tree of checkpoint ``step`` (for sampling).

        Args:
          step: checkpoint step.
          abstract_params: ``jax.ShapeDtypeStruct`` tree (with shardings) of the params.
          ema_index: which EMA copy (``config.ema_decays`` order); None for the raw params.

        Returns:
          The parameter tree, placed on ``abstract_params``' shardings. The
          optimizer state is never read, so this needs a third of the memory.
        """
        tree = self._state_metadata(step)
        if ema_index is None:
            item = {"params": abstract_params}
        else:
            num_ema = len(tree["ema"])
            if not 0 <= ema_index < num_ema:
                raise ValueError(f"ema_index={ema_index}, but the checkpoint has {num_ema} EMA "
                                 f"copies (0..{num_ema - 1}).")
            item = {"ema": [abstract_params if i == ema_index else
                            jax.tree.map(lambda _: ocp.PLACEHOLDER, abstract_params)
                            for i in range(num_ema)]}
        saved = _flat_shapes({k: v for k, v in tree.items() if k in item})
        wanted = _flat_shapes(item)
        bad = [k for k in wanted if saved.get(k) != wanted[k]]
        bad += [k for k in saved if k not in wanted and k.startswith(f"ema/{ema_index}/")]
        if bad:
            raise IncompatibleCheckpointError(
                f"Checkpoint {self.directory}/{step} does not match the model of the config: "
                f"{bad[:5]} differ. Sample with the config the run was trained with.")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=_restore_args(item, partial=True)))["state"]
        params = restored["params"] if ema_index is None else restored["ema"][ema_index]
        try:
            self.verify(step, {"params": params} if ema_index is None else
                        {"ema": {str(ema_index): params}})
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(
                f"Checkpoint {self.directory}/{step} is damaged ({e}); use an older step "
                f"(available: {self.all_steps()}).") from None
        return params

    def _corrupt_dir(self) -> epath.Path:
        return self._workdir_path / "checkpoints_corrupt"

    def _quarantine(self, step: int) -> epath.Path:
        """Moves a damaged step aside so it is neither reused nor overwritten.

        Returns where it went: ``checkpoints_corrupt/<step>`` (``<step>.1``, ...
        if that name is taken by an earlier incident).
        """
        dst_dir = self._corrupt_dir()
        dst = dst_dir / str(step)
        if jax.process_index() == 0:
            src = epath.Path(self.directory) / str(step)
            dst_dir.mkdir(parents=True, exist_ok=True)
            n = 0
            while dst.exists():
                n += 1
                dst = dst_dir / f"{step}.{n}"
            if src.exists():
                _move_tree(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine_checkpoint_{step}")
        # Let orbax rescan the directory.
        self._manager.reload()
        return dst


class OrbaxLogFilter(std_logging.Filter):
    """A log filter (for the absl handler of a trainer): drops orbax's INFO chatter
    (several lines per save) and cuts its refused-write tracebacks to one line."""

    def filter(self, record):
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno < std_logging.WARNING:
            return False
        if record.exc_info and filesystem_write_cause(record.exc_info[1]) is not None:
            # A full or read-only disk: the trainer stops with one line naming the
            # checkpoint and the cause; orbax's threads each log the same traceback.
            record.msg, record.args = record.getMessage().splitlines()[0][:300], None
            record.exc_info = record.exc_text = None
        return True
