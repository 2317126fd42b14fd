r"""Progressive distillation runs (Salimans & Ho 2022): rounds that halve the sampling steps.

  python -m simple_diffusion.distill --config=configs/distill_demo.py --workdir=workdirs/demo_distill
  python -m simple_diffusion.distill --config=configs/distill_demo.py \
      --workdir=workdirs/demo_distill --report      # the fd_effnet_lite0 / steps table

A distillation config (configs/distill_*.py) is the students' run config
(batch, optimizer steps per round in ``num_train_steps``, optimizer, EMA,
seed, data, mesh) plus ``config.distill`` (``default_section``): the teacher
workdir (any training run), its DDIM step count and the final step count.
Model, schedule and loss always come from the teacher's config.json. Round k
trains a student with N_k = teacher_num_steps / 2^k steps in its own run
workdir::

  <workdir>/round_<k>_steps_<N_k>/   config.json, checkpoints/, LOCK, events, samples/

Each round is an ordinary run: its config.json sets ``sample``/``eval`` to
deterministic DDIM (eta = 0) with N_k steps and the teacher's clipping, so
``simple_diffusion.sample`` and ``.evaluate`` work on it unchanged. The student
starts from the teacher's EMA params; its EMA params are the next round's
teacher. Re-running resumes: finished rounds (newest checkpoint at
``num_train_steps``) are skipped and an interrupted round resumes from its
newest checkpoint, bit-exactly (step randomness ``fold_in(key(seed + k),
step)``, data from ``input_pipeline`` at the restored step). The loss is in
``distillation.py``; docs/distillation.md has the method.
"""

from simple_diffusion import cli_start

if __name__ == "__main__":
    # Before the imports below: it may restart the process (execve), which would
    # otherwise redo them (~2 s of jax, flax and TensorFlow imports per command).
    cli_start.prepare_process()

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import optax

from simple_diffusion import checkpointing
from simple_diffusion import config_validation
from simple_diffusion import distillation
from simple_diffusion import distributed
from simple_diffusion import input_pipeline
from simple_diffusion import models
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion import schedules
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion import workdir_lock
from simple_diffusion import xla_cpu


def default_section() -> ml_collections.ConfigDict:
    """``config.distill``: the distillation-only fields ([project] values unless noted).

    Everything else of a distillation config is an ordinary run config: it is the
    student's run config per round (batch_size, num_train_steps = optimizer steps
    per round, optimizer, ema_decays, cond_drop_prob, seed, data, mesh, logging
    and checkpoint cadence), except ``model``, ``schedule`` and ``loss``, which
    always come from the teacher's config.json (they must match its checkpoint).
    """
    c = ml_collections.ConfigDict()
    c.teacher_workdir = ml_collections.FieldReference(None, field_type=str)  # Required.
    c.teacher_step = ml_collections.FieldReference(None, field_type=int)  # None: latest.
    c.teacher_ema_index = 0
    c.teacher_num_steps = 128    # The teacher's DDIM steps; round 1's student gets half.
    c.final_num_steps = 4        # Rounds continue until this many student steps.
    # Fixed teacher guidance w, distilled into the first student (later rounds use
    # w = 0 on their already-guided teachers); the students sample with w = 0.
    c.guidance_scale = 0.0
    c.teacher_clip_x = False     # Clip the teacher's x_hat inside the target.
    c.sample_num_images = 64     # Sample grid of each finished student (0: none).
    c.report = ml_collections.ConfigDict(dict(
        teacher_steps=(1, 2, 4, 8, 16, 32, 64, 128), num_samples=1000, num_reference=2000,
        batch_size=256, seed=0))
    return c


