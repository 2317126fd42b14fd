"""Tests of the input pipeline on the real Fashion-MNIST files and on image folders.

The reference data is decoded here straight from the Debian idx files with
gzip + NumPy, independently of the builder.
"""

import gzip
import os
import threading
import time

import ml_collections
import numpy as np
from PIL import Image
import pytest

from simple_diffusion import grain_pipeline
from simple_diffusion import input_pipeline
from simple_diffusion.datasets import fashion_mnist_local

# One xdist worker runs this module (pytest.ini: --dist loadgroup), so its
# module-scoped fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("input_pipeline")

_IDX_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx(name: str, header_bytes: int) -> np.ndarray:
    with gzip.open(os.path.join(_IDX_DIR, name)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=header_bytes)


@pytest.fixture(scope="module")
def raw_train():
    """(uint8 [60000, 28, 28], uint8 [60000]) from the idx files."""
    images = _read_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    return images, _read_idx("train-labels-idx1-ubyte.gz", 8)


@pytest.fixture(scope="session")
def fmnist_data_dir(tmp_path_factory):
    """A TFDS data_dir in which the first use prepares fashion_mnist_local."""
    return str(tmp_path_factory.mktemp("tfds"))


def _config(**overrides) -> ml_collections.ConfigDict:
    config = dict(source="tfds", name="fashion_mnist_local", split="train", data_dir=None,
                  folder=None, random_flip=False, prefetch=2)
    config.update(overrides)
    return ml_collections.ConfigDict(config)


@pytest.fixture(scope="module")
def fmnist_config(fmnist_data_dir):
    config = _config(data_dir=fmnist_data_dir)
    # Prepares the dataset (about 10 s) for all tests of this module.
    input_pipeline.dataset_info(config)
    return config


