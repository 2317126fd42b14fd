r"""DCGAN training (seed 002): generator and discriminator, D:G update ratio, generator EMA.

  python -m simple_diffusion.main --config=configs/dcgan_fashion_mnist.py --workdir=workdirs/dcgan
  python -m simple_diffusion.evaluate --workdir=workdirs/dcgan [--ema_index=-1]   # -1: raw G
  python -m simple_diffusion.sample --workdir=workdirs/dcgan --num_samples=64 [--ema_index=-1]

A GAN config (configs/dcgan_*.py) is a run config whose ``model`` is a DCGAN
(models/dcgan.py) plus ``config.gan`` (``default_section``). ``main.py`` sends it
here; the workdir has the layout of a diffusion run (config.json, LOCK,
checkpoints/, samples/, eval/, events), built from the same parts: workdir lock,
checksummed orbax checkpoints through ``checkpointing.Checkpointer``, the input
pipeline, clu writers, ``train_step.apply_gradients`` (optimizer step, EMA and the
non-finite guard) and the ``Evaluator`` with a GAN ``generate_fn``.

One *iteration* (``config.num_train_steps`` of them; checkpoint, log, sample and eval
cadences count iterations) is ``d_steps_per_g_step`` discriminator updates, each on
its own real batch of ``batch_size`` and a fresh generated batch, then
``g_steps_per_d_step`` generator updates (at least one of the two is 1). The seed's
"1:2" (one D update per two G updates) is ``g_steps_per_d_step = 2``.

The train state is one dict pytree, one checkpoint::

  step, params, opt_state, ema, nonfinite_step      the generator (the names the sample
                                                    and evaluate CLIs restore)
  d_step, d_params, d_opt_state, d_nonfinite_step   the discriminator

``step``/``d_step`` count G/D updates. Randomness: D update i draws its z and fake
labels from ``fold_in(fold_in(key(seed), 0), i)``, G update j from
``fold_in(fold_in(key(seed), 1), j)``; real data of iteration s is the input
pipeline's batch s (``batch_size * d_steps_per_g_step`` examples). So a resumed run
reproduces an uninterrupted one bit for bit. The generator EMA is the project's
(``train_step.ema_update``: decay min(d, (1+n)/(10+n)) after G update n).
"""

import contextlib
import functools
import os
import time
from typing import Any, Callable

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import optax

from simple_diffusion import checkpointing
from simple_diffusion import config_validation
from simple_diffusion import gan
from simple_diffusion import input_pipeline
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train as train_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion import workdir_lock
from simple_diffusion import xla_cpu
from simple_diffusion.evaluation import evaluator as evaluator_lib
from simple_diffusion.models import dcgan

State = dict[str, Any]
_D_STREAM, _G_STREAM = 0, 1
_G_KEYS = ("step", "params", "opt_state", "ema", "nonfinite_step")


def default_section() -> ml_collections.ConfigDict:
    """``config.gan``: loss, update ratio, R1 and the discriminator's optimizer.

    The generator's optimizer is ``config.optimizer`` and its EMA decays
    ``config.ema_decays``. Adam(2e-4, b1 = 0.5, b2 = 0.999) for D is DCGAN's.
    """
    return ml_collections.ConfigDict(dict(
        loss="non_saturating",      # gan.LOSSES: 'non_saturating' | 'hinge'.
        d_steps_per_g_step=1,       # D updates per iteration.
        g_steps_per_d_step=1,       # G updates per iteration.
        r1_gamma=0.0,               # R1 penalty weight on real data (0 = off).
        eval_raw=True,              # Also evaluate and draw the raw (non-EMA) generator.
        d_optimizer=dict(
            learning_rate=2e-4, warmup_steps=0, schedule="constant", final_lr_fraction=0.0,
            b1=0.5, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0,
            grad_accum_steps=1),
    ))


# --------------------------------------------------------------------------
# State: init, shardings.
# --------------------------------------------------------------------------


def create_models(config: ml_collections.ConfigDict) -> tuple[nn.Module, nn.Module]:
    return dcgan.create_generator(config.model), dcgan.create_discriminator(config.model)


