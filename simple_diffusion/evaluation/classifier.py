r"""A small Fashion-MNIST classifier, and the accuracy of class-conditional samples.

A class-conditional model should draw a sandal when asked for a sandal. The
Fréchet distance (``fd_effnet_lite0``) compares the distribution of all samples
with the data and does not look at the labels at all: a model that draws good
shirts for every label can score well. This module adds the complementary
measure: a classifier trained on the real data labels each sample, and the
metric is the fraction of samples classified as the class they were generated
for, overall and per class (``accuracy_metrics``).

Train (and cache) it with

  python -m simple_diffusion.evaluation.classifier [--data_dir=...] [--force]

which prints its test accuracy. The weights are cached as
``<cache>/fashion_mnist_classifier.msgpack`` with a JSON sidecar holding the
measured test accuracy (overall and per class), the training time and the
settings; ``<cache>`` is ``$SIMPLE_DIFFUSION_CACHE`` or
``~/.cache/simple_diffusion``. The evaluator (``config.eval.classifier =
'fashion_mnist'``) trains it once when the cache is missing: it needs nothing
but the offline Fashion-MNIST package and 1-5 minutes of CPU, and training is
deterministic, so a fresh checkout's demo run evaluates without a manual step.

The network: a 5x5 stride-2 conv (32 channels), a 3x3 stride-2 conv (64
channels), ReLU, a 256-unit hidden layer; ~0.84M parameters. Input:
uint8 [N, H, W, 1] square images of any size, resized inside to 28 x 28
(bilinear with antialiasing, i.e. area-like averaging when shrinking), so it
scores 32 px and 128 px samples alike. Training: Fashion-MNIST train split read
through ``input_pipeline`` at the native 28 x 28, light augmentation (random
shifts of up to 2 pixels, and half of each batch passed through a random
28 -> {24..40} -> 28 resize round trip so upsampled and downsampled images look
familiar), Adam with a cosine-decayed learning rate, a fixed seed.
"""

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import sys
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simple_diffusion import input_pipeline
from simple_diffusion.datasets import fashion_mnist_local

IMAGE_SIZE = fashion_mnist_local.IMAGE_SIZE
CLASS_NAMES = fashion_mnist_local.CLASS_NAMES
NUM_CLASSES = len(CLASS_NAMES)


def per_class_markdown(rows: dict[str, tuple[list[float], float]]) -> str:
    """A Markdown table of classifier accuracy per class: ``rows`` maps a row name to
    (accuracy of the samples asked for each class, in label order; overall accuracy)."""
    lines = ["| | " + " | ".join(CLASS_NAMES) + " | all |",
             "| --- |" + " ---: |" * (len(CLASS_NAMES) + 1)]
    for name, (per_class, overall) in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in per_class)
                     + f" | {overall:.3f} |")
    return "\n".join(lines) + "\n"


# Classifier name -> the TFDS dataset names (config.data.name) it was trained for.
CLASSIFIERS = {"fashion_mnist": ("fashion_mnist_local", "fashion_mnist")}
CACHE_ENV = "SIMPLE_DIFFUSION_CACHE"
TRAIN_COMMAND = "python -m simple_diffusion.evaluation.classifier"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What ``train`` does; the defaults make the cached classifier."""

    epochs: int = 6
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    max_shift: int = 2
    num_train: int = 0  # 0: the whole train split.


class FashionMnistCNN(nn.Module):
    """float [N, 28, 28, 1] in [0, 1] -> logits [N, 10]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = (x - 0.5) * 2.0
        # Strided convolutions rather than pooling: 5x faster to train on XLA:CPU.
        x = nn.relu(nn.Conv(32, (5, 5), strides=2)(x))   # 14 x 14
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))   # 7 x 7
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(NUM_CLASSES)(x)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [N, S, S, 1] (any S) -> float32 [N, 28, 28, 1] in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[-1] != 1:
        raise ValueError(f"The Fashion-MNIST classifier takes square greyscale images "
                         f"[N, S, S, 1], got {images.shape}.")
    if images.dtype != jnp.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    x = images.astype(jnp.float32) / 255.0
    if images.shape[1] != IMAGE_SIZE:
        x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), method="bilinear",
                             antialias=True)
    return x


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: nn.Module, params, images: jax.Array) -> jax.Array:
    return model.apply({"params": params}, preprocess(images))


