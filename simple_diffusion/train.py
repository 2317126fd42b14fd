"""The training loop: mesh, sharded state, jitted step, logging, samples, checkpoints.

A run is a workdir:
  <workdir>/config.json            the config of the latest start
  <workdir>/LOCK                   held by the running trainer (see workdir_lock)
  <workdir>/checkpoints/<step>/    orbax checkpoints (train state + config)
  <workdir>/samples/step_<N>.png   sample grids (EMA params)
  <workdir>/events.out.tfevents.*  TensorBoard scalars and images
Re-running the same command on the same workdir resumes from the newest
readable checkpoint; the data iterator restarts at the restored step, so a
resumed run reproduces an uninterrupted one.
"""

import contextlib
import json
import os
import signal
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections

from simple_diffusion import checkpointing
from simple_diffusion import config_validation
from simple_diffusion import input_pipeline
from simple_diffusion import latent
from simple_diffusion import models
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion import workdir_lock
from simple_diffusion.evaluation import evaluator as evaluator_lib


NonFiniteLossError = train_step_lib.NonFiniteLossError  # Raised by train_and_evaluate.


class _PreemptionFlag:
    """Set by SIGTERM; the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self):
        if jax.process_count() > 1:
            # jax.distributed's preemption service owns SIGTERM in multi-process
            # runs and makes every process stop at the same step.
            return
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not in the main thread (e.g. a notebook worker).
            self._previous = None

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            # All processes must agree on the step at which they stop.
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def _check_finite(state: dict[str, Any]) -> None:
    train_step_lib.check_finite(
        state, "Lower config.optimizer.learning_rate, keep grad_clip_norm on, or check the "
        "data; resume from the last checkpoint.")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        path = epath.Path(workdir) / "config.json"
        path.write_text(json.dumps(config.to_dict(), indent=2, default=str))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir`` until ``config.num_train_steps``.

    The workdir is locked for the run (``<workdir>/LOCK``, see workdir_lock):
    a second trainer on the same workdir is refused.

    Returns:
      A summary: final ``step``, last logged ``metrics`` and whether it stopped
      for ``preempted``.
    """
    workdir = checkpointing.require_workdir(workdir)
    with contextlib.ExitStack() as cleanup:  # Releases the workdir lock however we exit.
        return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        cleanup: contextlib.ExitStack) -> dict[str, Any]:
    mesh_shape = config_validation.validate_config(
        config, num_devices=jax.device_count(), process_count=jax.process_count())
    # Fail on a missing dataset before compiling anything.
    image_size, channels = latent.pixel_shape(config)  # The model's, except for latent runs.
    data_info = input_pipeline.dataset_info(config.data, channels=channels)
    if data_info.channels != channels:
        raise config_validation.ConfigError(
            f"The dataset has {data_info.channels} channels but the config has {channels} "
            f"(config.model.in_channels). Set --config.model.in_channels={data_info.channels}.")
    if config.model.num_classes and data_info.num_classes != config.model.num_classes:
        raise config_validation.ConfigError(
            f"The dataset has {data_info.num_classes} classes but config.model.num_classes="
            f"{config.model.num_classes}; set --config.model.num_classes={data_info.num_classes} "
            "(or 0 for an unconditional model).")

    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    lock = cleanup.enter_context(workdir_lock.WorkdirLock(workdir))
    mesh = sharding_lib.create_mesh(*mesh_shape)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    space = None  # Latent diffusion (latent.py): a frozen autoencoder encodes and decodes.
    if "latent" in config:
        config, space = latent.prepare(config, workdir, mesh)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    logging.info("Process %d/%d, %d local / %d global devices, mesh %s.",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), dict(mesh.shape))

    model = models.create_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)

    abstract_state, state_sh = train_step_lib.state_shardings(model, tx, config, mesh)
    logging.info("Train state: %.1f MiB per device.",
                 sharding_lib.bytes_per_device(abstract_state, state_sh) / 2**20)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sh)

    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                      keep_every=config.keep_every_steps,
                                      async_save=config.async_checkpoints)
    restored = ckpt.restore_latest(target, config)
    if restored is None:
        state = train_step_lib.create_sharded_state(model, tx, config, state_sh)
        start_step = 0
        logging.info("Initialised a new run in %s.", workdir)
    else:
        state, start_step = restored
        logging.info("Resumed %s from step %d.", workdir, start_step)
        if start_step >= config.num_train_steps:
            # Not an error: re-running a finished run's command must stay a no-op.
            logging.warning(
                "Nothing to train: the checkpoint in %s is at step %d and "
                "config.num_train_steps=%d. To train further, raise "
                "--config.num_train_steps above %d.", workdir, start_step,
                config.num_train_steps, start_step)
            ckpt.close()
            writer.close()
            return {"step": start_step, "metrics": {}, "preempted": False}
    _write_config(config, workdir)
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state["params"])
    writer.write_hparams({"num_params": sum(x.size for x in jax.tree.leaves(state["params"]))})

    p_train_step = train_step_lib.jit_train_step(model, tx, config, mesh, state_sh)

    sample_fn = None
    if config.sample.every_steps:
        sample_fn = sampling.make_sample_fn(
            model, config, mesh, samplers.SamplerOptions.from_config(config.sample))
        if space is not None:
            sample_fn = space.decoding(sample_fn)
        sample_labels = sampling.replicate_labels(
            sampling.default_labels(config.sample.num_images, config.model.num_classes), mesh)

    def write_samples(step: int) -> None:
        images = sample_fn(state["ema"][0], jax.random.key(config.seed + 1), sample_labels)
        images = sampling.to_uint8(multihost_utils.process_allgather(images, tiled=True))
        grid = sampling.make_grid(images)
        if jax.process_index() == 0:
            sampling.save_png(os.path.join(workdir, "samples", f"step_{step:08d}.png"), grid)
        writer.write_images(step, {"samples": grid[None]})

    evaluator = None
    if config.eval.every_steps:
        evaluator = evaluator_lib.Evaluator(
            config, mesh, workdir, model=model,
            generate_fn=None if space is None else space.make_generate_fn(model, config))

    if space is None:
        data_iter = input_pipeline.create_input_iterator(
            config.data, image_size=image_size, global_batch_size=config.batch_size,
            seed=config.seed, start_step=start_step, channels=channels)
    else:
        data_iter = space.input_iterator(start_step)  # Pixels, or cached posteriors.

    report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                             writer=writer)
    hooks = [report]
    if config.profile.start_step >= 0 and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(
            logdir=workdir, first_profile=config.profile.start_step,
            num_profile_steps=config.profile.num_steps, every_steps=None))

    preemption = _PreemptionFlag()
    preemption.install()
    pending_metrics = []
    last_metrics: dict[str, float] = {}
    last_log_time, last_log_step = time.time(), start_step
    step = start_step
    preempted = False
    try:
        while step < config.num_train_steps:
            batch = sharding_lib.global_batch(next(data_iter), batch_sharding)
            if space is not None:
                batch = space.encode_batch(batch, step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = p_train_step(state, batch)
            step += 1
            pending_metrics.append(metrics)
            for h in hooks:
                h(step)

            final = step == config.num_train_steps
            if step % config.log_every_steps == 0 or final:
                _check_finite(state)
                last_metrics = train_step_lib.mean_metrics(pending_metrics)
                now = time.time()
                last_metrics["examples_per_sec"] = (
                    (step - last_log_step) * config.batch_size / max(now - last_log_time, 1e-9))
                last_log_time, last_log_step = now, step
                writer.write_scalars(step, last_metrics)
                writer.flush()  # Only every log_every_steps: lets TensorBoard follow the run.
                pending_metrics = []

            if sample_fn is not None and (step % config.sample.every_steps == 0 or final):
                with report.timed("sample"):
                    write_samples(step)

            if evaluator is not None and (step % config.eval.every_steps == 0 or final):
                with report.timed("eval"):
                    results = evaluator(state["ema"][0], step)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
                last_metrics.update({f"eval/{k}": v for k, v in results.items()})

            preempted = preemption.reached(step)
            if step % config.checkpoint_every_steps == 0 or final or preempted:
                _check_finite(state)
                lock.check()  # Never write over another trainer's run.
                with report.timed("checkpoint"):
                    ckpt.save(step, state, config)
            if preempted:
                logging.warning("Stopping at step %d after preemption; checkpoint saved.", step)
                break
    finally:
        preemption.uninstall()
        ckpt.close()
        writer.flush()
        writer.close()
        data_iter_close = getattr(data_iter, "close", None)
        if data_iter_close is not None:
            data_iter_close()
    return {"step": step, "metrics": last_metrics, "preempted": preempted}