def create_optimizers(config: ml_collections.ConfigDict
                      ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """(G's, D's) optimizers; schedules run over all of their player's updates."""
    g = config.gan
    return (optimizer_lib.make_optimizer(config.optimizer,
                                         config.num_train_steps * g.g_steps_per_d_step),
            optimizer_lib.make_optimizer(g.d_optimizer,
                                         config.num_train_steps * g.d_steps_per_g_step))


def _labels(config, n: int):
    return jnp.zeros((n,), jnp.int32) if config.model.num_classes else None


def _init_params(generator, discriminator, config, rng) -> tuple[Any, Any]:
    """Boxed (logically partitioned) params of G and D."""
    m = config.model
    g_rng, d_rng = jax.random.split(rng)
    g = generator.init(g_rng, jnp.zeros((1, m.latent_dim), jnp.float32), _labels(config, 1))
    d = discriminator.init(d_rng, jnp.zeros((1, m.image_size, m.image_size, m.in_channels),
                                            jnp.float32), _labels(config, 1))
    return g["params"], d["params"]


def init_state(generator, discriminator, g_tx, d_tx, config, rng) -> State:
    g, d = nn.meta.unbox(_init_params(generator, discriminator, config, rng))
    return {
        "step": jnp.zeros((), jnp.int32), "params": g, "opt_state": g_tx.init(g),
        "ema": [g for _ in config.ema_decays], "nonfinite_step": jnp.full((), -1, jnp.int32),
        "d_step": jnp.zeros((), jnp.int32), "d_params": d, "d_opt_state": d_tx.init(d),
        "d_nonfinite_step": jnp.full((), -1, jnp.int32),
    }


def state_shardings(generator, discriminator, g_tx, d_tx, config, mesh) -> tuple[State, State]:
    """Abstract state and its shardings (params, moments and EMA alike; scalars replicated)."""
    abstract = jax.eval_shape(
        functools.partial(init_state, generator, discriminator, g_tx, d_tx, config),
        jax.random.key(0))
    boxed_g, boxed_d = jax.eval_shape(
        functools.partial(_init_params, generator, discriminator, config), jax.random.key(0))
    g_sh = sharding_lib.param_shardings(boxed_g, mesh)
    d_sh = sharding_lib.param_shardings(boxed_d, mesh)
    rep = sharding_lib.replicated(mesh)

    def opt(tx, opt_state, sh):
        return optax.tree_map_params(tx, lambda _, s: s, opt_state, sh,
                                     transform_non_params=lambda _: rep)

    return abstract, {
        "step": rep, "params": g_sh, "opt_state": opt(g_tx, abstract["opt_state"], g_sh),
        "ema": [g_sh for _ in config.ema_decays], "nonfinite_step": rep,
        "d_step": rep, "d_params": d_sh, "d_opt_state": opt(d_tx, abstract["d_opt_state"], d_sh),
        "d_nonfinite_step": rep,
    }


def create_sharded_state(generator, discriminator, g_tx, d_tx, config, shardings) -> State:
    """The initial state, created directly in ``shardings``; seeded by ``config.seed``."""
    key = jax.random.key(config.seed)
    init = functools.partial(init_state, generator, discriminator, g_tx, d_tx, config)
    return jax.jit(init, out_shardings=shardings)(key)


def abstract_generator_params(config: ml_collections.ConfigDict, mesh) -> Any:
    """The generator's params as ``ShapeDtypeStruct``s with shardings (for restoring)."""
    generator, discriminator = create_models(config)
    boxed_g, _ = jax.eval_shape(
        functools.partial(_init_params, generator, discriminator, config), jax.random.key(0))
    shardings = sharding_lib.param_shardings(boxed_g, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.meta.unbox(boxed_g), shardings)


# --------------------------------------------------------------------------
# The two update steps (pure; jitted by jit_steps).
# --------------------------------------------------------------------------


def _latents(rng, n: int, config, batch_sh):
    """z ~ N(0, I) [n, latent_dim] and uniform class labels [n] (None if unconditional)."""
    z_rng, y_rng = jax.random.split(rng)
    z = jax.lax.with_sharding_constraint(
        jax.random.normal(z_rng, (n, config.model.latent_dim), jnp.float32), batch_sh)
    labels = None
    if config.model.num_classes:
        labels = jax.random.randint(y_rng, (n,), 0, config.model.num_classes, jnp.int32)
    return z, labels


def _d_part(state: State) -> State:
    """D's fields under the names ``train_step.apply_gradients`` uses (no EMA)."""
    return {"step": state["d_step"], "params": state["d_params"],
            "opt_state": state["d_opt_state"], "ema": [],
            "nonfinite_step": state["d_nonfinite_step"]}


def make_d_step(generator, discriminator, d_tx, config, batch_sh) -> Callable:
    """``d_step(state, batch) -> (state, metrics)``: one discriminator update on the real
    ``batch`` (image [B, H, W, C] in [-1, 1], label [B]) and B images of the current
    (raw) generator. Only the ``d_*`` fields change."""
    kind, gamma = config.gan.loss, config.gan.r1_gamma
    conditional = bool(config.model.num_classes)

    def d_step(state, batch):
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), _D_STREAM),
                                 state["d_step"])
        real = batch["image"]
        real_labels = batch["label"] if conditional else None
        z, fake_labels = _latents(rng, real.shape[0], config, batch_sh)
        fake = generator.apply({"params": state["params"]}, z, fake_labels)

        def loss_fn(d_params):
            def logits(x, y):
                return discriminator.apply({"params": d_params}, x, y)
            real_logits, fake_logits = logits(real, real_labels), logits(fake, fake_labels)
            loss = gan.discriminator_loss(real_logits, fake_logits, kind)
            metrics = dict(d_loss=loss, d_real_logit=jnp.mean(real_logits),
                           d_fake_logit=jnp.mean(fake_logits),
                           d_real_prob=jnp.mean(jax.nn.sigmoid(real_logits)),
                           d_fake_prob=jnp.mean(jax.nn.sigmoid(fake_logits)),
                           d_accuracy=gan.discriminator_accuracy(real_logits, fake_logits))
            if gamma:
                r1 = gan.r1_penalty(lambda x: logits(x, real_labels), real)
                loss = loss + 0.5 * gamma * r1
                metrics["r1"] = r1
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["d_params"])
        new, grad_norm = train_step_lib.apply_gradients(_d_part(state), grads, loss, d_tx, ())
        state = dict(state, d_step=new["step"], d_params=new["params"],
                     d_opt_state=new["opt_state"], d_nonfinite_step=new["nonfinite_step"])
        return state, dict(metrics, d_grad_norm=grad_norm)

    return d_step