def round_plan(dconf: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
    """[(k, teacher steps, student steps)] for k = 1, 2, ...: 128 -> 64 -> ... -> final."""
    n, final = dconf.teacher_num_steps, dconf.final_num_steps
    if final < 1 or n <= final or n % final or (n // final) & (n // final - 1):
        raise config_validation.ConfigError(
            f"teacher_num_steps={n} must be final_num_steps={final} times a power of 2 (> 1).")
    plan, k = [], 1
    while n > final:
        plan.append((k, n, n // 2))
        n, k = n // 2, k + 1
    return plan


def round_dir(workdir: str, k: int, num_steps: int) -> str:
    return os.path.join(workdir, f"round_{k}_steps_{num_steps}")


def student_config(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict,
                   k: int, num_steps: int) -> ml_collections.ConfigDict:
    """Round k's run config: the distillation config's run fields, the teacher's
    ``model``/``schedule``/``loss``, and a deterministic ``num_steps``-step DDIM
    sampler (the teacher's clipping) in ``sample`` and ``eval``."""
    d = config.distill
    c = ml_collections.ConfigDict(config.to_dict())
    del c["distill"]
    for key in ("model", "schedule", "loss"):
        c[key] = ml_collections.ConfigDict(teacher_config[key].to_dict())
    c.seed = config.seed + k
    clip = samplers.SamplerOptions.from_config(teacher_config.sample).clip
    guidance = 0.0 if d.guidance_scale else teacher_config.sample.get("guidance_scale", 0.0)
    ddim = dataclasses.asdict(samplers.SamplerOptions(
        sampler="ddim", num_steps=num_steps, eta=0.0, clip_x=clip, guidance_scale=guidance))
    for name in ("sample", "eval"):  # Fresh sections: clip_x may be the string 'auto' in c.
        c[name] = ml_collections.ConfigDict({**c[name].to_dict(), **ddim})
    c.sample.every_steps = 0  # The round writes one grid at its end.
    c.eval.every_steps = 0
    c.distillation = round_section(teacher_workdir=d.teacher_workdir, round=k,
                                   teacher_num_steps=2 * num_steps, student_num_steps=num_steps,
                                   guidance_scale=d.guidance_scale if k == 1 else 0.0)
    return c


def round_section(teacher_workdir: str | None = None, round: int = 0,  # pylint: disable=redefined-builtin
                  teacher_num_steps: int = 0, student_num_steps: int = 0,
                  guidance_scale: float = 0.0) -> ml_collections.ConfigDict:
    """``config.distillation`` of a round's run config (its config.json): the teacher's
    workdir, the round k and its teacher / student DDIM steps and distilled guidance."""
    return ml_collections.ConfigDict(dict(
        teacher_workdir=teacher_workdir, round=round, teacher_num_steps=teacher_num_steps,
        student_num_steps=student_num_steps, guidance_scale=guidance_scale))


def make_distill_step(model, tx, config: ml_collections.ConfigDict, lr_schedule: optax.Schedule,
                      *, num_student_steps: int, guidance_scale: float, teacher_clip_x: bool):
    """``step(state, teacher_params, batch) -> (state, metrics)``, the train state of
    ``train_step`` (EMA, non-finite steps skipped and recorded) with the distillation
    loss. Randomness: ``fold_in(key(config.seed), step)``."""
    num_classes = config.model.num_classes
    logsnr_fn = schedules.from_config(config.schedule)
    kwargs = dict(prediction=config.loss.prediction, sigma_data=config.loss.get("sigma_data", 0.5))
    guidance_scale = guidance_scale if num_classes else 0.0

    def loss_fn(params, teacher_params, image, label, rng):
        label_rng, dropout_rng, t_rng, eps_rng = jax.random.split(rng, 4)
        labels = None
        if num_classes:
            labels = train_step_lib.drop_labels(label_rng, label, num_classes,
                                                config.cond_drop_prob)

        def teacher_fn(z, logsnr, lab):
            return model.apply({"params": teacher_params}, z, logsnr, lab, train=False)

        def student_fn(z, logsnr, lab):
            return model.apply({"params": params}, z, logsnr, lab, train=True,
                               rngs={"dropout": dropout_rng})

        teacher = samplers.make_denoiser(
            teacher_fn, labels=labels, null_label=num_classes or None,
            guidance_scale=guidance_scale, clip_x=teacher_clip_x, **kwargs)
        student = samplers.make_denoiser(student_fn, labels=labels, **kwargs)
        t, _, _ = distillation.sample_student_times(t_rng, image.shape[0], num_student_steps)
        eps = jax.random.normal(eps_rng, image.shape, jnp.float32)
        return distillation.distillation_loss(student, teacher, image, eps, t,
                                              num_student_steps=num_student_steps,
                                              logsnr_fn=logsnr_fn)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, teacher_params, batch):
        i = state["step"]
        rng = jax.random.fold_in(jax.random.key(config.seed), i)
        (loss, metrics), grads = grad_fn(state["params"], teacher_params, batch["image"],
                                         batch["label"], rng)
        new, grad_norm = train_step_lib.apply_gradients(state, grads, loss, tx,
                                                        config.ema_decays)
        return new, dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(i))

    return step


def _restore_ema(workdir: str, step: int | None, abstract_params, ema_index: int):
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.resolve_step(step)
        return ckpt.restore_params(step, abstract_params, ema_index=ema_index), step
    finally:
        ckpt.close()


def _completed(workdir: str, num_train_steps: int) -> bool:
    if not (epath.Path(workdir) / "checkpoints").exists():
        return False
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        return ckpt.latest_step() == num_train_steps
    finally:
        ckpt.close()


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _check_finite(state) -> None:
    train_step_lib.check_finite(state, "Lower learning_rate and resume.",
                                what="distillation loss or gradient")


def run_round(config: ml_collections.ConfigDict, workdir: str, teacher_workdir: str,
              teacher_step: int | None, teacher_ema_index: int, guidance_scale: float, *,
              teacher_clip_x: bool = False, sample_num_images: int = 0) -> dict[str, Any]:
    """Trains (or resumes) one round in ``workdir`` with run config ``config``."""
    mesh_shape = config_validation.validate_config(
        config, num_devices=jax.device_count(), process_count=jax.process_count())
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    n = config.distillation.student_num_steps
    with contextlib.ExitStack() as cleanup:
        lock = cleanup.enter_context(workdir_lock.WorkdirLock(workdir))
        mesh = sharding_lib.create_mesh(*mesh_shape)
        batch_sh = sharding_lib.batch_sharding(mesh)
        model = models.create_model(config.model)
        tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
        abstract, state_sh = train_step_lib.state_shardings(model, tx, config, mesh)
        abstract_params, params_sh = train_step_lib.sharded_abstract_params(model, config, mesh)
        teacher_params, used_step = _restore_ema(teacher_workdir, teacher_step, abstract_params,
                                                 teacher_ema_index)
        logging.info("Round %d: teacher %s step %d (%d steps) -> student %d steps.",
                     config.distillation.round, teacher_workdir, used_step, 2 * n, n)
        ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                          async_save=config.async_checkpoints)
        cleanup.callback(ckpt.close)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, state_sh)
        restored = ckpt.restore_latest(target, config)
        if restored is None:
            def init(params):  # Copies: params and every EMA are separate (donated) buffers.
                return {"step": jnp.zeros((), jnp.int32), "params": _copy(params),
                        "opt_state": tx.init(params),
                        "ema": [_copy(params) for _ in config.ema_decays],
                        "nonfinite_step": jnp.full((), -1, jnp.int32)}
            state, start = jax.jit(init, out_shardings=state_sh)(teacher_params), 0
        else:
            state, start = restored
        if jax.process_index() == 0:
            (epath.Path(workdir) / "config.json").write_text(
                json.dumps(config.to_dict(), indent=2, default=str))
        writer = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() > 0, asynchronous=False)
        cleanup.callback(writer.close)
        lr = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
        step_fn = jax.jit(
            make_distill_step(model, tx, config, lr, num_student_steps=n,
                              guidance_scale=guidance_scale, teacher_clip_x=teacher_clip_x),
            in_shardings=(state_sh, params_sh, batch_sh),
            out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=(0,),
            compiler_options=xla_cpu.compiler_options())
        data = input_pipeline.create_input_iterator(
            config.data, image_size=config.model.image_size, global_batch_size=config.batch_size,
            seed=config.seed, start_step=start, channels=config.model.in_channels)
        cleanup.callback(data.close)
        step, pending, last = start, [], {}
        t0 = time.time()
        while step < config.num_train_steps:
            batch = sharding_lib.global_batch(next(data), batch_sh)
            state, metrics = step_fn(state, teacher_params, batch)
            step += 1
            pending.append(metrics)
            final = step == config.num_train_steps
            if step % config.log_every_steps == 0 or final:
                _check_finite(state)
                last = train_step_lib.mean_metrics(pending)
                last["steps_per_sec"] = len(pending) / max(time.time() - t0, 1e-9)
                writer.write_scalars(step, last)
                logging.info("Round %d step %d: %s", config.distillation.round, step, last)
                pending, t0 = [], time.time()
            if step % config.checkpoint_every_steps == 0 or final:
                _check_finite(state)
                lock.check()
                ckpt.save(step, state, config)
        if step > start and sample_num_images:
            _write_grid(model, config, mesh, state["ema"][0], workdir, step, sample_num_images)
    return {"round": config.distillation.round, "step": step, "metrics": last}


