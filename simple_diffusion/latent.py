"""Latent diffusion (Rombach et al. 2022): the diffusion trainer on a frozen autoencoder's latents.

  python -m simple_diffusion.main --config=configs/latent_fashion_mnist.py \
      --workdir=workdirs/latent_fashion_mnist

A latent run is an ordinary diffusion run (``train.py``) whose config has a
``latent`` section (``default_section``) naming a trained autoencoder workdir
(``autoencoder_train.py``). ``config.model`` is the denoiser at the latent
shape (``image_size`` = pixel_size / f, ``in_channels`` = c) and
``config.schedule.image_d`` is the latent resolution, so the SNR shift is
computed for the size the diffusion model sees. The trainer's hooks
(``prepare``, ``LatentSpace``):

* data: pixel batches encoded by the frozen encoder, z ~ q(z | x) (LDM trains
  on posterior samples), times the scale factor; either on the fly (one
  encoder pass per step) or from a cache of every training image's posterior
  (mean, log-variance) built at the first start and kept in
  ``<workdir>/latent_cache_step_<N>.npz`` for resumes (``config.latent.data``);
* scale factor: 1 / std of the latents of the first ``scale_num_batches``
  training batches (LDM's rule, there computed on one batch), unless given;
  stored in ``<workdir>/latent_scale.json`` with the autoencoder checkpoint it
  belongs to, so a resumed run keeps it, and in config.json, so sampling and
  evaluation read it;
* samples: the diffusion sampler's latents / scale, decoded to pixels (grids,
  ``simple_diffusion.sample``, evaluation), so evaluation is in pixel space
  against the same reference statistics as pixel-space models.
"""

import json
import time
from typing import Callable

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from simple_diffusion import autoencoder as ae_lib
from simple_diffusion import autoencoder_train
from simple_diffusion import checkpointing
from simple_diffusion import config_validation
from simple_diffusion import input_pipeline
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import xla_cpu
from simple_diffusion.models import autoencoder as ae_models

SCALE_FILE = "latent_scale.json"
_LATENT_STREAM = 0x1A7E  # Folded into the seed for the posterior samples of each step.
_CACHE_BATCH = 256


def default_section() -> ml_collections.ConfigDict:
    """``config.latent``; the denoiser, schedule and loss are the usual sections."""
    return ml_collections.ConfigDict(dict(
        autoencoder_workdir=ml_collections.FieldReference(None, field_type=str),  # Required.
        autoencoder_step=ml_collections.FieldReference(None, field_type=int),  # None: latest.
        autoencoder_ema_index=0,  # EMA copy of the autoencoder (config.ema_decays order).
        pixel_size=32,            # The data's resolution and channels (the autoencoder's).
        pixel_channels=1,
        # None: 1 / std of the latents of the first scale_num_batches batches.
        scale_factor=ml_collections.FieldReference(None, field_type=float),
        scale_num_batches=8,
        data="cached",            # 'cached' | 'on_the_fly' (docs/latent.md has both speeds).
    ))