def make_g_step(generator, discriminator, g_tx, config, batch_sh) -> Callable:
    """``g_step(state) -> (state, metrics)``: one generator update on ``batch_size``
    fresh latents against the current discriminator, then the EMA update. Only the
    generator's fields (``_G_KEYS``) change."""
    kind = config.gan.loss

    def g_step(state):
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), _G_STREAM),
                                 state["step"])
        z, labels = _latents(rng, config.batch_size, config, batch_sh)

        def loss_fn(g_params):
            fake = generator.apply({"params": g_params}, z, labels)
            logits = discriminator.apply({"params": state["d_params"]}, fake, labels)
            loss = gan.generator_loss(logits, kind)
            return loss, dict(g_loss=loss, g_fake_logit=jnp.mean(logits))

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        new, grad_norm = train_step_lib.apply_gradients(
            {k: state[k] for k in _G_KEYS}, grads, loss, g_tx, config.ema_decays)
        return dict(state, **new), dict(metrics, g_grad_norm=grad_norm)

    return g_step


def jit_steps(generator, discriminator, g_tx, d_tx, config, mesh, shardings
              ) -> tuple[Callable, Callable]:
    """(d_step, g_step) jitted with explicit shardings and the state donated."""
    batch_sh = sharding_lib.batch_sharding(mesh)
    rep = sharding_lib.replicated(mesh)
    d_step = jax.jit(make_d_step(generator, discriminator, d_tx, config, batch_sh),
                     in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep),
                     donate_argnums=(0,), compiler_options=xla_cpu.compiler_options())
    g_step = jax.jit(make_g_step(generator, discriminator, g_tx, config, batch_sh),
                     in_shardings=(shardings,), out_shardings=(shardings, rep),
                     donate_argnums=(0,), compiler_options=xla_cpu.compiler_options())
    return d_step, g_step


# --------------------------------------------------------------------------
# Generation: the sample_fn of sampling.generate, the Evaluator's generate_fn.
# --------------------------------------------------------------------------


