"""The Fashion-MNIST classifier and the classification accuracy of conditional samples."""

import json
import os

import numpy as np
import pytest

from conftest import load_config
from simple_diffusion import config_validation
from simple_diffusion import sharding
from simple_diffusion.evaluation import classifier
from simple_diffusion.evaluation import evaluator as evaluator_lib

# One xdist worker runs this module (pytest.ini: --dist loadgroup), so its
# module-scoped fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("classifier")

# A tiny budget (1 epoch on 12K images, seconds) instead of the cached default's.
_TEST_SETTINGS = classifier.TrainSettings(epochs=1, num_train=12_000)


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory, fashion_mnist_dir):
    """A cache folder holding a classifier trained once per session by ``load``'s
    train-if-missing path."""
    directory = str(tmp_path_factory.mktemp("classifier_cache"))
    classifier.load(directory=directory,
                    data_config=classifier.fashion_mnist_data_config(fashion_mnist_dir),
                    settings=_TEST_SETTINGS)
    return directory


@pytest.fixture(scope="session")
def real_test_split(fashion_mnist_dir):
    """The first 500 (shuffled) Fashion-MNIST test images at 32 px, with labels."""
    data = classifier.fashion_mnist_data_config(fashion_mnist_dir)
    return classifier.load_split(data, "test", image_size=32, num_examples=500)


def test_accuracy_metrics_hand_computed():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 0, 1, 2, 1, 0, 2, 2, 2, 1])
    out = classifier.accuracy_metrics(predicted, labels, num_classes=4)
    assert out == {
        "classifier_accuracy": pytest.approx(6 / 10),
        "classifier_accuracy_class_0": pytest.approx(2 / 4),
        "classifier_accuracy_class_1": pytest.approx(1 / 2),
        "classifier_accuracy_class_2": pytest.approx(3 / 4),
    }  # Class 3 was never asked for: no key.
    with pytest.raises(ValueError, match="same non-empty"):
        classifier.accuracy_metrics(predicted[:3], labels, num_classes=4)


def test_cache_files_and_sidecar(classifier_cache):
    path = classifier.weights_path(directory=classifier_cache)
    assert os.path.exists(path)
    info = json.loads(open(path[:-len(".msgpack")] + ".json").read())
    assert len(info["test_accuracy_per_class"]) == 10
    assert info["num_train"] == 12_000 and info["num_test"] == 10_000
    assert info["test_accuracy"] == pytest.approx(np.mean(info["test_accuracy_per_class"]))
    loaded = classifier.load(directory=classifier_cache, train_if_missing=False)
    assert loaded.test_accuracy == info["test_accuracy"]
    with pytest.raises(FileNotFoundError, match="python -m simple_diffusion.evaluation.classifier"):
        classifier.load(directory=os.path.join(classifier_cache, "empty"),
                        train_if_missing=False)


def test_real_images_high_accuracy_noise_and_scrambled_near_chance(classifier_cache,
                                                                  real_test_split):
    clf = classifier.load(directory=classifier_cache, train_if_missing=False)
    images, labels = real_test_split
    real = classifier.accuracy_metrics(clf.predict(images), labels, 10)["classifier_accuracy"]
    assert real > 0.75, real  # The 1-epoch test budget; the cached default reaches ~0.9.
    # The same images at 128 px (bilinear upsampling) score alike: resized inside.
    big = np.asarray(
        __import__("jax").image.resize(images.astype(np.float32), (len(images), 128, 128, 1),
                                       "bilinear")).round().clip(0, 255).astype(np.uint8)
    big_acc = classifier.accuracy_metrics(clf.predict(big), labels, 10)["classifier_accuracy"]
    assert big_acc > real - 0.05, (big_acc, real)
    rng = np.random.default_rng(0)
    scrambled = images.reshape(len(images), -1)[:, rng.permutation(32 * 32)].reshape(images.shape)
    noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
    for name, fake in (("scrambled", scrambled), ("noise", noise)):
        acc = classifier.accuracy_metrics(clf.predict(fake), labels, 10)["classifier_accuracy"]
        assert acc < 0.3, (name, acc)
    with pytest.raises(ValueError, match="square greyscale"):
        clf.predict(np.zeros((2, 32, 32, 3), np.uint8))


def test_refuses_other_datasets(tiny_config):
    config = tiny_config
    classifier.check_compatible("fashion_mnist", config)  # The tiny run is Fashion-MNIST.
    assert classifier.default_for(config) == "fashion_mnist"
    config.data.name = "imagenet2012"
    with pytest.raises(ValueError, match="trained on fashion_mnist_local.*'imagenet2012'"):
        classifier.check_compatible("fashion_mnist", config)
    assert classifier.default_for(config) == ""
    config.eval.every_steps = 10
    config.eval.classifier = "fashion_mnist"
    with pytest.raises(config_validation.ConfigError, match="imagenet2012"):
        config_validation.validate_config(config, num_devices=1, process_count=1)
    with pytest.raises(ValueError, match="trained on"):
        evaluator_lib.Evaluator(config, sharding.create_mesh(-1, 1), "/nonexistent")
    config.eval.classifier = "cifar10"
    with pytest.raises(ValueError, match="use one of"):
        classifier.check_compatible("cifar10", config)


def test_fashion_mnist_configs_turn_it_on():
    assert load_config("fashion_mnist_demo").eval.classifier == "fashion_mnist"
    assert load_config("imagenet64").eval.classifier == ""


def test_evaluator_writes_classifier_accuracy(classifier_cache, real_test_split, tiny_config,
                                              tmp_path, monkeypatch):
    monkeypatch.setenv(classifier.CACHE_ENV, classifier_cache)
    images, labels = real_test_split[0][:60], real_test_split[1][:60]
    config = tiny_config
    config.eval.classifier = "fashion_mnist"
    config.eval.num_samples = 60
    config.eval.num_reference = 16
    asked = {}

    def generate_fn(params, num_samples, seed, batch_size):
        del seed, batch_size
        return images[:num_samples], asked["labels"]

    evaluator = evaluator_lib.Evaluator(config, sharding.create_mesh(-1, 1), str(tmp_path),
                                        generate_fn=generate_fn)
    clf = classifier.load(train_if_missing=False)
    expected = classifier.accuracy_metrics(clf.predict(images), labels, 10)

    asked["labels"] = labels  # Real images asked for by their own labels.
    results = evaluator(None, 7)
    record = json.loads((tmp_path / "eval" / "step_00000007.json").read_text())
    for k in range(10):
        key = f"classifier_accuracy_class_{k}"
        if (labels == k).any():
            assert results[key] == pytest.approx(expected[key]) == record[key]
    assert results["classifier_accuracy"] == record["classifier_accuracy"] > 0.7
    assert record["classifier_test_accuracy"] == pytest.approx(clf.test_accuracy)
    assert record["classifier"] == clf.path and "fd_effnet_lite0" in record

    asked["labels"] = (labels + 1) % 10  # The same images asked for as another class.
    assert evaluator(None, 8)["classifier_accuracy"] < 0.2