def _take(iterator, num_batches):
    with iterator:
        return [next(iterator) for _ in range(num_batches)]


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> uint8, exact for images that came from uint8."""
    return np.round((images + 1.0) * 127.5).astype(np.uint8)


def test_dataset_info(fmnist_config):
    assert input_pipeline.dataset_info(fmnist_config) == input_pipeline.DatasetInfo(
        num_examples=60000, num_classes=10, channels=1)
    test_info = input_pipeline.dataset_info(_config(data_dir=fmnist_config.data_dir,
                                                    split="test[:25%]"))
    assert test_info.num_examples == 2500


def test_load_images_match_the_idx_file(fmnist_config):
    raw_test = _read_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
    images = input_pipeline.load_images(fmnist_config, image_size=28, num_examples=300,
                                        split="test")
    assert images.dtype == np.uint8 and images.shape == (300, 28, 28, 1)
    np.testing.assert_array_equal(images, raw_test[:300])


def test_batches_hold_the_sampled_examples(fmnist_config, raw_train):
    raw_images, raw_labels = raw_train
    batches = _take(input_pipeline.create_input_iterator(
        fmnist_config, image_size=28, global_batch_size=48, seed=3, start_step=5), 2)
    sampler = input_pipeline.IndexSampler(60000, 48, seed=3)
    for step, batch in zip((5, 6), batches):
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (48, 28, 28, 1)
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (48,)
        assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
        indices = sampler.indices(step)
        np.testing.assert_array_equal(batch["label"], raw_labels[indices])
        np.testing.assert_array_equal(_to_uint8(batch["image"])[..., 0], raw_images[indices])


def test_an_epoch_covers_every_example_once(raw_train):
    _, raw_labels = raw_train
    sampler = input_pipeline.IndexSampler(60000, 1000, seed=0)
    epoch0 = np.concatenate([sampler.indices(step) for step in range(60)])
    epoch1 = np.concatenate([sampler.indices(step) for step in range(60, 120)])
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(60000))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(60000))
    assert not np.array_equal(epoch0, epoch1)  # Reshuffled per epoch.
    np.testing.assert_array_equal(np.bincount(raw_labels[epoch0]), np.full(10, 6000))


def test_batches_straddle_epochs():
    sampler = input_pipeline.IndexSampler(10, 4, seed=1)
    stream = np.concatenate([sampler.indices(step) for step in range(5)])  # 2 epochs.
    np.testing.assert_array_equal(np.sort(stream[:10]), np.arange(10))
    np.testing.assert_array_equal(np.sort(stream[10:]), np.arange(10))
    np.testing.assert_array_equal(sampler.indices(2)[2:], stream[10:12])


def test_deterministic_and_resumable(fmnist_config):
    kwargs = dict(image_size=32, global_batch_size=32, process_index=0, process_count=1)
    config = _config(data_dir=fmnist_config.data_dir, random_flip=True)
    straight = _take(input_pipeline.create_input_iterator(config, seed=7, **kwargs), 5)
    again = _take(input_pipeline.create_input_iterator(config, seed=7, **kwargs), 2)
    resumed = _take(input_pipeline.create_input_iterator(config, seed=7, start_step=3,
                                                         **kwargs), 2)
    other_seed = _take(input_pipeline.create_input_iterator(config, seed=8, **kwargs), 1)
    for a, b in zip(straight[:2] + straight[3:], again + resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(straight[0]["image"], straight[1]["image"])
    assert not np.array_equal(straight[0]["label"], other_seed[0]["label"])


def test_independent_of_the_process_layout(fmnist_config):
    config = _config(data_dir=fmnist_config.data_dir, random_flip=True)
    kwargs = dict(image_size=32, global_batch_size=32, seed=0, start_step=2)
    one = _take(input_pipeline.create_input_iterator(
        config, process_index=0, process_count=1, **kwargs), 2)
    halves = [_take(input_pipeline.create_input_iterator(
        config, process_index=p, process_count=2, **kwargs), 2) for p in range(2)]
    for step in range(2):
        assert halves[0][step]["image"].shape == (16, 32, 32, 1)
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), one[step][key])
        # Different processes read different examples.
        assert not np.array_equal(halves[0][step]["image"], halves[1][step]["image"])


def test_process_defaults_come_from_jax(fmnist_config):
    batch = _take(input_pipeline.create_input_iterator(
        fmnist_config, image_size=32, global_batch_size=8, seed=0), 1)[0]
    assert batch["image"].shape == (8, 32, 32, 1)  # One process in tests.


def test_random_flips(fmnist_config, raw_train):
    raw_images, _ = raw_train
    config = _config(data_dir=fmnist_config.data_dir, random_flip=True)
    batch = _take(input_pipeline.create_input_iterator(
        config, image_size=28, global_batch_size=64, seed=5, start_step=1), 1)[0]
    sampler = input_pipeline.IndexSampler(60000, 64, seed=5)
    originals = raw_images[sampler.indices(1)]
    got = _to_uint8(batch["image"])[..., 0]
    is_original = np.all(got == originals, axis=(1, 2))
    is_mirrored = np.all(got == originals[:, :, ::-1], axis=(1, 2))
    assert np.all(is_original | is_mirrored)
    asymmetric = ~np.all(originals == originals[:, :, ::-1], axis=(1, 2))
    np.testing.assert_array_equal(is_mirrored[asymmetric], sampler.flips(1)[asymmetric])
    assert 16 < is_mirrored[asymmetric].sum() < 48


def test_center_crop_and_resize_averages_areas():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    out = input_pipeline.center_crop_and_resize(image, 3)
    # Central 6x6 square, then the mean of each 2x2 block (to within one level:
    # PIL resamples uint8 in fixed point).
    expected = image[:, 1:7].reshape(3, 2, 3, 2, 3).mean(axis=(1, 3))
    assert out.shape == (3, 3, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out, expected, atol=1.0)
    gray = np.full((28, 28, 1), 77, np.uint8)
    np.testing.assert_array_equal(input_pipeline.center_crop_and_resize(gray, 32),
                                  np.full((32, 32, 1), 77))


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_source(tmp_path):
    # Wide images: the center 20x20 holds the class colour, the margins are white.
    colours = {"cats": (200, 10, 10), "ants": (10, 200, 10)}  # Sorted: ants = 0, cats = 1.
    for name, colour in colours.items():
        for i in range(3):
            image = np.full((20, 60, 3), 255, np.uint8)
            image[:, 20:40] = colour
            _write_png(str(tmp_path / name / f"{i}.png"), image)
    config = _config(source="folder", folder=str(tmp_path), random_flip=True)
    assert input_pipeline.dataset_info(config) == input_pipeline.DatasetInfo(6, 2, 3)
    batch = _take(input_pipeline.create_input_iterator(
        config, image_size=8, global_batch_size=6, seed=0, process_index=0,
        process_count=1), 1)[0]
    assert batch["image"].shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(np.sort(batch["label"]), [0, 0, 0, 1, 1, 1])
    for image, label in zip(_to_uint8(batch["image"]), batch["label"]):
        np.testing.assert_array_equal(image, np.broadcast_to(colours[("ants", "cats")[label]],
                                                             (8, 8, 3)))
    loaded = input_pipeline.load_images(config, image_size=8, num_examples=6)
    np.testing.assert_array_equal(loaded[0], np.broadcast_to(colours["ants"], (8, 8, 3)))


def test_grayscale_folder_without_classes(tmp_path):
    for i in range(2):
        _write_png(str(tmp_path / f"{i}.png"), np.full((16, 16), 40 * i, np.uint8))
    config = _config(source="folder", folder=str(tmp_path), prefetch=0)
    assert input_pipeline.dataset_info(config) == input_pipeline.DatasetInfo(2, 0, 1)
    images = input_pipeline.load_images(config, image_size=4, num_examples=2)
    np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 40])


def test_close_stops_the_prefetch_threads(fmnist_config):
    before = set(threading.enumerate())
    iterator = input_pipeline.create_input_iterator(
        fmnist_config, image_size=32, global_batch_size=8, seed=0)
    assert isinstance(iterator, grain_pipeline.GrainInputIterator)  # Read by grain.
    next(iterator)
    iterator.close()
    deadline = time.time() + 10
    while time.time() < deadline and [t for t in threading.enumerate()
                                      if t not in before and t.is_alive()]:
        time.sleep(0.1)
    assert not [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    with pytest.raises(StopIteration):
        next(iterator)


def test_grain_worker_processes_give_the_same_batches(tmp_path):
    """Decoding in grain's worker processes changes nothing: same batches as in
    process, also resumed and with half the global batch per process."""
    rng = np.random.default_rng(0)
    for i in range(10):
        _write_png(str(tmp_path / f"c{i % 2}" / f"{i}.png"),
                   rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    config = _config(source="folder", folder=str(tmp_path), random_flip=True)
    kwargs = dict(image_size=8, global_batch_size=4, seed=2, channels=3)
    threads = _take(input_pipeline.create_input_iterator(
        config, process_index=0, process_count=1, **kwargs), 4)
    config.worker_processes = 2
    workers = _take(input_pipeline.create_input_iterator(
        config, process_index=0, process_count=1, **kwargs), 4)
    second_half = _take(input_pipeline.create_input_iterator(
        config, process_index=1, process_count=2, start_step=2, **kwargs), 2)
    for step in range(4):
        for key in ("image", "label"):
            np.testing.assert_array_equal(workers[step][key], threads[step][key])
            if step >= 2:
                np.testing.assert_array_equal(second_half[step - 2][key],
                                              threads[step][key][2:])
    assert set(workers[0]) == {"image", "label"}


def test_sampler_index_and_flip_match_the_batch_arrays():
    sampler = input_pipeline.IndexSampler(10, 4, seed=1)
    for step in range(6):  # Straddles epochs.
        assert [sampler.index(step, i) for i in range(4)] == sampler.indices(step).tolist()
        assert [sampler.flip(step, i) for i in range(4)] == sampler.flips(step).tolist()


def test_errors_while_loading_reach_the_caller(tmp_path):
    _write_png(str(tmp_path / "a" / "good.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "a" / "the_broken_one.png").write_bytes(b"not a png")
    config = _config(source="folder", folder=str(tmp_path))
    iterator = input_pipeline.create_input_iterator(
        config, image_size=8, global_batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(input_pipeline.BadImageError, match="the_broken_one.png"):
        next(iterator)


def _write_truncated_png(path):
    """A PNG whose header reads but whose pixel data stops half-way."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    _write_png(path, noise)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _numbered_folder(root, bad=()):
    """Grey 8x8 images: class a/ holds indices 0-2, b/ 3-5; index i has value 10 + 40 i.

    Returns the paths by index; those in ``bad`` are truncated PNGs.
    """
    paths = []
    for i in range(6):
        path = str(root / ("a" if i < 3 else "b") / f"{i}.png")
        if i in bad:
            _write_truncated_png(path)
        else:
            _write_png(path, np.full((8, 8), 10 + 40 * i, np.uint8))
        paths.append(path)
    return paths


