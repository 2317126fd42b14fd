"""Training and evaluation images from TFDS or a folder, deterministic by step.

Sources (``data_config.source``):
  * ``'tfds'``: any TFDS image dataset by ``name``/``split``/``data_dir``,
    prepared in the ``array_record`` format and read by random access through
    ``tfds.data_source`` (no TensorFlow graph, nothing held in memory). The
    offline default ``fashion_mnist_local`` is prepared on first use from the
    Debian package files; every other dataset must be prepared beforehand
    (docs/data.md), and a missing one raises ``DatasetNotFoundError`` whose
    message gives the command that prepares it.
  * ``'folder'``: image files under ``data_config.folder``, one subfolder per
    class (labels are the sorted subfolder names' indices). Files directly in
    the folder, with no class subfolders, are one unlabeled class.

Order: example positions form one endless stream, ``global_batch_size`` per
step; epoch ``e`` of the stream is a permutation of the split drawn from
``(seed, e)`` and the flips of step ``s`` are drawn from ``(seed, s)``. So the
global batch of step ``s`` is a pure function of ``(seed, s)``: resuming at
``start_step`` continues the exact order, and it does not depend on the number
of processes; process ``p`` of ``P`` yields the contiguous slice ``p`` of the
global batch (``global_batch_size // P`` examples), which it alone reads.

Preprocessing: center crop to a square, resize to ``image_size`` (PIL box
filter, i.e. area averaging, when shrinking; bicubic when enlarging),
optional random horizontal flip, then uint8 -> float32 in [-1, 1]. Grayscale
images keep one channel.
"""

import concurrent.futures
import dataclasses
import fcntl
import importlib.util
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from simple_diffusion import datasets

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Tags that keep the permutation and flip random streams apart for one seed.
_PERMUTATION_STREAM = 0
_FLIP_STREAM = 1


class DatasetNotFoundError(FileNotFoundError):
    """A dataset or folder is missing or unusable; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset split.

    Attributes:
      num_examples: number of examples in the split.
      num_classes: number of label values (labels are in [0, num_classes));
        0 for an unlabeled dataset, whose labels are all 0.
      channels: image channels (1 grayscale, 3 RGB).
    """

    num_examples: int
    num_classes: int
    channels: int


class _Source:
    """Random access to the examples of one split, in two stages.

    ``fetch`` gets the raw records of a batch at once (cheap, I/O bound);
    ``decode`` turns one raw record into an image and label (CPU bound, run in
    worker threads: PIL and the codecs release the GIL).

    Attributes:
      info: the split's ``DatasetInfo``.
    """

    info: DatasetInfo

    def __len__(self) -> int:
        return self.info.num_examples

    def fetch(self, indices: Sequence[int]) -> list:
        """The raw records of examples ``indices``, in order."""
        raise NotImplementedError

    def decode(self, record) -> tuple[np.ndarray, int]:
        """Returns (uint8 [H, W, channels] image, int label) of a fetched record."""
        raise NotImplementedError