def make_sample_fn(config: ml_collections.ConfigDict, mesh) -> Callable:
    """``sample_fn(params, rng, labels) -> images`` float32 [N, H, W, C] in [-1, 1]: one
    generator call on z ~ N(0, I) from ``rng``, sharded over the batch (the signature of
    ``sampling.make_sample_fn``, so ``sampling.generate`` batches and labels it)."""
    generator = dcgan.create_generator(config.model)
    batch_sh = sharding_lib.batch_sharding(mesh)
    conditional = bool(config.model.num_classes)

    def sample_fn(params, rng, labels):
        z = jax.lax.with_sharding_constraint(
            jax.random.normal(rng, (labels.shape[0], config.model.latent_dim), jnp.float32),
            batch_sh)
        return generator.apply({"params": params}, z, labels if conditional else None)

    return jax.jit(sample_fn, in_shardings=(None, None, batch_sh), out_shardings=batch_sh,
                   compiler_options=xla_cpu.compiler_options())


# sampling.generate validates sampler options; a GAN has none (one network call).
NO_SAMPLER = samplers.SamplerOptions(sampler="ddim", num_steps=1)


def make_generate_fn(config: ml_collections.ConfigDict, mesh,
                     sample_fn: Callable | None = None) -> evaluator_lib.GenerateFn:
    """The ``Evaluator``'s ``generate_fn`` for a generator: labels cycle over the classes."""
    sample_fn = sample_fn or make_sample_fn(config, mesh)

    def generate_fn(params, num_samples, seed, batch_size):
        return sampling.generate(config, params, mesh, NO_SAMPLER, num_samples=num_samples,
                                 labels=None, seed=seed, batch_size=batch_size,
                                 sample_fn=sample_fn)

    return generate_fn


def load_generator(workdir: str, config: ml_collections.ConfigDict, step: int | None = None,
                   ema_index: int | None = 0) -> tuple[int, Any, jax.sharding.Mesh]:
    """(step, generator params, mesh) of checkpoint ``step`` (None: the latest) of the GAN
    run in ``workdir``: EMA copy ``ema_index`` or, with None, the raw generator. Only
    those arrays are read (and verified against their checksums)."""
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.resolve_step(step)
        mesh = sharding_lib.create_mesh(-1, 1)
        params = ckpt.restore_params(step, abstract_generator_params(config, mesh),
                                     ema_index=ema_index)
    finally:
        ckpt.close()
    return step, params, mesh


# --------------------------------------------------------------------------
# The training loop.
# --------------------------------------------------------------------------