def predict_logits(params, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Logits [N, 10] of uint8 [N, S, S, 1] images, ``batch_size`` at a time."""
    model = FashionMnistCNN()
    out = [np.asarray(_logits(model, params, jnp.asarray(images[i:i + batch_size])))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, NUM_CLASSES), np.float32)


def accuracy_metrics(predicted: np.ndarray, labels: np.ndarray,
                     num_classes: int) -> dict[str, float]:
    """The accuracy of predicted class ids against the labels samples were drawn for.

    Returns ``classifier_accuracy`` (the fraction of all samples whose
    prediction equals their label) and ``classifier_accuracy_class_<k>`` (the
    same over the samples of label k) for each k in [0, num_classes) that
    occurs in ``labels``.
    """
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or labels.ndim != 1 or not labels.size:
        raise ValueError(f"predicted {predicted.shape} and labels {labels.shape} must be the "
                         "same non-empty [K] shape.")
    correct = predicted == labels
    out = {"classifier_accuracy": float(correct.mean())}
    for k in range(num_classes):
        mask = labels == k
        if mask.any():
            out[f"classifier_accuracy_class_{k}"] = float(correct[mask].mean())
    return out


# ---------------------------------------------------------------------------
# Data and training.


def fashion_mnist_data_config(data_dir: str | None = None) -> ml_collections.ConfigDict:
    """A ``config.data`` for the offline Fashion-MNIST (prepared on first use)."""
    from simple_diffusion import config_defaults  # pylint: disable=g-import-not-at-top
    data = config_defaults.base_config().data
    data.name = "fashion_mnist_local"
    data.data_dir = data_dir
    data.random_flip = False
    data.prefetch = 0
    return data


def load_split(data_config: ml_collections.ConfigDict, split: str, *,
               image_size: int = IMAGE_SIZE, num_examples: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, S, S, 1] images, int32 [N] labels) of a split, in a fixed shuffled order.

    Read through ``input_pipeline.create_input_iterator`` as one batch (epoch 0
    of its seed-0 permutation), so preprocessing is the training pipeline's.
    """
    data = ml_collections.ConfigDict(data_config.to_dict())
    data.split, data.prefetch, data.random_flip = split, 0, False
    n = num_examples or input_pipeline.dataset_info(data, channels=1).num_examples
    with input_pipeline.create_input_iterator(
            data, image_size=image_size, global_batch_size=n, seed=0, process_index=0,
            process_count=1, channels=1) as it:
        batch = next(it)
    images = np.clip(np.round((batch["image"] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return images, batch["label"].astype(np.int32)


def _augment(rng: np.random.Generator, images: np.ndarray, max_shift: int) -> np.ndarray:
    """Random shifts (zero padding) of up to ``max_shift`` px, uint8 [B, 28, 28, 1]."""
    b, h, w, _ = images.shape
    m = max_shift
    padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
    dy, dx = rng.integers(0, 2 * m + 1, size=(2, b))
    rows = dy[:, None] + np.arange(h)[None]
    cols = dx[:, None] + np.arange(w)[None]
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _round_trip(x: jax.Array, size: int) -> jax.Array:
    """28 -> size -> 28 px (bilinear, antialiased): the blur of a resampled sample."""
    n = x.shape[0]
    x = jax.image.resize(x, (n, size, size, 1), method="bilinear", antialias=True)
    return jax.image.resize(x, (n, IMAGE_SIZE, IMAGE_SIZE, 1), method="bilinear",
                            antialias=True)


def train(data_config: ml_collections.ConfigDict, settings: TrainSettings = TrainSettings(),
          *, log_every: int = 100) -> tuple[Any, dict]:
    """Trains the classifier; returns (params, info) with the measured test accuracy.

    ``info``: test_accuracy (native 28 px test split), test_accuracy_32px (the
    test split read at 32 px, as the 32 px demo's reference), per-class test
    accuracy, train_seconds, the settings, /proc/loadavg before and after.
    """
    loadavg_before = _loadavg()
    t0 = time.time()
    train_x, train_y = load_split(data_config, "train", num_examples=settings.num_train)
    test_x, test_y = load_split(data_config, "test")
    load_seconds = time.time() - t0
    model = FashionMnistCNN()
    steps_per_epoch = len(train_x) // settings.batch_size
    total_steps = settings.epochs * steps_per_epoch
    tx = optax.adam(optax.cosine_decay_schedule(settings.learning_rate, total_steps, 0.05))
    params = model.init(jax.random.key(settings.seed),
                        jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))["params"]
    opt_state = tx.init(params)
    sizes = (24, 32, 40)

    @jax.jit
    def step(params, opt_state, images, labels, key):
        x = images.astype(jnp.float32) / 255.0
        # Half the batch through a 28 -> {24, 32, 40} -> 28 round trip.
        half = x.shape[0] // 2
        size_index = jax.random.randint(key, (), 0, len(sizes))
        blurred = jax.lax.switch(size_index, [functools.partial(_round_trip, size=s)
                                              for s in sizes], x[:half])
        x = jnp.concatenate([blurred, x[half:]])

        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(settings.seed)
    key = jax.random.key(settings.seed + 1)
    t1 = time.time()
    for epoch in range(settings.epochs):
        order = rng.permutation(len(train_x))
        for i in range(steps_per_epoch):
            idx = order[i * settings.batch_size:(i + 1) * settings.batch_size]
            images = _augment(rng, train_x[idx], settings.max_shift)
            key, sub = jax.random.split(key)
            params, opt_state, loss = step(params, opt_state, images, train_y[idx], sub)
            if log_every and (i + 1) % log_every == 0:
                logging.info("classifier epoch %d step %d/%d loss %.4f", epoch, i + 1,
                             steps_per_epoch, float(loss))
    jax.block_until_ready(params)
    train_seconds = time.time() - t1
    predicted = predict_logits(params, test_x).argmax(-1)
    per_class = accuracy_metrics(predicted, test_y, NUM_CLASSES)
    test32_x, test32_y = load_split(data_config, "test", image_size=32)
    acc32 = accuracy_metrics(predict_logits(params, test32_x).argmax(-1), test32_y, NUM_CLASSES)
    info = dict(
        classifier="fashion_mnist",
        test_accuracy=per_class["classifier_accuracy"],
        test_accuracy_per_class=[per_class[f"classifier_accuracy_class_{k}"]
                                 for k in range(NUM_CLASSES)],
        test_accuracy_32px=acc32["classifier_accuracy"],
        num_test=int(len(test_y)), num_train=int(len(train_y)),
        class_names=list(CLASS_NAMES),
        train_seconds=round(train_seconds, 1), load_seconds=round(load_seconds, 1),
        loadavg_before=loadavg_before, loadavg_after=_loadavg(),
        num_params=int(sum(x.size for x in jax.tree.leaves(params))),
        settings=dataclasses.asdict(settings), jax_version=jax.__version__)
    return params, info


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------
# Cache.


def cache_dir() -> str:
    """``$SIMPLE_DIFFUSION_CACHE``, else ``~/.cache/simple_diffusion``."""
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "simple_diffusion")


def weights_path(name: str = "fashion_mnist", directory: str | None = None) -> str:
    """Where classifier ``name``'s weights are cached (the JSON sidecar: .json)."""
    return os.path.join(directory or cache_dir(), f"{name}_classifier.msgpack")


def _sidecar(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def save(params, info: dict, path: str) -> None:
    """Writes the weights and the JSON sidecar atomically (rename into place)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for target, data in ((_sidecar(path), json.dumps(info, indent=2).encode()),
                         (path, flax.serialization.msgpack_serialize(
                             jax.tree.map(np.asarray, params)))):
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """Cached classifier weights with what was measured when they were trained."""

    params: Any
    info: dict
    path: str

    @property
    def test_accuracy(self) -> float:
        return float(self.info["test_accuracy"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """int32 [N] class ids of uint8 [N, S, S, 1] images."""
        return predict_logits(self.params, np.asarray(images)).argmax(-1).astype(np.int32)


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(name: str = "fashion_mnist", *, directory: str | None = None,
         data_config: ml_collections.ConfigDict | None = None,
         train_if_missing: bool = True, settings: TrainSettings = TrainSettings()
         ) -> Classifier:
    """The cached classifier ``name``; trains and caches it first if it is missing.

    Args:
      name: a key of ``CLASSIFIERS``.
      directory: the cache folder (default ``cache_dir()``).
      data_config: where to read Fashion-MNIST when training (default: the
        offline package, ``fashion_mnist_data_config()``).
      train_if_missing: False raises FileNotFoundError naming the command.
      settings: training settings when it trains.
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"Unknown classifier {name!r}; available: {sorted(CLASSIFIERS)}.")
    path = weights_path(name, directory)
    with _file_lock(path):  # One process trains; the others wait and read.
        if not (os.path.exists(path) and os.path.exists(_sidecar(path))):
            if not train_if_missing:
                raise FileNotFoundError(
                    f"No cached {name} classifier at {path}; train it with {TRAIN_COMMAND}.")
            logging.warning("No cached %s classifier at %s: training it once (1-5 min on a "
                            "2-core CPU; or run %s beforehand).", name, path, TRAIN_COMMAND)
            print(f"Training the {name} classifier once into {path} ...", file=sys.stderr)
            params, info = train(data_config or fashion_mnist_data_config(), settings)
            save(params, info, path)
            logging.info("Trained the %s classifier: test accuracy %.4f in %.0f s.", name,
                         info["test_accuracy"], info["train_seconds"])
    with open(_sidecar(path)) as f:
        info = json.load(f)
    template = FashionMnistCNN().init(jax.random.key(0),
                                      jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))["params"]
    with open(path, "rb") as f:
        params = flax.serialization.from_bytes(template, f.read())
    return Classifier(params=params, info=info, path=path)


def check_compatible(name: str, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line) if classifier ``name`` cannot judge ``config``'s samples."""
    if name not in CLASSIFIERS:
        raise ValueError(f"config.eval.classifier={name!r}; use one of {sorted(CLASSIFIERS)} "
                         "or '' (off).")
    data, m = config.data, config.model
    datasets = CLASSIFIERS[name]
    if data.source != "tfds" or data.name not in datasets:
        what = f"folder {data.folder!r}" if data.source == "folder" else repr(data.name)
        raise ValueError(
            f"config.eval.classifier={name!r} was trained on {datasets[0]}, but this run's "
            f"data is {what}; set --config.eval.classifier='' (off).")
    # A latent-diffusion run (latent.py) decodes its samples to the data's pixels.
    channels = config.latent.pixel_channels if "latent" in config else m.get("in_channels", 1)
    if channels != 1 or m.get("num_classes", 0) not in (0, NUM_CLASSES):
        raise ValueError(
            f"config.eval.classifier={name!r} scores greyscale images of {NUM_CLASSES} "
            f"classes, but the model has in_channels={m.get('in_channels')}, "
            f"num_classes={m.get('num_classes')}; set --config.eval.classifier='' (off).")


def default_for(config: ml_collections.ConfigDict) -> str:
    """The classifier a run's dataset has ('' if none): for configs saved before
    ``config.eval.classifier`` existed."""
    for name in CLASSIFIERS:
        try:
            check_compatible(name, config)
        except ValueError:
            continue
        return name
    return ""


def main(argv) -> None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    del argv
    f = flags.FLAGS
    path = weights_path(directory=f.cache_dir)
    if os.path.exists(path) and not f.force:
        info = load(directory=f.cache_dir, train_if_missing=False).info
        print(f"Cached at {path} (--force retrains).")
    else:
        settings = TrainSettings(epochs=f.epochs)
        params, info = train(fashion_mnist_data_config(f.data_dir), settings)
        with _file_lock(path):
            save(params, info, path)
        print(f"Saved {path} and {_sidecar(path)}.")
    print(f"test accuracy {info['test_accuracy']:.4f} (28 px), "
          f"{info['test_accuracy_32px']:.4f} (32 px); trained in {info['train_seconds']} s "
          f"(load avg before: {info['loadavg_before']})")
    for k, acc in enumerate(info["test_accuracy_per_class"]):
        print(f"  class {k} {CLASS_NAMES[k]:<12s} {acc:.4f}")


if __name__ == "__main__":
    from absl import app  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top
    flags.DEFINE_string("data_dir", None, "TFDS data_dir of fashion_mnist_local (default TFDS').")
    flags.DEFINE_string("cache_dir", None, f"Default: ${CACHE_ENV} or ~/.cache/simple_diffusion.")
    flags.DEFINE_integer("epochs", TrainSettings.epochs, "Training epochs.")
    flags.DEFINE_bool("force", False, "Retrain even if cached.")
    app.run(main)