def test_a_corrupt_image_stops_training_naming_the_file(tmp_path):
    paths = _numbered_folder(tmp_path, bad=(4,))
    config = _config(source="folder", folder=str(tmp_path))
    with pytest.raises(input_pipeline.BadImageError) as error:
        _take(input_pipeline.create_input_iterator(
            config, image_size=8, global_batch_size=6, seed=0, process_index=0,
            process_count=1, channels=1), 1)
    message = str(error.value)
    assert paths[4] in message and "truncated" in message.lower()
    assert "--config.data.on_bad_image=skip" in message
    assert error.value.path == paths[4]
    with pytest.raises(input_pipeline.BadImageError, match="4.png"):
        input_pipeline.load_images(config, image_size=8, num_examples=6, channels=1)


def test_skip_uses_the_next_readable_image_and_counts_it(tmp_path, caplog):
    # 2 and 3 are bad in a row (both become 4); 5 is the last (wraps to 0).
    paths = _numbered_folder(tmp_path, bad=(2, 3, 5))
    stand_in = {0: 0, 1: 1, 2: 4, 3: 4, 4: 4, 5: 0}
    config = _config(source="folder", folder=str(tmp_path), on_bad_image="skip")
    sampler = input_pipeline.IndexSampler(6, 6, seed=0)
    caplog.set_level("WARNING")
    with input_pipeline.create_input_iterator(
            config, image_size=8, global_batch_size=6, seed=0, process_index=0,
            process_count=1, channels=1) as iterator:
        assert iterator.skipped_images == 0
        for step in range(3):  # One epoch per step.
            batch = next(iterator)
            expected = np.array([stand_in[i] for i in sampler.indices(step)])
            np.testing.assert_array_equal(_to_uint8(batch["image"])[:, 0, 0, 0],
                                          10 + 40 * expected)
            # The label is the stand-in's: 4 is in class b.
            np.testing.assert_array_equal(batch["label"], expected >= 3)
            assert iterator.skipped_images == 3 * (step + 1)
        assert iterator.bad_image_paths == tuple(sorted(paths[i] for i in (2, 3, 5)))
    for i in (2, 3, 5):  # Warned once per file, with its path.
        assert sum(paths[i] in r.getMessage() for r in caplog.records) == 1
    loaded = input_pipeline.load_images(config, image_size=8, num_examples=6, channels=1)
    np.testing.assert_array_equal(loaded[:, 0, 0, 0], [10 + 40 * stand_in[i] for i in range(6)])


