r"""Trains a KL autoencoder (LDM first stage) or a VAE: the trainer's parts, another loss.

  python -m simple_diffusion.main --config=configs/autoencoder_fashion_mnist.py \
      --workdir=workdirs/autoencoder_fashion_mnist
  python -m simple_diffusion.evaluate --workdir=workdirs/autoencoder_fashion_mnist

``main.py`` runs this for configs with an ``autoencoder`` section. A run is a
workdir like a diffusion run's (config.json, LOCK, checksummed orbax
checkpoints, TensorBoard events, ``samples/step_<N>.png``), and re-running
the command resumes it. The train state is the diffusion trainer's
(``step``, ``params``, ``opt_state``, ``ema``, ``nonfinite_step``; updated by
``train_step.apply_gradients``) plus, with a discriminator, ``disc`` (the same
layout, no EMA). Logged: loss, reconstruction loss, KL, PSNR, posterior std,
and with a GAN the adversarial terms. Evaluation (``config.eval.every_steps``
and at the end): reconstructions of the first ``eval.num_samples`` images of
``eval.reference_split`` scored against its reference statistics
(``recon/fd_effnet_lite0``: rFID-style, not FID) and their PSNR, written to
``eval/reconstruction/step_<N>.json``; with ``autoencoder.generate`` (a VAE)
also prior samples z ~ N(0, I) decoded and scored like any generator
(``eval/step_<N>.json``). Losses: ``simple_diffusion/autoencoder.py``.
"""

import contextlib
import functools
import json
import os
import time
from typing import Any, Callable

from absl import logging
from clu import metric_writers
from etils import epath
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from simple_diffusion import autoencoder as ae_lib
from simple_diffusion import checkpointing
from simple_diffusion import config_defaults
from simple_diffusion import config_validation
from simple_diffusion import input_pipeline
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import sampling
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion import workdir_lock
from simple_diffusion import xla_cpu
from simple_diffusion.evaluation import efficientnet_lite0
from simple_diffusion.evaluation import evaluator as evaluator_lib
from simple_diffusion.models import autoencoder as ae_models

# EfficientNet-Lite0 blocks whose outputs feed the perceptual term (strides 2, 4, 8, 16).
PERCEPTUAL_LAYERS = ("block_0", "block_2", "block_4", "block_7")
# Reconstruction metrics go to eval/reconstruction/step_<N>.json.
RECON_TAG = "reconstruction"
_AE_KEYS = ("step", "params", "opt_state", "ema", "nonfinite_step")


def default_section() -> ml_collections.ConfigDict:
    """``config.autoencoder``: the loss ([project] values unless noted, LDM's otherwise)."""
    return ml_collections.ConfigDict(dict(
        rec_loss="l1",            # 'l1' (LDM) | 'l2'.
        kl_weight=1e-6,           # beta on the per-example KL sum (LDM's kl_weight).
        perceptual_weight=0.0,    # LDM: 1.0 (LPIPS); here EfficientNet-Lite0 features.
        perceptual_size=224,      # Images are resized to this for the perceptual net.
        disc_weight=0.0,          # 0: no discriminator. LDM: 0.5 (times the adaptive weight).
        disc_start=0,             # GAN terms are on from this step (LDM: 50001).
        disc_channels=64, disc_layers=3,  # PatchGAN width and depth (LDM: 64, 3).
        disc_learning_rate=ml_collections.FieldReference(None, field_type=float),  # None: G's.
        generate=False,           # Also evaluate prior samples, decoded (the VAE).
    ))


def base_config() -> ml_collections.ConfigDict:
    """The run config of an autoencoder: ``config_defaults.base_config()``'s data,
    optimizer, EMA, mesh, logging and checkpoint fields, no diffusion sections, an
    ``autoencoder`` section, and ``sample``/``eval`` without sampler fields."""
    c = config_defaults.base_config()
    for key in ("schedule", "loss", "cond_drop_prob"):
        del c[key]
    eval_keys = ("every_steps", "num_samples", "num_reference", "reference_split", "feature",
                 "inception_weights", "seed", "batch_size")
    c.eval = ml_collections.ConfigDict({k: c.eval.get_ref(k) if k == "inception_weights"
                                        else c.eval[k] for k in eval_keys})
    c.sample = ml_collections.ConfigDict(dict(every_steps=1000, num_images=64))
    c.autoencoder = default_section()
    return c


