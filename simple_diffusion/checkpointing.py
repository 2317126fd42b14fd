"""Orbax checkpoints of the train state in ``<workdir>/checkpoints``.

Each checkpoint step holds two items: ``state`` (the train-state pytree,
sharded arrays written by every process) and ``config`` (the run's config as
JSON, to explain an incompatible resume). Orbax writes a step to a temporary
directory and renames it when complete, so a crash during a save leaves the
previous checkpoints intact.

Restoring takes an abstract target (``jax.ShapeDtypeStruct`` with shardings),
so a checkpoint restores onto any device count or mesh.
"""

import json
import os
import shutil
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


class IncompatibleCheckpointError(ValueError):
    """The checkpoint's arrays do not match the current config's train state."""


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


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


class Checkpointer:
    """Keep-last-N plus keep-every-K checkpoints with async saves."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True):
        if "://" not in workdir:  # orbax needs absolute local paths.
            workdir = os.path.abspath(workdir)
        self.directory = os.path.join(workdir, "checkpoints")
        self._workdir = workdir
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every or None,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        # Registering the handlers lets a fresh process read item metadata
        # (shapes) before restoring, for the compatibility check.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(
                type_handler_registry=_type_handler_registry()),
                           "config": ocp.JsonCheckpointHandler()})

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
        """Starts an (async) save of ``state`` at ``step``; no-op if it exists."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            config=ocp.args.JsonSave(config.to_dict())), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def check_compatible(self, step: int, abstract_state: Any,
                         config: ml_collections.ConfigDict) -> None:
        """Raises IncompatibleCheckpointError if shapes/dtypes differ from the target."""
        meta = self._manager.item_metadata(step)["state"]
        saved = _flat_shapes(meta.tree if hasattr(meta, "tree") else meta)
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

    def restore_latest(self, abstract_state: Any, config: ml_collections.ConfigDict
                       ) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint onto ``abstract_state``'s shardings.

        A checkpoint that fails to read (e.g. truncated files) is moved to
        ``<workdir>/checkpoints_corrupt/`` (never deleted) and the next older
        one is tried, so training resumes from the last good state.

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
                if errors:
                    logging.warning("Resumed from older checkpoint %d after: %s", step, errors)
                return restored["state"], step
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # pylint: disable=broad-except
                logging.error("Checkpoint step %d is unreadable: %r", step, e)
                errors.append(f"step {step}: {type(e).__name__}: {e}")
                self._quarantine(step)
        raise RuntimeError(
            f"No checkpoint in {self.directory} could be restored:\n  " + "\n  ".join(errors) +
            f"\nThey were moved to {self._workdir}/checkpoints_corrupt/. Start a new --workdir "
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
        meta = self._manager.item_metadata(step)["state"]
        tree = meta.tree if hasattr(meta, "tree") else meta
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
        return restored["params"] if ema_index is None else restored["ema"][ema_index]

    def _quarantine(self, step: int) -> None:
        """Moves an unreadable step aside so it is neither reused nor overwritten."""
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst_dir = os.path.join(self._workdir, "checkpoints_corrupt")
            os.makedirs(dst_dir, exist_ok=True)
            if os.path.exists(src):
                shutil.move(src, os.path.join(dst_dir, str(step)))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine_checkpoint_{step}")
        # Let orbax rescan the directory.
        self._manager.reload()