def test_skipping_keeps_batches_a_function_of_seed_and_step(tmp_path):
    _numbered_folder(tmp_path, bad=(1, 4))
    config = _config(source="folder", folder=str(tmp_path), on_bad_image="skip",
                     random_flip=True)
    kwargs = dict(image_size=4, global_batch_size=4, seed=3, channels=1)
    one = _take(input_pipeline.create_input_iterator(
        config, process_index=0, process_count=1, **kwargs), 4)
    resumed = _take(input_pipeline.create_input_iterator(
        config, start_step=2, process_index=0, process_count=1, **kwargs), 2)
    halves = [_take(input_pipeline.create_input_iterator(
        config, process_index=p, process_count=2, **kwargs), 4) for p in range(2)]
    for step in range(4):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), one[step][key])
            if step >= 2:
                np.testing.assert_array_equal(resumed[step - 2][key], one[step][key])


def test_skip_with_no_readable_image(tmp_path):
    _write_truncated_png(str(tmp_path / "0.png"))
    _write_truncated_png(str(tmp_path / "1.png"))
    config = _config(source="folder", folder=str(tmp_path), on_bad_image="skip")
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="No image .* is readable"):
        input_pipeline.load_images(config, image_size=8, num_examples=2, channels=3)


def test_unknown_bad_image_policy(tmp_path):
    _numbered_folder(tmp_path)
    config = _config(source="folder", folder=str(tmp_path), on_bad_image="ignore")
    with pytest.raises(ValueError, match="on_bad_image='ignore'"):
        input_pipeline.load_images(config, image_size=8, num_examples=1)