def pixel_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(size, channels) of the run's images: the data's, also for latent runs."""
    if "latent" in config:
        return config.latent.pixel_size, config.latent.pixel_channels
    return config.model.image_size, config.model.in_channels


class LatentSpace:
    """A frozen autoencoder checkpoint, restored replicated over ``mesh``; encodes
    batches to scaled latents and decodes scaled latents to pixels."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        l = config.latent
        config_validation.check_autoencoder_workdir(l.autoencoder_workdir)
        self.ae_config = sampling.load_run_config(l.autoencoder_workdir)
        m = self.ae_config.model
        h, _, c = ae_models.latent_shape(m)
        want = (l.pixel_size, l.pixel_channels, h, c)
        have = (m.image_size, m.in_channels, config.model.image_size, config.model.in_channels)
        if want != have:
            raise config_validation.ConfigError(
                f"The autoencoder in {l.autoencoder_workdir} maps {m.image_size}x{m.image_size}x"
                f"{m.in_channels} images to {h}x{h}x{c} latents; set --config.latent.pixel_size="
                f"{m.image_size} --config.latent.pixel_channels={m.in_channels} "
                f"--config.model.image_size={h} --config.schedule.image_d={h} "
                f"--config.model.in_channels={c}.")
        self.config, self.mesh = config, mesh
        self.model = ae_models.from_config(m)
        ckpt = checkpointing.Checkpointer(l.autoencoder_workdir, async_save=False)
        try:
            self.step = ckpt.resolve_step(l.autoencoder_step)
            self.params = ckpt.restore_params(
                self.step, autoencoder_train.abstract_params(self.ae_config, mesh),
                ema_index=l.autoencoder_ema_index)
        finally:
            ckpt.close()
        self.scale = l.scale_factor
        self.cache_path = None  # Set by prepare: <workdir>/latent_cache_step_<N>.npz.
        batch_sh = sharding_lib.batch_sharding(mesh)
        model = self.model
        self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode),
                               in_shardings=(None, batch_sh), out_shardings=(batch_sh, batch_sh),
                               compiler_options=xla_cpu.compiler_options())
        self._sample = jax.jit(
            lambda mean, logvar, rng, scale: scale * ae_lib.sample_posterior(rng, mean, logvar),
            in_shardings=(batch_sh, batch_sh, None, None), out_shardings=batch_sh)
        self._decode = autoencoder_train.make_decode_fn(model, mesh)

    # -- data --------------------------------------------------------------

    def encode_batch(self, batch: dict[str, jax.Array], step: int,
                     scale: float | None = None) -> dict[str, jax.Array]:
        """A global batch of pixels (``image``) or cached posteriors (``mean``,
        ``logvar``) -> ``{'image': scaled latent samples, 'label'}``; the posterior
        noise of step ``step`` is ``fold_in(key(seed ^ stream), step)``."""
        if "image" in batch:
            mean, logvar = self._encode(self.params, batch["image"])
        else:
            mean, logvar = batch["mean"], batch["logvar"]
        rng = jax.random.fold_in(jax.random.key(self.config.seed ^ _LATENT_STREAM), step)
        scale = self.scale if scale is None else scale
        return {"image": self._sample(mean, logvar, rng, jnp.float32(scale)),
                "label": batch["label"]}

    def pixel_iterator(self, start_step: int, batch_size: int | None = None, *,
                       process_index=None, process_count=None) -> input_pipeline.InputIterator:
        size, channels = pixel_shape(self.config)
        return input_pipeline.create_input_iterator(
            self.config.data, image_size=size, global_batch_size=batch_size or
            self.config.batch_size, seed=self.config.seed, start_step=start_step,
            channels=channels, process_index=process_index, process_count=process_count)

    def compute_scale_factor(self) -> tuple[float, float]:
        """(1 / std, std) of unscaled latent samples of the first training batches."""
        l, batch_sh = self.config.latent, sharding_lib.batch_sharding(self.mesh)
        latents = []
        with self.pixel_iterator(0) as it:
            for step in range(l.scale_num_batches):
                batch = sharding_lib.global_batch(next(it), batch_sh)
                z = self.encode_batch(batch, step, scale=1.0)["image"]
                latents.append(np.asarray(jax.device_get(
                    multihost_utils.process_allgather(z, tiled=True))))
        std = float(np.std(np.concatenate(latents)))
        return float(ae_lib.latent_scale_factor(jnp.asarray(np.concatenate(latents)))), std

    def build_cache(self, path: str | None = None) -> dict[str, np.ndarray]:
        """Posterior mean and log-variance of every training example (and its label),
        indexed by example: one pass of the training split through the encoder. With
        ``path`` (a .npz) it is read from there if present, else written there."""
        if path is not None and epath.Path(path).exists():
            with epath.Path(path).open("rb") as f:
                return dict(np.load(f))
        if jax.process_count() > 1:
            raise config_validation.ConfigError(
                "config.latent.data='cached' is single-process; use "
                "--config.latent.data=on_the_fly.")
        num = input_pipeline.dataset_info(self.config.data,
                                          channels=pixel_shape(self.config)[1]).num_examples
        batch = -(-_CACHE_BATCH // self.mesh.size) * self.mesh.size
        indexer = input_pipeline.IndexSampler(num, batch, self.config.seed)
        batch_sh = sharding_lib.batch_sharding(self.mesh)
        h, w, c = ae_models.latent_shape(self.ae_config.model)
        cache = {"mean": np.zeros((num, h, w, c), np.float32),
                 "logvar": np.zeros((num, h, w, c), np.float32),
                 "label": np.zeros((num,), np.int32)}
        start = time.time()
        with self.pixel_iterator(0, batch) as it:
            for step in range(-(-num // batch)):  # Epoch 0 visits every example once.
                local = next(it)
                mean, logvar = self._encode(self.params, jax.device_put(local["image"], batch_sh))
                idx = indexer.indices(step)
                cache["mean"][idx], cache["logvar"][idx] = jax.device_get((mean, logvar))
                cache["label"][idx] = local["label"]
        logging.info("Latent cache: %d examples encoded in %.1f s.", num, time.time() - start)
        if path is not None and jax.process_index() == 0:
            tmp = epath.Path(path + ".tmp")
            with tmp.open("wb") as f:
                np.savez(f, **cache)
            tmp.rename(path)
        return cache

    def input_iterator(self, start_step: int) -> input_pipeline.InputIterator:
        """This process's batches from ``start_step``: pixels for ``encode_batch``
        ('on_the_fly'), or cached posteriors of the same examples ('cached')."""
        if self.config.latent.data == "on_the_fly":
            return self.pixel_iterator(start_step)
        cache = self.build_cache(self.cache_path)
        indexer = input_pipeline.IndexSampler(len(cache["label"]), self.config.batch_size,
                                              self.config.seed)

        def make_batch(step):
            idx = indexer.indices(step)
            return {k: v[idx] for k, v in cache.items()}

        return input_pipeline.InputIterator(make_batch, start_step=start_step,
                                            prefetch=self.config.data.prefetch)

    # -- samples -----------------------------------------------------------

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents [B, h, w, c] -> images [B, H, W, C] (about [-1, 1])."""
        return self._decode(self.params, latents / self.scale)

    def decoding(self, sample_fn: Callable) -> Callable:
        """``sample_fn(params, rng, labels) -> latents`` made to return pixels."""
        return lambda params, rng, labels: self.decode(sample_fn(params, rng, labels))

    def make_generate_fn(self, model, config: ml_collections.ConfigDict) -> Callable:
        """An ``Evaluator`` ``generate_fn``: the run's ``config.eval`` sampler, decoded."""
        options = samplers.SamplerOptions.from_config(config.eval)
        sample_fn = self.decoding(sampling.make_sample_fn(model, config, self.mesh, options))

        def generate_fn(params, num_samples, seed, batch_size):
            return sampling.generate(config, params, self.mesh, options, num_samples=num_samples,
                                     labels=None, seed=seed, batch_size=batch_size,
                                     sample_fn=sample_fn)

        return generate_fn


def prepare(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh
            ) -> tuple[ml_collections.ConfigDict, LatentSpace]:
    """The run's config with ``latent.scale_factor`` and ``latent.autoencoder_step``
    resolved, and its ``LatentSpace``. The scale factor comes from
    ``<workdir>/latent_scale.json`` (a resumed run), else the config, else the
    data; a new value is written there."""
    space = LatentSpace(config, mesh)
    l = config.latent
    path = epath.Path(workdir) / SCALE_FILE
    if path.exists():
        record = json.loads(path.read_text())
        if (record["autoencoder_workdir"], record["autoencoder_step"]) != (
                str(l.autoencoder_workdir), space.step):
            raise config_validation.ConfigError(
                f"{path} belongs to autoencoder {record['autoencoder_workdir']} step "
                f"{record['autoencoder_step']}, not {l.autoencoder_workdir} step {space.step}: "
                "resume with that autoencoder (--config.latent.autoencoder_step=...) or use a "
                "new --workdir.")
        if l.scale_factor is not None and not np.isclose(l.scale_factor,
                                                         record["scale_factor"]):
            raise config_validation.ConfigError(
                f"config.latent.scale_factor={l.scale_factor} differs from the "
                f"{record['scale_factor']} this run was trained with ({path}).")
        scale = record["scale_factor"]
    else:
        record = dict(autoencoder_workdir=str(l.autoencoder_workdir),
                      autoencoder_step=space.step, source="config", scale_factor=l.scale_factor)
        if l.scale_factor is None:
            start = time.time()
            scale, std = space.compute_scale_factor()
            record.update(source=f"1/std of the latents of {l.scale_num_batches} batches of "
                          f"{config.batch_size}", scale_factor=scale, latent_std=std,
                          seconds=time.time() - start)
        scale = record["scale_factor"]
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2))
    logging.info("Latent space: autoencoder %s step %d, scale factor %.4f.",
                 l.autoencoder_workdir, space.step, scale)
    config = ml_collections.ConfigDict(config.to_dict())
    config.latent.scale_factor = float(scale)
    config.latent.autoencoder_step = space.step
    space.config, space.scale = config, float(scale)
    space.cache_path = str(epath.Path(workdir) / f"latent_cache_step_{space.step}.npz")
    return config, space


def load(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> LatentSpace:
    """The ``LatentSpace`` of a trained latent run's config (its config.json holds the
    scale factor and the autoencoder step), for sampling and evaluation."""
    if config.latent.scale_factor is None:
        raise config_validation.ConfigError(
            "config.latent.scale_factor is unset: this config.json is not from a latent run "
            "that started training.")
    return LatentSpace(config, mesh)

