r"""Sample-quality evaluation of a run: Fréchet distance and KID (and FID/IS).

  python -m simple_diffusion.evaluate --workdir=workdirs/demo [--step=N] \
      [--num_samples=1000] [--sampler=ddpm] [--steps=128] [--guidance=1.0] \
      [--feature=effnet_lite0 | --feature=inception_v3 --inception_weights=pt_inception.npz]

Every sampler option is a flag (simple_diffusion/sampler_flags.py, e.g.
--guidance_logsnr_min/max for a guidance interval); unset flags take the run's
``config.eval``. Generates samples from the EMA weights, embeds them and the
reference split of the run's dataset (``config.eval.reference_split``,
statistics cached in ``<workdir>/eval/``), and writes
``<workdir>/eval/step_<N>.json`` plus TensorBoard scalars ``eval/<metric>``.
Without the standard InceptionV3 weights (no registry ships them) the metric is
the Fréchet distance on EfficientNet-Lite0 features, reported as
``fd_effnet_lite0``, never as "FID". The trainer runs the same evaluation every
``config.eval.every_steps``.
"""

from simple_diffusion import cli_start

if __name__ == "__main__":
    # Before the imports below: it may restart the process (execve), which would
    # otherwise redo them (~2 s of jax, flax and TensorFlow imports per command).
    cli_start.prepare_process()

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import sys

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import jax

from simple_diffusion import config_validation
from simple_diffusion import distributed
from simple_diffusion import sampler_flags
from simple_diffusion import sampling
from simple_diffusion.evaluation import workdir_evaluation


_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Default: config.eval.num_samples.")
_NUM_REFERENCE = flags.DEFINE_integer("num_reference", None, "Default: config.eval.num_reference.")
_FEATURE = flags.DEFINE_enum("feature", None, ["effnet_lite0", "inception_v3"],
                             "Default: config.eval.feature.")
_INCEPTION = flags.DEFINE_string("inception_weights", None,
                                 "Converted pt_inception weights (.npz or the .pth).")
_CLASSIFIER = flags.DEFINE_string(
    "classifier", None, "Classification accuracy of conditional samples: 'fashion_mnist' or '' "
    "(off). Default: config.eval.classifier (runs saved before it existed: their dataset's).")
_EMA_INDEX = flags.DEFINE_integer(
    "ema_index", 0, "EMA copy (config.ema_decays order); -1 = the raw params (e.g. a GAN's "
    "raw generator). Index i > 0 / -1 writes eval/ema<i>/ / eval/raw/step_<N>.json.")


def run() -> dict:
    """Evaluates as the flags say; returns the step and the metrics."""
    config = sampling.load_run_config(_WORKDIR.value)
    autoencoder = "autoencoder" in config  # autoencoder_train.py: no sampler.
    options = None if autoencoder else sampler_flags.options_from_flags(config, "eval")
    overrides = dict(num_samples=_NUM_SAMPLES.value, num_reference=_NUM_REFERENCE.value,
                     feature=_FEATURE.value, inception_weights=_INCEPTION.value,
                     classifier=_CLASSIFIER.value,
                     **(dataclasses.asdict(options) if options else {}))
    for key, value in overrides.items():
        if value is not None:
            config.eval[key] = value
    for key in ("num_samples", "num_reference"):
        if config.eval[key] < 2:
            raise ValueError(f"--{key}={config.eval[key]} must be >= 2 (Fréchet distance needs "
                             "a covariance).")
    if config.eval.feature == "inception_v3" and not config.eval.get("inception_weights"):
        raise ValueError("--feature=inception_v3 needs --inception_weights (see "
                         "docs/evaluation.md for converting pt_inception-2015-12-05).")
    ema_index = None if _EMA_INDEX.value < 0 else _EMA_INDEX.value
    step, results = workdir_evaluation.evaluate_workdir(_WORKDIR.value, config, _STEP.value, ema_index=ema_index)
    tag = workdir_evaluation.results_tag(ema_index)
    writer = metric_writers.create_default_writer(
        _WORKDIR.value, just_logging=jax.process_index() > 0)
    writer.write_scalars(step, {f"eval{'_' if tag else ''}{tag}/{k}": v
                                for k, v in results.items()})
    writer.close()
    logging.info("Step %d: %s", step, results)
    return {"step": step, "params": tag or "ema0", **results}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed.initialize()
    try:
        print(json.dumps(run()))
    except (config_validation.ConfigError, ValueError, FileNotFoundError) as e:
        # Expected errors (flags, config, checkpoint, data): one line, no traceback.
        sys.exit(f"evaluate: error: {e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