def _write_grid(model, config, mesh, params, workdir: str, step: int, num_images: int) -> None:
    num_images = -(-num_images // mesh.size) * mesh.size
    options = samplers.SamplerOptions.from_config(config.sample)
    sample_fn = sampling.make_sample_fn(model, config, mesh, options)
    labels = sampling.replicate_labels(
        sampling.default_labels(num_images, config.model.num_classes), mesh)
    images = sample_fn(params, jax.random.key(config.seed + 1), labels)
    images = sampling.to_uint8(multihost_utils.process_allgather(images, tiled=True))
    if jax.process_index() == 0:
        sampling.save_png(os.path.join(workdir, "samples", f"step_{step:08d}.png"),
                          sampling.make_grid(images))


def distill(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) every round of ``config.distill`` under ``workdir``.

    Returns:
      Per-round summaries (``skipped`` for rounds finished before).
    """
    workdir = checkpointing.require_workdir(workdir)
    d = config.distill
    if not d.teacher_workdir:
        raise config_validation.ConfigError(
            "config.distill.teacher_workdir is required, e.g. "
            "--config.distill.teacher_workdir=workdirs/demo")
    try:
        teacher_config = sampling.load_run_config(d.teacher_workdir)
    except FileNotFoundError as e:
        raise config_validation.ConfigError(f"config.distill.teacher_workdir: {e}") from None
    plan = round_plan(d)
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "distill_config.json").write_text(
            json.dumps(config.to_dict(), indent=2, default=str))
    summaries = []
    for k, _, n in plan:
        rdir = round_dir(workdir, k, n)
        if _completed(rdir, config.num_train_steps):
            logging.info("Round %d (%d steps) is complete in %s; skipped.", k, n, rdir)
            summaries.append({"round": k, "step": config.num_train_steps, "skipped": True})
            continue
        if k == 1:
            teacher = (d.teacher_workdir, d.teacher_step, d.teacher_ema_index, d.guidance_scale)
        else:
            teacher = (round_dir(workdir, k - 1, 2 * n), None, 0, 0.0)
        summaries.append(run_round(student_config(config, teacher_config, k, n), rdir, *teacher,
                                   teacher_clip_x=d.teacher_clip_x,
                                   sample_num_images=d.sample_num_images))
    return summaries


# --------------------------------------------------------------------------
# The report: fd_effnet_lite0 against sampling steps, and time per image.
# --------------------------------------------------------------------------


def _report_rows(config: ml_collections.ConfigDict, workdir: str):
    """(name, run workdir, step or None, EMA index, SamplerOptions, run config) per row."""
    d = config.distill
    teacher_config = sampling.load_run_config(d.teacher_workdir)
    clip = samplers.SamplerOptions.from_config(teacher_config.sample).clip
    w = d.guidance_scale if teacher_config.model.num_classes else 0.0
    rows = []
    for sampler in ("ddim", "ddpm"):
        for n in d.report.teacher_steps:
            rows.append((f"teacher {sampler}", d.teacher_workdir, d.teacher_step,
                         d.teacher_ema_index,
                         samplers.SamplerOptions(sampler=sampler, num_steps=n, clip_x=clip,
                                                 guidance_scale=w), teacher_config))
    for k, _, n in round_plan(d):
        rdir = round_dir(workdir, k, n)
        if not _completed(rdir, config.num_train_steps):
            logging.warning("Round %d is not complete; left out of the report.", k)
            continue
        run_config = sampling.load_run_config(rdir)
        rows.append((f"student round {k}", rdir, None, 0,
                     samplers.SamplerOptions.from_config(run_config.eval), run_config))
    return rows


def report(config: ml_collections.ConfigDict, workdir: str,
           out_md: str | None = None) -> list[dict[str, Any]]:
    """The quality/steps table of a distillation run.

    Evaluates the teacher (DDIM and DDPM ancestral at ``distill.report.teacher_steps``)
    and every finished student (DDIM with its own step count) with
    ``evaluation.evaluator.Evaluator`` against the reference images of
    ``config.data`` (feature network ``config.eval.feature``); writes
    ``<workdir>/report/distillation.{md,json}`` (and ``out_md``) and the raw
    per-row results under ``<workdir>/report/eval/``. Seconds per image: the wall
    time of one compiled sampler call on ``report.batch_size`` images, divided by it.
    """
    from simple_diffusion.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
    r = config.distill.report
    report_dir = os.path.join(workdir, "report")
    mesh = sharding_lib.create_mesh(-1, 1)
    batch = -(-r.batch_size // mesh.size) * mesh.size
    results, params_cache = [], {}
    for i, (name, run_dir, step, ema, options, run_config) in enumerate(
            _report_rows(config, workdir)):
        c = ml_collections.ConfigDict(run_config.to_dict())
        c.data = ml_collections.ConfigDict(config.data.to_dict())
        c.eval = ml_collections.ConfigDict(dict(  # Fresh: clip_x may be 'auto' (str) in c.
            c.eval.to_dict(), **dataclasses.asdict(options), feature=config.eval.feature,
            inception_weights=config.eval.get("inception_weights"),
            reference_split=config.eval.reference_split, num_samples=r.num_samples,
            num_reference=r.num_reference, batch_size=batch, seed=r.seed))
        model = models.create_model(c.model)
        if run_dir not in params_cache:
            abstract, _ = train_step_lib.sharded_abstract_params(model, c, mesh)
            params_cache[run_dir] = _restore_ema(run_dir, step, abstract, ema)
        params, used_step = params_cache[run_dir]
        evaluator = evaluator_lib.Evaluator(c, mesh, report_dir, model=model)
        metrics = evaluator(params, i)
        if jax.process_index() == 0:  # The evaluator names its file by "step": name it by row.
            eval_dir = epath.Path(report_dir) / "eval"
            (eval_dir / f"step_{i:08d}.json").rename(
                eval_dir / f"{name.replace(' ', '_')}_{options.sampler}_{options.num_steps}.json")
        start = time.time()  # The sampler is compiled for this batch shape by now.
        sampling.generate(c, params, mesh, evaluator.options, num_samples=batch, labels=None,
                          seed=r.seed + 1, batch_size=batch, sample_fn=evaluator.sample_fn)
        seconds = (time.time() - start) / batch
        grid = samplers.logsnr_grid(options, schedules.from_config(c.schedule))
        results.append(dict(model=name, workdir=run_dir, checkpoint_step=used_step,
                            sampler=options.sampler, steps=options.num_steps,
                            guidance_scale=options.guidance_scale,
                            nfe=samplers.num_model_evaluations(options, grid),
                            seconds_per_image=seconds, **metrics))
        logging.info("Report row %s: %s", name, results[-1])
    if jax.process_index() == 0:
        md = _markdown(results, config, f"{mesh.size} x {jax.devices()[0].device_kind}")
        out = epath.Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "distillation.json").write_text(json.dumps(results, indent=2))
        (out / "distillation.md").write_text(md)
        if out_md:
            epath.Path(out_md).parent.mkdir(parents=True, exist_ok=True)
            epath.Path(out_md).write_text(md)
    return results


def _markdown(rows: list[dict[str, Any]], config: ml_collections.ConfigDict, devices: str) -> str:
    d = config.distill
    keys = list(rows[0]) if rows else []
    fd_key = next((k for k in keys if k.startswith("fd_") or k == "fid"), "fd")
    kid_key = next((k for k in keys if k.startswith("kid") and not k.endswith("std")), "kid")
    lines = [
        "# Progressive distillation: sample quality against sampling steps", "",
        f"Teacher `{d.teacher_workdir}`; {d.report.num_samples} samples against "
        f"{d.report.num_reference} `{config.eval.reference_split}` images; seconds per image "
        f"from one compiled batch of {d.report.batch_size} on {devices}; NFE counts a guided "
        "call as 2. Generated by `python -m simple_diffusion.distill --report`.", "",
        f"| model | sampler | steps | NFE | guidance | {fd_key} | {kid_key} | s / image |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | "
                     f"{r['guidance_scale']:g} | {r.get(fd_key, float('nan')):.2f} | "
                     f"{r.get(kid_key, float('nan')):.4f} | {r['seconds_per_image']:.4f} |")
    return "\n".join(lines) + "\n"


def _define_flags():
    """The CLI's flags (defined only when run as a program: main.py defines the same names)."""
    config_flags.DEFINE_config_file(
        "config", None, "Distillation config (configs/distill_*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory of the distillation rounds.")
    flags.DEFINE_bool("report", False, "Write the quality/steps table instead of training.")
    flags.DEFINE_string("report_out", None, "Also write the Markdown table here.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed.initialize()
    f = flags.FLAGS
    try:
        if f.report:
            report(f.config, f.workdir, f.report_out)
        else:
            print(json.dumps(distill(f.config, f.workdir), default=str))
    except (config_validation.ConfigError, FileNotFoundError,
            checkpointing.IncompatibleCheckpointError, checkpointing.CheckpointExistsError,
            input_pipeline.DatasetNotFoundError, workdir_lock.WorkdirLockedError,
            workdir_lock.WorkdirLockLostError) as e:
        sys.exit(f"distill: error: {e}")  # Expected errors: one line, no traceback.


if __name__ == "__main__":
    _define_flags()
    app.run(main)