def fashion_mnist() -> ml_collections.ConfigDict:
    """configs/autoencoder_fashion_mnist.py: f = 4, c = 4 on 32x32x1, LDM's loss without
    GAN and perceptual terms, 1000 steps of batch 64 [project]; the VAE config starts here."""
    c = base_config()
    c.model = ae_models.preset(32, 1, channels=(16, 32, 64), num_res_blocks=1,
                               latent_channels=4)
    c.data.name = "fashion_mnist_local"
    c.data.random_flip = False
    c.batch_size = 64
    c.num_train_steps = 1000
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"
    c.optimizer.final_lr_fraction = 0.1
    c.ema_decays = (0.999,)
    c.autoencoder.rec_loss = "l1"
    c.autoencoder.kl_weight = 1e-6
    c.sample.every_steps = 500
    c.sample.num_images = 32
    c.eval.every_steps = c.num_train_steps
    c.eval.reference_split = "test"
    c.eval.num_samples = 1000
    c.eval.num_reference = 2000
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    return c


def create_models(config: ml_collections.ConfigDict) -> tuple[nn.Module, nn.Module | None]:
    """The autoencoder and (if ``autoencoder.disc_weight`` > 0) the discriminator."""
    a = config.autoencoder
    disc = (ae_models.PatchDiscriminator(a.disc_channels, a.disc_layers)
            if a.disc_weight > 0 else None)
    return ae_models.from_config(config.model), disc


def _optimizers(config):
    tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
    d_opt = ml_collections.ConfigDict(config.optimizer.to_dict())
    if config.autoencoder.disc_learning_rate:
        d_opt.learning_rate = config.autoencoder.disc_learning_rate
    return tx, optimizer_lib.make_optimizer(d_opt, config.num_train_steps)


def init_state(model, disc, tx, disc_tx, config, rng) -> dict[str, Any]:
    size, ch = config.model.image_size, config.model.in_channels
    x = jnp.zeros((1, size, size, ch), jnp.float32)
    r_params, r_disc = jax.random.split(rng)
    params = nn.meta.unbox(model.init({"params": r_params}, x, sample=False)["params"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "ema": [params for _ in config.ema_decays],
             "nonfinite_step": jnp.full((), -1, jnp.int32)}
    if disc is not None:
        dparams = nn.meta.unbox(disc.init(r_disc, x)["params"])
        state["disc"] = {"step": jnp.zeros((), jnp.int32), "params": dparams,
                         "opt_state": disc_tx.init(dparams), "ema": [],
                         "nonfinite_step": jnp.full((), -1, jnp.int32)}
    return state


def abstract_params(config: ml_collections.ConfigDict, mesh) -> Any:
    """The autoencoder's params as ShapeDtypeStructs, replicated over ``mesh``."""
    model = ae_models.from_config(config.model)
    size, ch = config.model.image_size, config.model.in_channels
    shapes = jax.eval_shape(lambda r: model.init({"params": r}, jnp.zeros((1, size, size, ch)),
                                                 sample=False)["params"], jax.random.key(0))
    rep = sharding_lib.replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                        nn.meta.unbox(shapes))


