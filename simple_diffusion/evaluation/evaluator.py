"""Periodic sample-quality evaluation: sample, embed, compare with a reference.

Used by the trainer (every ``config.eval.every_steps``) and by the
``simple_diffusion.evaluate`` CLI. The sampler and feature network compile
once per Evaluator; reference statistics are cached as .npz.
"""

import dataclasses
import json
import os
from typing import Any, Callable

from etils import epath
import jax
import ml_collections
import numpy as np

from simple_diffusion import input_pipeline
from simple_diffusion import models
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion.evaluation import classifier as classifier_lib
from simple_diffusion.evaluation import features as features_lib
from simple_diffusion.evaluation import metrics as metrics_lib


def reference_stats(config: ml_collections.ConfigDict, extractor: Callable,
                    cache_dir: str) -> metrics_lib.FeatureStats:
    """Feature statistics of the reference split, computed once and cached as .npz."""
    from simple_diffusion import latent  # pylint: disable=g-import-not-at-top
    e = config.eval
    size, channels = latent.pixel_shape(config)  # Pixels also for latent-diffusion runs.
    source = config.data.folder if config.data.source == "folder" else config.data.name
    name = (f"ref_{source}_{e.reference_split}_{size}px"
            f"x{channels}_{e.feature}_{e.num_reference}.npz")
    name = name.strip("/").replace("/", "_")
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        return metrics_lib.load_stats(path)
    images = input_pipeline.load_images(config.data, image_size=size,
                                        num_examples=e.num_reference, split=e.reference_split,
                                        channels=channels)
    feats = np.asarray(extractor(images))
    stats = metrics_lib.compute_stats(feats, keep_for_kid=e.num_reference)
    if jax.process_index() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        metrics_lib.save_stats(path, stats.mu, stats.sigma, features=stats.features)
    return stats


# (params, num_samples, seed, batch_size) -> (uint8 [K, H, W, C] images, int32 [K] labels).
GenerateFn = Callable[[Any, int, int, int], tuple[np.ndarray, np.ndarray]]


class Evaluator:
    """Holds the compiled generator, the feature network and the reference stats,
    so periodic evaluation during training compiles once.

    Generation and scoring are separate: ``score`` rates any images (a GAN's, a
    VAE's, decoded latents), and ``generate_fn`` replaces the diffusion sampler
    for models that are not pixel-space diffusion models.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str,
                 *, model=None, generate_fn: GenerateFn | None = None):
        e = config.eval
        self.config, self.mesh, self.workdir = config, mesh, workdir
        # Classification accuracy of class-conditional samples (classifier.py;
        # trained once and cached if missing). A wrong dataset fails here, first.
        self.classifier = None
        if e.get("classifier") and config.model.get("num_classes"):
            classifier_lib.check_compatible(e.classifier, config)
            self.classifier = classifier_lib.load(e.classifier, data_config=config.data)
        self.extractor = features_lib.get_feature_extractor(
            e.feature, e.get("inception_weights"), return_logits=e.feature == "inception_v3")
        self._feature_fn = (lambda x: self.extractor(x)[0]) if e.feature == "inception_v3" \
            else self.extractor
        self.ref = reference_stats(config, self._feature_fn, os.path.join(workdir, "eval"))
        self.options = None
        if generate_fn is None:  # Pixel-space diffusion: the run's sampler (config.eval).
            self.model = model or models.create_model(config.model)
            self.options = samplers.SamplerOptions.from_config(e)
            self.sample_fn = sampling.make_sample_fn(self.model, config, mesh, self.options)

            def generate_fn(params, num_samples, seed, batch_size):
                return sampling.generate(
                    self.config, params, self.mesh, self.options, num_samples=num_samples,
                    labels=None, seed=seed, batch_size=batch_size, sample_fn=self.sample_fn)
        self.generate_fn = generate_fn

    def __call__(self, params: Any, step: int, tag: str = "") -> dict[str, float]:
        """Generates ``config.eval.num_samples`` images with ``params`` and scores them."""
        e = self.config.eval
        images, labels = self.generate_fn(params, e.num_samples, e.seed, e.batch_size)
        return self.score(images, labels, step, tag=tag)

    def score(self, images: np.ndarray, labels: np.ndarray, step: int,
              tag: str = "") -> dict[str, float]:
        """Metrics of uint8 [K, H, W, C] ``images`` generated for int32 [K] ``labels``.

        Writes ``<workdir>/eval/step_<step>.json`` (``eval/<tag>/step_<step>.json`` with a
        ``tag``, e.g. 'raw' for non-EMA params; process 0) and returns the metrics.
        """
        e = self.config.eval
        out = self.extractor(images)
        feats, logits = out if isinstance(out, tuple) else (out, None)
        results = metrics_lib.compute_metrics(
            np.asarray(feats), self.ref, feature_name=e.feature,
            gen_logits=None if logits is None else np.asarray(logits),
            kid_subset_size=min(1000, len(images), e.num_reference))
        results = {k: float(v) for k, v in results.items()}
        if self.classifier is not None:
            results.update(classifier_lib.accuracy_metrics(
                self.classifier.predict(images), labels, self.config.model.num_classes))
            results["classifier_test_accuracy"] = self.classifier.test_accuracy
        if jax.process_index() == 0:
            path = epath.Path(self.workdir) / "eval" / tag / f"step_{step:08d}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            options = None if self.options is None else dataclasses.asdict(self.options)
            path.write_text(json.dumps(dict(
                step=step, tag=tag, num_samples=len(images), num_reference=e.num_reference,
                reference_split=e.reference_split, feature=e.feature,
                classifier=self.classifier and self.classifier.path,
                sampler_options=options, **results), indent=2))
        return results