def test_config_validation_checks_the_bad_image_policy():
    import conftest  # pylint: disable=g-import-not-at-top
    from simple_diffusion import config_validation  # pylint: disable=g-import-not-at-top
    config = conftest.load_config("tiny")
    assert config.data.on_bad_image == "fail"
    config_validation.validate_config(config, num_devices=8, process_count=1)
    config.data.on_bad_image = "ignore"
    with pytest.raises(config_validation.ConfigError, match="on_bad_image='ignore'"):
        config_validation.validate_config(config, num_devices=8, process_count=1)


def test_16_bit_pngs_use_their_full_range(tmp_path):
    values = np.array([[0, 1000], [40000, 65535]], np.uint16)
    image = np.kron(values, np.ones((4, 4), np.uint16))  # 8x8, 4x4 blocks.
    _write_png(str(tmp_path / "deep.png"), image)
    with Image.open(tmp_path / "deep.png") as written:
        assert written.mode == "I;16"  # Really 16-bit on disk.
    config = _config(source="folder", folder=str(tmp_path), prefetch=0)
    expected = values.astype(np.float64) / 65535 * 2 - 1
    for size, block in ((8, 4), (2, 1)):  # As is, and shrunk by area averaging.
        batch = _take(input_pipeline.create_input_iterator(
            config, image_size=size, global_batch_size=1, seed=0, process_index=0,
            process_count=1, channels=1), 1)[0]
        assert batch["image"].dtype == np.float32
        np.testing.assert_allclose(batch["image"][0, ::block, ::block, 0], expected,
                                   atol=1e-6)
    rgb = input_pipeline.load_images(config, image_size=2, num_examples=1, channels=3)
    np.testing.assert_array_equal(rgb[0], np.repeat(np.array([[0, 4], [156, 255]])[..., None],
                                                    3, axis=-1))