class _TfdsSource(_Source):
    """A prepared TFDS split, read through ``tfds.data_source`` (array_record)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        features = builder.info.features
        image_key, label_key = builder.info.supervised_keys or ("image", "label")
        if label_key not in features:
            label_key = None
        self.info = DatasetInfo(
            num_examples=builder.info.splits[split].num_examples,  # ValueError if unknown.
            num_classes=features[label_key].num_classes if label_key else 0,
            channels=features[image_key].shape[-1])
        self._features = features
        self._image_key, self._label_key = image_key, label_key
        self._records = _open_data_source(builder, split)

    def fetch(self, indices: Sequence[int]) -> list[bytes]:
        # One batched read: array_record dispatches each read call to a thread
        # pool, which costs ~0.5 ms per call when reading records one by one.
        return self._records.__getitems__([int(i) for i in indices])

    def decode(self, record: bytes) -> tuple[np.ndarray, int]:
        example = self._features.deserialize_example_np(record)
        label = int(example[self._label_key]) if self._label_key else 0
        return example[self._image_key], label


class _FolderSource(_Source):
    """Image files under a folder, one subfolder per class (sorted names)."""

    def __init__(self, folder: str):
        if not folder or not os.path.isdir(folder):
            raise DatasetNotFoundError(
                f"Image folder {folder!r} does not exist. Set --config.data.folder=PATH to a "
                "folder with one subfolder of images per class (or images directly in it).")
        class_dirs = sorted(d for d in os.listdir(folder)
                            if os.path.isdir(os.path.join(folder, d)))
        self._paths, labels = [], []
        for label, class_dir in enumerate(class_dirs):
            paths = _image_files(os.path.join(folder, class_dir))
            self._paths += paths
            labels += [label] * len(paths)
        num_classes = len(class_dirs)
        if not self._paths:
            self._paths = _image_files(folder, recursive=False)
            labels = [0] * len(self._paths)
            num_classes = 0
        if not self._paths:
            raise DatasetNotFoundError(
                f"Image folder {folder!r} holds no images ({', '.join(_IMAGE_EXTENSIONS)}); "
                "put them in one subfolder per class.")
        self._labels = labels
        with Image.open(self._paths[0]) as first:
            # The first image decides grayscale vs RGB; the others are converted.
            self._mode = "L" if first.mode in ("1", "L", "LA") else "RGB"
        self.info = DatasetInfo(num_examples=len(self._paths), num_classes=num_classes,
                                channels=1 if self._mode == "L" else 3)

    def fetch(self, indices: Sequence[int]) -> list[tuple[str, int]]:
        return [(self._paths[i], self._labels[i]) for i in indices]

    def decode(self, record: tuple[str, int]) -> tuple[np.ndarray, int]:
        path, label = record
        with Image.open(path) as image:
            array = np.asarray(image.convert(self._mode))
        return array.reshape(array.shape[:2] + (self.info.channels,)), label


def _image_files(directory: str, recursive: bool = True) -> list[str]:
    """Sorted paths of the image files in ``directory`` (and below, if recursive)."""
    if recursive:
        paths = [os.path.join(root, name) for root, _, names in os.walk(directory)
                 for name in names]
    else:
        paths = [os.path.join(directory, name) for name in os.listdir(directory)]
    return sorted(p for p in paths
                  if p.lower().endswith(_IMAGE_EXTENSIONS) and os.path.isfile(p))


def _prepare_command(builder: tfds.core.DatasetBuilder, data_dir: str) -> str:
    """The shell command that prepares ``builder``'s dataset in ``data_dir`` as array_record."""
    prepare_args = ""
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        prepare_args = ("download_config=tfds.download.DownloadConfig("
                        "manual_dir='DIR_WITH_THE_DOWNLOADED_FILES')")
    command = (
        f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{builder.name}', "
        f"data_dir='{data_dir}', file_format='array_record').download_and_prepare("
        f"{prepare_args})\"")
    if importlib.util.find_spec("importlib_resources") is None:
        # tensorflow-datasets 4.9.10 imports it to prepare any dataset but does
        # not declare it on Python >= 3.9 (tensorflow/datasets#11212).
        command = "pip install importlib_resources && " + command
    return command