def _check_finite(state: State) -> None:
    for key, who in (("d_nonfinite_step", "discriminator"), ("nonfinite_step", "generator")):
        train_step_lib.check_finite(
            state, "Lower the learning rates, set grad_clip_norm, or add "
            "--config.gan.r1_gamma; resume from the last checkpoint.", key=key,
            what=f"{who} loss or gradient")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the GAN run in ``workdir`` until ``config.num_train_steps``
    iterations. Returns ``step`` (iterations), ``d_updates``, ``g_updates``, the last
    logged ``metrics`` and ``preempted``."""
    workdir = checkpointing.require_workdir(workdir)
    with contextlib.ExitStack() as cleanup:
        return _train(config, workdir, cleanup)


def _train(config, workdir: str, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    mesh_shape = config_validation.validate_config(
        config, num_devices=jax.device_count(), process_count=jax.process_count())
    info = input_pipeline.dataset_info(config.data, channels=config.model.in_channels)
    if config.model.num_classes and info.num_classes != config.model.num_classes:
        raise config_validation.ConfigError(
            f"The dataset has {info.num_classes} classes but config.model.num_classes="
            f"{config.model.num_classes}; set --config.model.num_classes={info.num_classes} "
            "(or 0 for an unconditional GAN).")
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    lock = cleanup.enter_context(workdir_lock.WorkdirLock(workdir))
    mesh = sharding_lib.create_mesh(*mesh_shape)
    batch_sh = sharding_lib.batch_sharding(mesh)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True)
    cleanup.callback(writer.close)
    cleanup.callback(writer.flush)

    generator, discriminator = create_models(config)
    g_tx, d_tx = create_optimizers(config)
    abstract, state_sh = state_shardings(generator, discriminator, g_tx, d_tx, config, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                      keep_every=config.keep_every_steps,
                                      async_save=config.async_checkpoints)
    cleanup.callback(ckpt.close)
    restored = ckpt.restore_latest(target, config)
    if restored is None:
        state, start = create_sharded_state(generator, discriminator, g_tx, d_tx, config,
                                            state_sh), 0
        logging.info("Initialised a new GAN run in %s.", workdir)
    else:
        state, start = restored
        logging.info("Resumed %s from iteration %d.", workdir, start)
    train_lib._write_config(config, workdir)  # pylint: disable=protected-access
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    writer.write_hparams({"num_params_generator": count(state["params"]),
                          "num_params_discriminator": count(state["d_params"])})

    d_step, g_step = jit_steps(generator, discriminator, g_tx, d_tx, config, mesh, state_sh)
    k, n_g = config.gan.d_steps_per_g_step, config.gan.g_steps_per_d_step

    sample_fn = make_sample_fn(config, mesh)
    generators = {"": 0}  # File / scalar suffix -> EMA index (None: raw params).
    if config.gan.eval_raw:
        generators["_raw"] = None
    params_of = lambda index: state["params"] if index is None else state["ema"][index]

    def write_samples(step: int) -> None:
        labels = sampling.replicate_labels(
            sampling.default_labels(config.sample.num_images, config.model.num_classes), mesh)
        for suffix, index in generators.items():
            images = sample_fn(params_of(index), jax.random.key(config.seed + 1), labels)
            grid = sampling.make_grid(sampling.to_uint8(
                multihost_utils.process_allgather(images, tiled=True)))
            if jax.process_index() == 0:
                sampling.save_png(os.path.join(workdir, "samples", f"step_{step:08d}{suffix}.png"),
                                  grid)
            writer.write_images(step, {f"samples{suffix}": grid[None]})

    evaluator = None
    if config.eval.every_steps:
        evaluator = evaluator_lib.Evaluator(
            config, mesh, workdir, generate_fn=make_generate_fn(config, mesh, sample_fn))

    data = input_pipeline.create_input_iterator(
        config.data, image_size=config.model.image_size,
        global_batch_size=config.batch_size * k, seed=config.seed, start_step=start,
        channels=config.model.in_channels)
    cleanup.callback(getattr(data, "close", lambda: None))
    report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                             writer=writer)
    preemption = train_lib._PreemptionFlag()  # pylint: disable=protected-access
    preemption.install()
    cleanup.callback(preemption.uninstall)
    pending, last = [], {}
    t_log, step_log = time.time(), start
    step, preempted = start, False
    while step < config.num_train_steps:
        local = next(data)
        per_step = len(local["image"]) // k
        for j in range(k):
            chunk = {key: v[j * per_step:(j + 1) * per_step] for key, v in local.items()}
            state, metrics = d_step(state, sharding_lib.global_batch(chunk, batch_sh))
            pending.append(metrics)
        for _ in range(n_g):
            state, metrics = g_step(state)
            pending.append(metrics)
        step += 1
        report(step)
        final = step == config.num_train_steps
        if step % config.log_every_steps == 0 or final:
            _check_finite(state)
            last = train_step_lib.mean_metrics(pending)
            now = time.time()
            last["iterations_per_sec"] = (step - step_log) / max(now - t_log, 1e-9)
            t_log, step_log, pending = now, step, []
            writer.write_scalars(step, last)
            writer.flush()
        if config.sample.every_steps and (step % config.sample.every_steps == 0 or final):
            with report.timed("sample"):
                write_samples(step)
        if evaluator is not None and (step % config.eval.every_steps == 0 or final):
            with report.timed("eval"):
                for suffix, index in generators.items():
                    results = evaluator(params_of(index), step, tag=suffix.lstrip("_"))
                    scalars = {f"eval{suffix}/{key}": v for key, v in results.items()}
                    writer.write_scalars(step, scalars)
                    last.update(scalars)
        preempted = preemption.reached(step)
        if step % config.checkpoint_every_steps == 0 or final or preempted:
            _check_finite(state)
            lock.check()
            with report.timed("checkpoint"):
                ckpt.save(step, state, config)
        if preempted:
            logging.warning("Stopping at iteration %d after preemption; checkpoint saved.", step)
            break
    return {"step": step, "d_updates": int(state["d_step"]), "g_updates": int(state["step"]),
            "metrics": last, "preempted": preempted}
