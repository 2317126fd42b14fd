"""Evaluation of a run's checkpoint: restore its weights, build its generator, score.

Library half of the ``simple_diffusion.evaluate`` CLI (which adds flags and
TensorBoard output), used also by the experiment runner. Pixel diffusion runs
sample with their ``config.eval`` sampler; autoencoder, DCGAN and latent
diffusion runs plug their own generation into the same ``Evaluator``.
"""

from typing import Any

from simple_diffusion import checkpointing
from simple_diffusion import models
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion.evaluation import classifier as classifier_lib
from simple_diffusion.evaluation import evaluator as evaluator_lib


def results_tag(ema_index: int | None) -> str:
    """Where results of these params go: '' (EMA 0), 'ema<i>' or 'raw'."""
    return "raw" if ema_index is None else (f"ema{ema_index}" if ema_index else "")


def load_ema_params(workdir: str, config, step: int | None = None, ema_index: int | None = 0):
    """(step, EMA params, model, mesh) of checkpoint ``step`` (None: the latest) of the
    diffusion run in ``workdir``, sharded over all devices (``ema_index`` None: raw)."""
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.resolve_step(step)
        mesh = sharding_lib.create_mesh(-1, 1)
        model = models.create_model(config.model)
        abstract, _ = train_step_lib.sharded_abstract_params(model, config, mesh)
        params = ckpt.restore_params(step, abstract, ema_index=ema_index)
    finally:
        ckpt.close()
    return step, params, model, mesh


def load_for_evaluation(workdir: str, config, step: int | None = None,
                        ema_index: int | None = 0) -> tuple[int, Any, evaluator_lib.Evaluator]:
    """(step, params, Evaluator) of checkpoint ``step`` (None: the latest) of any run:
    the Evaluator's ``generate_fn`` makes this run's samples (a diffusion run's
    ``config.eval`` sampler, decoded latents, a GAN's generator, a VAE's prior), so
    ``evaluator(params, step)`` scores them and ``evaluator.generate_fn`` times them.
    ``ema_index``: the EMA copy (None: the raw params)."""
    if "classifier" not in config.eval and "autoencoder" not in config:
        # Runs saved before config.eval.classifier existed: their dataset's classifier.
        config.eval.classifier = classifier_lib.default_for(config)
    if "autoencoder" in config:  # autoencoder_train.py: the VAE's prior samples.
        from simple_diffusion import autoencoder_train  # pylint: disable=g-import-not-at-top
        from simple_diffusion.models import autoencoder as ae_models  # pylint: disable=g-import-not-at-top
        mesh = sharding_lib.create_mesh(-1, 1)
        ckpt = checkpointing.Checkpointer(workdir, async_save=False)
        try:
            step = ckpt.resolve_step(step)
            params = ckpt.restore_params(
                step, autoencoder_train.abstract_params(config, mesh), ema_index=ema_index)
        finally:
            ckpt.close()
        generate_fn = autoencoder_train.make_prior_generate_fn(
            ae_models.from_config(config.model), config, mesh)
        return step, params, evaluator_lib.Evaluator(config, mesh, workdir,
                                                     generate_fn=generate_fn)
    if "gan" in config:  # A DCGAN run (gan_train.py): its generator, one call per image.
        from simple_diffusion import gan_train  # pylint: disable=g-import-not-at-top
        step, params, mesh = gan_train.load_generator(workdir, config, step, ema_index)
        return step, params, evaluator_lib.Evaluator(
            config, mesh, workdir, generate_fn=gan_train.make_generate_fn(config, mesh))
    step, params, model, mesh = load_ema_params(workdir, config, step, ema_index)
    generate_fn = None
    if "latent" in config:  # latent.py: the sampler's latents decoded to pixels.
        from simple_diffusion import latent  # pylint: disable=g-import-not-at-top
        generate_fn = latent.load(config, mesh).make_generate_fn(model, config)
    return step, params, evaluator_lib.Evaluator(config, mesh, workdir, model=model,
                                                 generate_fn=generate_fn)


def evaluate_workdir(workdir: str, config, step: int | None = None,
                     ema_index: int | None = 0) -> tuple[int, dict]:
    """Scores checkpoint ``step`` (None: the latest) of the run in ``workdir``
    with the evaluation settings of ``config.eval``; returns (step, metrics).
    ``ema_index``: the EMA copy to score (None: the raw params).

    Writes ``<workdir>/eval/step_<N>.json`` (and caches reference statistics there).
    """
    if "autoencoder" in config:  # Reconstructions (rFID-style) besides the VAE's samples.
        from simple_diffusion import autoencoder_train  # pylint: disable=g-import-not-at-top
        return autoencoder_train.evaluate_workdir(workdir, config, step, ema_index)
    step, params, evaluator = load_for_evaluation(workdir, config, step, ema_index)
    return step, evaluator(params, step, tag=results_tag(ema_index))