def make_perceptual_fn(size: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(x, x_hat) in [-1, 1] -> [B] distance of EfficientNet-Lite0 features
    (``PERCEPTUAL_LAYERS``) at ``size`` x ``size``, differentiable (no quantisation)."""
    net = efficientnet_lite0.EfficientNetLite0()
    variables = efficientnet_lite0.load_variables()

    def features(x):
        x = (x + 1.0) * 127.5
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=True)
        _, state = net.apply(
            variables, efficientnet_lite0.normalize(x), mutable=["intermediates"],
            capture_intermediates=lambda m, name: name == "__call__" and m.name in
            PERCEPTUAL_LAYERS)
        inter = state["intermediates"]
        return [inter[name]["__call__"][0] for name in PERCEPTUAL_LAYERS]

    return lambda a, b: ae_lib.perceptual_distance(features(a), features(b))


def make_train_step(model, disc, tx, disc_tx, config: ml_collections.ConfigDict,
                    perceptual_fn: Callable | None = None):
    """``step(state, batch) -> (state, metrics)``; randomness ``fold_in(key(seed), step)``.

    One forward pass of the autoencoder; its VJP gives the gradients of the
    reconstruction + beta KL loss and (with a discriminator) of the adversarial
    term, which LDM's adaptive weight balances at the decoder's last layer.
    """
    a = config.autoencoder
    loss_kw = dict(rec_loss=a.rec_loss, kl_weight=a.kl_weight,
                   perceptual_weight=a.perceptual_weight, perceptual_fn=perceptual_fn)

    def step(state, batch):
        i = state["step"]
        rng = jax.random.fold_in(jax.random.key(config.seed), i)
        x = batch["image"]
        params = state["params"]
        outs, pullback = jax.vjp(
            lambda p: model.apply({"params": p}, x, sample=True, rngs={"latent": rng}), params)
        (loss, metrics), cot = jax.value_and_grad(
            lambda o: ae_lib.generator_losses(x, *o, **loss_kw), has_aux=True)(outs)
        grads = pullback(cot)[0]
        new_disc = None
        if disc is not None:
            x_hat = outs[0]
            dparams = state["disc"]["params"]
            factor = ae_lib.disc_factor(i, a.disc_start)
            g_adv, d_xhat = jax.value_and_grad(lambda xh: ae_lib.generator_adversarial_loss(
                disc.apply({"params": dparams}, xh)))(x_hat)
            adv_grads = pullback((d_xhat, jnp.zeros_like(outs[1]), jnp.zeros_like(outs[2])))[0]
            last = lambda g: g["decoder"]["conv_out"]["kernel"]
            lam = ae_lib.adaptive_weight(last(grads), last(adv_grads))
            w = factor * a.disc_weight * lam
            grads = jax.tree.map(lambda g, h: g + w * h, grads, adv_grads)
            loss = loss + w * g_adv

            def d_loss_fn(dp):
                real = disc.apply({"params": dp}, x)
                fake = disc.apply({"params": dp}, jax.lax.stop_gradient(x_hat))
                return factor * ae_lib.hinge_d_loss(real, fake), (real, fake)

            (d_loss, (real, fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(dparams)
            new_disc, _ = train_step_lib.apply_gradients(state["disc"], d_grads, d_loss, disc_tx,
                                                         ())
            metrics.update(g_adv=g_adv, d_loss=d_loss, adaptive_weight=lam, disc_factor=factor,
                           logits_real=jnp.mean(real), logits_fake=jnp.mean(fake))
        new_state, grad_norm = train_step_lib.apply_gradients(
            {k: state[k] for k in _AE_KEYS}, grads, loss, tx, config.ema_decays)
        if new_disc is not None:
            new_state["disc"] = new_disc
        lr = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
        return new_state, dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=lr(i))

    return step


def make_reconstruct_fn(model, mesh) -> Callable:
    """Jitted ``(params, images [-1, 1]) -> reconstructions`` through the posterior mean."""
    batch_sh = sharding_lib.batch_sharding(mesh)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, sample=False)[0],
                   in_shardings=(None, batch_sh), out_shardings=batch_sh,
                   compiler_options=xla_cpu.compiler_options())


def make_decode_fn(model, mesh) -> Callable:
    """Jitted ``(params, latents) -> images`` (float, about [-1, 1]), batch-sharded."""
    batch_sh = sharding_lib.batch_sharding(mesh)
    return jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode),
                   in_shardings=(None, batch_sh), out_shardings=batch_sh,
                   compiler_options=xla_cpu.compiler_options())


def _batches(n: int, batch: int, mesh) -> tuple[list[tuple[int, int]], int]:
    """Spans of ``n`` examples in batches of ``batch`` rounded up to the devices."""
    batch = -(-max(batch, 1) // mesh.size) * mesh.size
    return [(s, min(s + batch, n)) for s in range(0, n, batch)], batch


def reconstruct(reconstruct_fn, params, images: np.ndarray, mesh, batch_size: int) -> np.ndarray:
    """uint8 reconstructions of uint8 ``images`` [K, H, W, C], ``batch_size`` at a time."""
    spans, batch = _batches(len(images), batch_size, mesh)
    batch_sh = sharding_lib.batch_sharding(mesh)
    out = []
    for s, e in spans:
        x = images[s:e].astype(np.float32) / 127.5 - 1.0
        x = np.concatenate([x, np.zeros((batch - len(x),) + x.shape[1:], x.dtype)])
        y = reconstruct_fn(params, jax.device_put(x, batch_sh))
        out.append(sampling.to_uint8(multihost_utils.process_allgather(y, tiled=True))[:e - s])
    return np.concatenate(out)


def make_prior_generate_fn(model, config, mesh) -> evaluator_lib.GenerateFn:
    """The VAE as a generator: z ~ N(0, I) at the latent shape, decoded; an
    ``Evaluator`` ``generate_fn``. Batch i uses ``fold_in(key(seed), i)``."""
    decode = make_decode_fn(model, mesh)
    shape = ae_models.latent_shape(config.model)
    batch_sh = sharding_lib.batch_sharding(mesh)

    noise = jax.jit(lambda k, n: jax.random.normal(k, (n,) + shape), static_argnums=1,
                    out_shardings=batch_sh)

    def generate_fn(params, num_samples, seed, batch_size):
        spans, batch = _batches(num_samples, batch_size or num_samples, mesh)
        out = []
        for i, (s, e) in enumerate(spans):
            z = noise(jax.random.fold_in(jax.random.key(seed), i), batch)
            images = multihost_utils.process_allgather(decode(params, z), tiled=True)
            out.append(sampling.to_uint8(images)[:e - s])
        return np.concatenate(out), np.zeros((num_samples,), np.int32)

    return generate_fn


def reference_images(config, num: int) -> np.ndarray:
    return input_pipeline.load_images(config.data, image_size=config.model.image_size,
                                      num_examples=num, split=config.eval.reference_split,
                                      channels=config.model.in_channels)


def evaluate(config, evaluator, params, step: int, reconstruct_fn, images: np.ndarray,
             mesh) -> dict[str, float]:
    """Reconstruction metrics (``recon/*``: fd/kid on reconstructions of ``images``,
    PSNR), plus generation metrics for a VAE (``autoencoder.generate``)."""
    recon = reconstruct(reconstruct_fn, params, images, mesh, config.eval.batch_size)
    psnr = float(np.mean(ae_lib.psnr(jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
                                     jnp.asarray(recon, jnp.float32) / 127.5 - 1.0)))
    scores = evaluator.score(recon, np.zeros((len(recon),), np.int32), step, tag=RECON_TAG)
    results = {f"recon/{k}": v for k, v in scores.items()}
    results["recon/psnr"] = psnr
    if jax.process_index() == 0:  # Add the PSNR to score()'s record.
        path = epath.Path(evaluator.workdir) / "eval" / RECON_TAG / f"step_{step:08d}.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), psnr=psnr), indent=2))
    if config.autoencoder.generate:
        results.update(evaluator(params, step))
    return results


def _write_grids(config, model, params, images, reconstruct_fn, workdir, step, mesh, writer):
    recon = reconstruct(reconstruct_fn, params, images, mesh, len(images))
    pairs = np.stack([images, recon], axis=1).reshape((-1,) + images.shape[1:])
    grids = {"reconstructions": sampling.make_grid(pairs, num_cols=16)}
    if config.autoencoder.generate:
        prior, _ = make_prior_generate_fn(model, config, mesh)(params, len(images),
                                                                config.seed + 1, len(images))
        grids["samples"] = sampling.make_grid(prior)
    if jax.process_index() == 0:
        for name, grid in grids.items():
            prefix = "step" if name == "samples" else name
            sampling.save_png(os.path.join(workdir, "samples", f"{prefix}_{step:08d}.png"), grid)
    writer.write_images(step, {k: v[None] for k, v in grids.items()})


def _check_finite(state) -> None:
    train_step_lib.check_finite(
        state, "Lower config.optimizer.learning_rate and resume from the last checkpoint.",
        what="autoencoder loss or gradient")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the autoencoder run in ``workdir``; returns ``step`` and the
    last logged ``metrics`` (with the last evaluation's)."""
    workdir = checkpointing.require_workdir(workdir)
    mesh_shape = config_validation.validate_autoencoder_config(
        config, num_devices=jax.device_count(), process_count=jax.process_count())
    input_pipeline.dataset_info(config.data, channels=config.model.in_channels)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        lock = cleanup.enter_context(workdir_lock.WorkdirLock(workdir))
        mesh = sharding_lib.create_mesh(*mesh_shape)
        batch_sh, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
        model, disc = create_models(config)
        tx, disc_tx = _optimizers(config)
        init = functools.partial(init_state, model, disc, tx, disc_tx, config)
        abstract = jax.eval_shape(init, jax.random.key(0))
        state_sh = jax.tree.map(lambda _: rep, abstract)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                              abstract)
        ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                          keep_every=config.keep_every_steps,
                                          async_save=config.async_checkpoints)
        cleanup.callback(ckpt.close)
        restored = ckpt.restore_latest(target, config)
        if restored is None:
            state, start = jax.jit(init, out_shardings=state_sh)(jax.random.key(config.seed)), 0
        else:
            state, start = restored
            logging.info("Resumed %s from step %d.", workdir, start)
        if jax.process_index() == 0:
            (epath.Path(workdir) / "config.json").write_text(
                json.dumps(config.to_dict(), indent=2, default=str))
        writer = metric_writers.create_default_writer(
            workdir, just_logging=jax.process_index() > 0, asynchronous=False)
        cleanup.callback(writer.close)
        num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        writer.write_hparams({"num_params": num_params})
        a = config.autoencoder
        perceptual = make_perceptual_fn(a.perceptual_size) if a.perceptual_weight else None
        step_fn = jax.jit(make_train_step(model, disc, tx, disc_tx, config, perceptual),
                          in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep),
                          donate_argnums=(0,), compiler_options=xla_cpu.compiler_options())
        reconstruct_fn = make_reconstruct_fn(model, mesh)
        evaluator, eval_images = None, None
        if config.eval.every_steps:
            evaluator = evaluator_lib.Evaluator(
                config, mesh, workdir, generate_fn=make_prior_generate_fn(model, config, mesh))
            eval_images = reference_images(config, config.eval.num_samples)
        grid_images = None
        if config.sample.every_steps:
            grid_images = reference_images(config, config.sample.num_images)
        data = input_pipeline.create_input_iterator(
            config.data, image_size=config.model.image_size, global_batch_size=config.batch_size,
            seed=config.seed, start_step=start, channels=config.model.in_channels)
        cleanup.callback(data.close)
        step, pending, last = start, [], {}
        t0, t_start = time.time(), time.time()
        while step < config.num_train_steps:
            batch = sharding_lib.global_batch(next(data), batch_sh)
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append(metrics)
            final = step == config.num_train_steps
            if step % config.log_every_steps == 0 or final:
                _check_finite(state)
                last = train_step_lib.mean_metrics(pending)
                last["examples_per_sec"] = len(pending) * config.batch_size / max(
                    time.time() - t0, 1e-9)
                writer.write_scalars(step, last)
                logging.info("Autoencoder step %d: %s", step, last)
                pending, t0 = [], time.time()
            if step % config.checkpoint_every_steps == 0 or final:
                _check_finite(state)
                lock.check()
                ckpt.save(step, state, config)  # Before evaluation: a failed one loses nothing.
            ema = state["ema"][0]
            if config.sample.every_steps and (step % config.sample.every_steps == 0 or final):
                _write_grids(config, model, ema, grid_images, reconstruct_fn, workdir, step,
                             mesh, writer)
            if evaluator is not None and (step % config.eval.every_steps == 0 or final):
                results = evaluate(config, evaluator, ema, step, reconstruct_fn, eval_images,
                                   mesh)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
                logging.info("Autoencoder eval at step %d: %s", step, results)
                last.update({f"eval/{k}": v for k, v in results.items()})
            if not pending:  # Throughput excludes the grids, evaluation and checkpoints.
                t0 = time.time()
        last["train_wall_s"] = time.time() - t_start
    return {"step": step, "metrics": last}


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict, step: int | None = None,
                     ema_index: int | None = 0) -> tuple[int, dict[str, float]]:
    """``simple_diffusion.evaluate`` for an autoencoder / VAE run: ``evaluate`` on
    checkpoint ``step`` (None: the latest), EMA copy ``ema_index`` (None: raw)."""
    mesh = sharding_lib.create_mesh(-1, 1)
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.resolve_step(step)
        params = ckpt.restore_params(step, abstract_params(config, mesh), ema_index=ema_index)
    finally:
        ckpt.close()
    model = ae_models.from_config(config.model)
    evaluator = evaluator_lib.Evaluator(config, mesh, workdir,
                                        generate_fn=make_prior_generate_fn(model, config, mesh))
    images = reference_images(config, config.eval.num_samples)
    return step, evaluate(config, evaluator, params, step, make_reconstruct_fn(model, mesh),
                          images, mesh)