def _prepare_local(builder: tfds.core.DatasetBuilder) -> None:
    """Prepares a builder of ``datasets.LOCAL_BUILDERS`` once, safe across processes."""
    root = builder.data_dir_root
    root.mkdir(parents=True, exist_ok=True)
    # Processes sharing a data_dir (several hosts' workers on one machine, or
    # tests) would otherwise prepare the same directory concurrently.
    with open(os.fspath(root / f"{builder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not builder.is_prepared():
            logging.info("Preparing %s in %s (once).", builder.name, root)
            try:
                builder.download_and_prepare()
            except FileNotFoundError as e:
                # The local builders say in the message how to install their files.
                raise DatasetNotFoundError(str(e)) from e


def _tfds_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared array_record builder of ``data_config.name``, or a clear error."""
    kwargs = dict(data_dir=data_config.data_dir, file_format="array_record")
    try:
        builder = tfds.builder(data_config.name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"Unknown TFDS dataset {data_config.name!r} (config.data.name); the offline "
            f"default is 'fashion_mnist_local'. TFDS says: {str(e).splitlines()[0]}") from e
    if not builder.is_prepared():
        if builder.name not in datasets.LOCAL_BUILDERS:
            raise DatasetNotFoundError(
                f"TFDS dataset {data_config.name!r} is not prepared in {builder.data_dir_root}. "
                "Prepare it once (docs/data.md) with:\n  "
                f"{_prepare_command(builder, str(builder.data_dir_root))}"
                + (f"\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
                   if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else ""))
        _prepare_local(builder)
        # Re-read from disk: another process may have prepared it while we waited.
        builder = tfds.builder(data_config.name, **kwargs)
    return builder


def _open_data_source(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[bytes]:
    """Random access to the serialized records of ``split``, or a clear format error."""
    available = builder.info.available_file_formats()
    if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in available:
        raise DatasetNotFoundError(
            f"TFDS dataset {builder.name!r} in {builder.data_dir} is prepared as "
            f"{sorted(str(f.value) for f in available)}, but random access needs "
            "array_record. Prepare an array_record copy in another data_dir (docs/data.md), "
            "e.g. with:\n  "
            f"{_prepare_command(builder, str(builder.data_dir_root) + '_array_record')}")
    return builder.as_data_source(split=split, file_format="array_record",
                                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)


def _source(data_config: ml_collections.ConfigDict, split: str | None = None) -> _Source:
    if data_config.source == "tfds":
        return _TfdsSource(_tfds_builder(data_config), split or data_config.split)
    if data_config.source == "folder":
        return _FolderSource(data_config.folder)
    raise ValueError(f"config.data.source={data_config.source!r}; use 'tfds' or 'folder'.")


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
    """Describes ``data_config``'s split; prepares the offline default if needed.

    Args:
      data_config: the ``config.data`` ConfigDict (module docstring).

    Returns:
      The split's ``DatasetInfo``.

    Raises:
      DatasetNotFoundError: the dataset or folder is missing; the message holds
        the command that installs or prepares it.
      ValueError: unknown source, dataset name or split.
    """
    return _source(data_config).info


def center_crop_and_resize(image: np.ndarray, image_size: int) -> np.ndarray:
    """Crops the central square of an image and resizes it.

    Args:
      image: uint8 [H, W, C], C in {1, 3}.
      image_size: output side length.

    Returns:
      uint8 [image_size, image_size, C]. Shrinking uses PIL's box filter (each
      output pixel averages the input area it covers, so no aliasing);
      enlarging uses bicubic interpolation.
    """
    height, width, channels = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]
    if side == image_size:
        return np.ascontiguousarray(square)
    resample = Image.Resampling.BOX if side > image_size else Image.Resampling.BICUBIC
    pil = Image.fromarray(square[..., 0] if channels == 1 else square)
    resized = np.asarray(pil.resize((image_size, image_size), resample=resample))
    return resized.reshape(image_size, image_size, channels)


class IndexSampler:
    """Which examples, and which flips, make up the global batch of each step.

    Positions ``step * global_batch_size + i`` of an endless stream map to
    epoch ``position // num_examples``, whose order is a permutation drawn from
    ``(seed, epoch)``; a batch may straddle two epochs. Everything is a pure
    function of the arguments, independent of the processes reading it.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int):
        """Creates the sampler.

        Args:
          num_examples: size of the split, > 0.
          global_batch_size: examples per step over all processes, > 0.
          seed: non-negative integer.
        """
        if num_examples <= 0 or global_batch_size <= 0 or seed < 0:
            raise ValueError(f"Need num_examples > 0, global_batch_size > 0 and seed >= 0; got "
                             f"{num_examples}, {global_batch_size}, {seed}.")
        self._num_examples = num_examples
        self._batch_size = global_batch_size
        self._seed = int(seed)
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            # At most two epochs are live at a time (a batch straddling them).
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            rng = np.random.default_rng([self._seed, _PERMUTATION_STREAM, epoch])
            self._permutations[epoch] = rng.permutation(self._num_examples)
        return self._permutations[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Example indices of step ``step``'s global batch: int64 [global_batch_size]."""
        positions = step * self._batch_size + np.arange(self._batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self._num_examples)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            out[in_epoch] = self._permutation(int(epoch))[offsets[in_epoch]]
        return out

    def flips(self, step: int) -> np.ndarray:
        """Horizontal flips of step ``step``'s global batch: bool [global_batch_size]."""
        rng = np.random.default_rng([self._seed, _FLIP_STREAM, step])
        return rng.random(self._batch_size) < 0.5


class InputIterator(Iterator[dict[str, np.ndarray]]):
    """Yields ``make_batch(step)`` for step = start_step, start_step + 1, ...

    With ``prefetch > 0`` a daemon thread computes up to ``prefetch`` batches
    ahead, so loading overlaps the device step; an error there is raised by
    ``next``. ``close()`` (or leaving a ``with`` block) stops the thread.
    """

    def __init__(self, make_batch: Callable[[int], dict[str, np.ndarray]], *, start_step: int,
                 prefetch: int, on_close: Callable[[], None] = lambda: None):
        self._make_batch = make_batch
        self._next_step = start_step
        self._on_close = on_close
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, name="input_prefetch",
                                            daemon=True)
            self._thread.start()

    def _produce(self) -> None:
        step = self._next_step
        while not self._stop.is_set():
            try:
                item = self._make_batch(step)
            except Exception as e:  # pylint: disable=broad-except
                item = e  # Handed to the consumer, which raises it.
            # Time out now and then to notice close() while the queue is full.
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            step += 1

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop.is_set():
            raise StopIteration
        if self._queue is None:
            batch = self._make_batch(self._next_step)
        else:
            batch = self._queue.get()
            if isinstance(batch, Exception):
                self.close()
                raise batch
        self._next_step += 1
        return batch

    def close(self) -> None:
        """Stops prefetching and releases the worker threads; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._queue is not None:
            self._thread.join()
        self._on_close()

    def __enter__(self) -> "InputIterator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _default_num_workers() -> int:
    return min(8, os.cpu_count() or 1)


def create_input_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int | None = None,
) -> InputIterator:
    """The endless, resumable training batches of this process.

    Args:
      data_config: the ``config.data`` ConfigDict (module docstring).
      image_size: side of the square output images.
      global_batch_size: examples per step over all processes; divisible by
        ``process_count``.
      seed: non-negative data seed; with the step it fixes order and flips.
      start_step: the first step to yield (the restored step when resuming).
      process_index: this process, default ``jax.process_index()``.
      process_count: number of processes, default ``jax.process_count()``.
      num_workers: threads decoding and resizing images, default
        ``min(8, cpu_count)``.

    Returns:
      An ``InputIterator`` of dicts ``{'image': float32 [B, image_size,
      image_size, C] in [-1, 1], 'label': int32 [B]}``, B =
      ``global_batch_size // process_count``: the contiguous slice
      ``process_index`` of the global batch of each step.

    Raises:
      DatasetNotFoundError, ValueError: as ``dataset_info``, or for a batch
        size that does not divide over the processes.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}.")
    local_batch_size = global_batch_size // process_count
    local = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    source = _source(data_config)
    sampler = IndexSampler(len(source), global_batch_size, seed)
    pool = concurrent.futures.ThreadPoolExecutor(num_workers or _default_num_workers(),
                                                 thread_name_prefix="input_worker")

    def load(record, flip: bool) -> tuple[np.ndarray, int]:
        image, label = source.decode(record)
        image = center_crop_and_resize(image, image_size)
        return (image[:, ::-1] if flip else image), label

    def make_batch(step: int) -> dict[str, np.ndarray]:
        records = source.fetch(sampler.indices(step)[local])
        if data_config.random_flip:
            flips = sampler.flips(step)[local]
        else:
            flips = np.zeros(local_batch_size, bool)
        images, labels = zip(*pool.map(load, records, flips))
        return {"image": np.stack(images).astype(np.float32) / 127.5 - 1.0,
                "label": np.asarray(labels, np.int32)}

    return InputIterator(make_batch, start_step=start_step, prefetch=data_config.prefetch,
                         on_close=pool.shutdown)


def load_images(data_config: ml_collections.ConfigDict, *, image_size: int, num_examples: int,
                split: str | None = None, num_workers: int | None = None) -> np.ndarray:
    """The first ``num_examples`` images of a split, preprocessed without flips.

    For reference statistics in evaluation (e.g. the Fashion-MNIST test split).

    Args:
      data_config: the ``config.data`` ConfigDict (module docstring).
      image_size: side of the square output images.
      num_examples: how many images, from the start of the split.
      split: TFDS split, default ``data_config.split``; a folder is one split,
        so it ignores this.
      num_workers: decoding threads, default ``min(8, cpu_count)``.

    Returns:
      uint8 [num_examples, image_size, image_size, C].
    """
    source = _source(data_config, split)
    if not 0 < num_examples <= len(source):
        raise ValueError(f"num_examples={num_examples}, but the split has {len(source)}.")
    def load(record) -> np.ndarray:
        return center_crop_and_resize(source.decode(record)[0], image_size)

    with concurrent.futures.ThreadPoolExecutor(num_workers or _default_num_workers()) as pool:
        return np.stack(list(pool.map(load, source.fetch(range(num_examples)))))