def test_channels_come_from_the_config_not_the_first_image(tmp_path, caplog):
    # Sorted order: the grayscale image is first.
    _write_png(str(tmp_path / "0_gray.png"), np.full((4, 4), 50, np.uint8))
    _write_png(str(tmp_path / "1_rgb.png"), np.full((4, 4, 3), (200, 10, 10), np.uint8))
    _write_png(str(tmp_path / "2_rgba.png"), np.full((4, 4, 4), (10, 200, 10, 0), np.uint8))
    config = _config(source="folder", folder=str(tmp_path))
    assert input_pipeline.dataset_info(config, channels=3) == input_pipeline.DatasetInfo(3, 0, 3)
    batch = _take(input_pipeline.create_input_iterator(
        config, image_size=4, global_batch_size=3, seed=0, process_index=0, process_count=1,
        channels=3), 1)[0]
    assert batch["image"].shape == (3, 4, 4, 3)
    rgb = input_pipeline.load_images(config, image_size=4, num_examples=3, channels=3)
    # Gray replicated; alpha dropped (not composited).
    np.testing.assert_array_equal(rgb[:, 0, 0], [(50, 50, 50), (200, 10, 10), (10, 200, 10)])

    def luma(colour):  # PIL's ITU-R 601-2 conversion.
        return np.asarray(Image.new("RGB", (1, 1), colour).convert("L"))[0, 0]

    gray = input_pipeline.load_images(config, image_size=4, num_examples=3, channels=1)
    np.testing.assert_array_equal(gray[:, 0, 0, 0],
                                  [50, luma((200, 10, 10)), luma((10, 200, 10))])

    # Without a channel count (old callers) the first image still decides, but
    # turning colour images gray is no longer silent.
    assert input_pipeline.dataset_info(config).channels == 1
    caplog.set_level("WARNING")
    input_pipeline.load_images(config, image_size=4, num_examples=3)
    assert any("to grayscale" in r.getMessage() for r in caplog.records)

    with pytest.raises(ValueError, match="1 .grayscale. or 3 .RGB. channels, not 4"):
        input_pipeline.dataset_info(config, channels=4)


def test_tfds_channels_must_match_the_config(fmnist_config):
    # dataset_info reports the dataset's own count, for the trainer to compare.
    assert input_pipeline.dataset_info(fmnist_config, channels=3).channels == 1
    with pytest.raises(ValueError, match="in_channels=1"):
        input_pipeline.create_input_iterator(fmnist_config, image_size=32, global_batch_size=8,
                                             seed=0, channels=3)
    images = input_pipeline.load_images(fmnist_config, image_size=28, num_examples=2,
                                        split="test", channels=1)
    assert images.shape == (2, 28, 28, 1)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="does not exist"):
        input_pipeline.dataset_info(_config(source="folder", folder=str(tmp_path / "nope")))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(input_pipeline.DatasetNotFoundError, match="holds no images"):
        input_pipeline.dataset_info(_config(source="folder", folder=str(tmp_path)))


def test_unprepared_tfds_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
        input_pipeline.dataset_info(_config(name="mnist", data_dir=str(tmp_path)))
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert f"tfds.builder('mnist', data_dir='{tmp_path}', file_format='array_record')" in message
    assert ".download_and_prepare()" in message


def test_manual_download_datasets_mention_the_manual_dir(tmp_path):
    with pytest.raises(input_pipeline.DatasetNotFoundError,
                       match="(?s)manual_dir='DIR_WITH_THE_DOWNLOADED_FILES'.*ILSVRC2012_img_train"):
        input_pipeline.dataset_info(_config(name="imagenet2012", data_dir=str(tmp_path)))


def test_missing_debian_files_name_the_install_command(tmp_path):
    builder = fashion_mnist_local.FashionMnistLocal(
        data_dir=str(tmp_path), source_dir=str(tmp_path / "absent"), file_format="array_record")
    with pytest.raises(FileNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        builder.download_and_prepare()
    assert fashion_mnist_local.missing_source_files() == []


def test_bad_names_splits_and_batch_sizes(fmnist_config):
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset'"):
        input_pipeline.dataset_info(_config(name="no_such_dataset"))
    with pytest.raises(ValueError, match="Unknown split 'validation'"):
        input_pipeline.dataset_info(_config(data_dir=fmnist_config.data_dir,
                                            split="validation"))
    with pytest.raises(ValueError, match="not divisible by process_count=2"):
        input_pipeline.create_input_iterator(fmnist_config, image_size=32, global_batch_size=7,
                                             seed=0, process_index=0, process_count=2)
