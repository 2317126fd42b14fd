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

Reading runs on grain (``grain_pipeline.py``): a ``grain.MapDataset`` of this
process's examples in the sampler's order, decoded by grain's prefetch
threads, or with ``data_config.worker_processes > 0`` by that many grain
worker processes (``mp_prefetch``), each building whole batches.

Preprocessing: center crop to a square, resize to ``image_size`` (PIL box
filter, i.e. area averaging, when shrinking; bicubic when enlarging),
optional random horizontal flip, then [0, max] -> float32 in [-1, 1], where
max is 255 for 8-bit images and 65535 for 16-bit grayscale ones (which stay
16-bit through the resize).

Channels: a TFDS dataset has its own channel count. A folder's images are
converted to the ``channels`` the caller asks for (the model's
``in_channels``): RGB -> grayscale by PIL's ITU-R 601-2 luma, grayscale -> RGB
by replication, alpha dropped. Callers that pass no ``channels`` get the
first image's (1 or 3), as before.

Unreadable folder images (``data_config.on_bad_image``): ``'fail'`` (default)
stops with a ``BadImageError`` naming the file; ``'skip'`` logs each bad file
once and uses the next readable file in the folder's sorted order (and its
label) in its place. The replacement depends only on the folder's contents,
so batches stay a function of ``(seed, step)`` and the process layout; the
iterator counts the replaced examples (``InputIterator.skipped_images``).
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
BAD_IMAGE_POLICIES = ("fail", "skip")
# PIL modes of 16-bit (or wider integer) grayscale images; convert("L") would
# clip their values at 255 instead of scaling them.
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_GRAY_MODES = ("1", "L", "LA", "La", "F") + _WIDE_GRAY_MODES


class DatasetNotFoundError(FileNotFoundError):
    """A dataset or folder is missing or unusable; the message says how to fix it."""


class BadImageError(DatasetNotFoundError):
    """An image file cannot be decoded; the message names it and the way out.

    Attributes:
      path: the file.
      reason: what the decoder said, e.g. ``"OSError: Truncated File Read"``.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(
            f"Cannot read image {path} ({reason}). Replace or delete the file, or set "
            "--config.data.on_bad_image=skip to use the next readable image in its place "
            "(logged once per file and counted; docs/data.md).")
        self.path = path
        self.reason = reason


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
    worker threads: PIL and the codecs release the GIL) and raises
    ``BadImageError`` for a record it cannot decode.

    Attributes:
      info: the split's ``DatasetInfo``.
    """

    info: DatasetInfo

    def __len__(self) -> int:
        return self.info.num_examples

    def fetch(self, indices: Sequence[int]) -> list:
        """The raw records of examples ``indices``, in order."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where example ``index`` comes from (a folder's file path)."""
        return f"example {index}"

    def decode(self, record) -> tuple[np.ndarray, int]:
        """Returns ([H, W, channels] image, int label) of a fetched record.

        The image is uint8, or float32 in [0, 1] for 16-bit images.
        """
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
    """Image files under a folder, one subfolder per class (sorted names).

    Every image is converted to ``channels`` (1 or 3); with ``channels=None``
    the first readable image decides (1 if grayscale, else 3).
    """

    def __init__(self, folder: str, channels: int | None = None):
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
        self._channels_guessed = channels is None
        if channels is None:
            channels = self._first_image_channels()
        elif channels not in (1, 3):
            raise ValueError(
                f"Folder images convert to 1 (grayscale) or 3 (RGB) channels, not {channels} "
                "(config.model.in_channels).")
        self._warned_gray_guess = False
        self.info = DatasetInfo(num_examples=len(self._paths), num_classes=num_classes,
                                channels=channels)

    def _first_image_channels(self) -> int:
        """1 or 3 from the first image whose header reads (3 if none does)."""
        for path in self._paths:
            try:
                with Image.open(path) as image:
                    return 1 if image.mode in _GRAY_MODES else 3
            except Exception:  # pylint: disable=broad-except
                continue  # Unreadable files are reported when their turn comes.
        return 3

    def fetch(self, indices: Sequence[int]) -> list[tuple[str, int]]:
        return [(self._paths[i], self._labels[i]) for i in indices]

    def describe(self, index: int) -> str:
        return self._paths[index]

    def decode(self, record: tuple[str, int]) -> tuple[np.ndarray, int]:
        path, label = record
        channels = self.info.channels
        try:
            with Image.open(path) as image:
                # Decode the whole file here: PIL decodes lazily, and a
                # truncated file would otherwise fail later without its path.
                image.load()
                mode = image.mode
                if mode in _WIDE_GRAY_MODES:
                    array = np.asarray(image)
                else:
                    array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        except Exception as e:  # pylint: disable=broad-except
            # Any decoder failure (OSError, SyntaxError for broken PNG chunks,
            # DecompressionBombError, ...) is this file's fault.
            raise BadImageError(path, f"{type(e).__name__}: {e}") from e
        if mode in _WIDE_GRAY_MODES:
            # 16-bit PNG/TIFF values span [0, 65535]; keep their precision as
            # float32 in [0, 1] rather than clipping them to uint8.
            array = np.clip(array.astype(np.float32) / 65535.0, 0.0, 1.0)
            array = np.repeat(array[..., None], channels, axis=-1)
        elif channels == 1 and mode not in _GRAY_MODES and self._channels_guessed:
            if not self._warned_gray_guess:
                self._warned_gray_guess = True
                logging.warning(
                    "Converting colour image %s to grayscale because the first image of the "
                    "folder is grayscale and the caller passed no channel count; pass "
                    "channels=config.model.in_channels to decide it from the config.", path)
        return array.reshape(array.shape[:2] + (channels,)), label


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


def _source(data_config: ml_collections.ConfigDict, split: str | None = None,
            channels: int | None = None) -> _Source:
    if data_config.source == "tfds":
        return _TfdsSource(_tfds_builder(data_config), split or data_config.split)
    if data_config.source == "folder":
        return _FolderSource(data_config.folder, channels)
    raise ValueError(f"config.data.source={data_config.source!r}; use 'tfds' or 'folder'.")


def _reading_source(data_config: ml_collections.ConfigDict, split: str | None,
                    channels: int | None) -> _Source:
    """``_source``, refusing a TFDS dataset whose channels differ from ``channels``."""
    source = _source(data_config, split, channels)
    if channels is not None and source.info.channels != channels:
        raise ValueError(
            f"The dataset has {source.info.channels} channels but {channels} were asked for "
            f"(config.model.in_channels); set --config.model.in_channels="
            f"{source.info.channels}.")
    return source


def dataset_info(data_config: ml_collections.ConfigDict, *,
                 channels: int | None = None) -> DatasetInfo:
    """Describes ``data_config``'s split; prepares the offline default if needed.

    Args:
      data_config: the ``config.data`` ConfigDict (module docstring).
      channels: the model's ``in_channels``. A folder has no channel count of
        its own: it reports (and converts to) this one; None guesses from its
        first image. A TFDS dataset reports its own whatever this is, so the
        caller can compare.

    Returns:
      The split's ``DatasetInfo``.

    Raises:
      DatasetNotFoundError: the dataset or folder is missing; the message holds
        the command that installs or prepares it.
      ValueError: unknown source, dataset name or split; ``channels`` not 1 or
        3 for a folder.
    """
    return _source(data_config, channels=channels).info


def center_crop_and_resize(image: np.ndarray, image_size: int) -> np.ndarray:
    """Crops the central square of an image and resizes it.

    Args:
      image: [H, W, C], C in {1, 3}: uint8, or float32 in [0, 1] (16-bit
        sources).
      image_size: output side length.

    Returns:
      [image_size, image_size, C] of the input's dtype (float32 clipped to
      [0, 1], as uint8 is by PIL). Shrinking uses PIL's box filter (each
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
    if square.dtype != np.uint8:
        # PIL resamples float images one channel at a time (mode "F").
        planes = [np.asarray(Image.fromarray(np.ascontiguousarray(square[..., c], np.float32))
                             .resize((image_size, image_size), resample=resample))
                  for c in range(channels)]
        # Bicubic overshoots; clip like PIL clips uint8.
        return np.clip(np.stack(planes, axis=-1), 0.0, 1.0)
    pil = Image.fromarray(square[..., 0] if channels == 1 else square)
    resized = np.asarray(pil.resize((image_size, image_size), resample=resample))
    return resized.reshape(image_size, image_size, channels)


def _to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 (or float32 in [0, 1]) -> float32 in [-1, 1]."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 127.5 - 1.0
    return image.astype(np.float32) * 2.0 - 1.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 (or float32 in [0, 1]) -> uint8, rounding."""
    if image.dtype == np.uint8:
        return image
    return np.round(image * 255.0).astype(np.uint8)


class _ExampleLoader:
    """Decodes examples by index under a ``config.data.on_bad_image`` policy.

    With ``'skip'``, an example whose record cannot be decoded is replaced by
    the next decodable index (wrapping around). That depends only on the
    dataset's contents, not on which process or thread asks or when, so the
    batch stays a pure function of (seed, step). Thread-safe.
    """

    def __init__(self, source: _Source, policy: str):
        if policy not in BAD_IMAGE_POLICIES:
            raise ValueError(f"config.data.on_bad_image={policy!r}; use 'fail' or 'skip'.")
        self._source = source
        self._skip = policy == "skip"
        self._lock = threading.Lock()
        self._bad: dict[int, str] = {}  # Index -> path of every bad record seen.

    @property
    def bad_paths(self) -> tuple[str, ...]:
        """The unreadable files found so far, sorted."""
        with self._lock:
            return tuple(sorted(self._bad.values()))

    def _mark_bad(self, index: int, error: BadImageError) -> None:
        with self._lock:
            if index in self._bad:
                return
            self._bad[index] = error.path
        logging.warning("Skipping unreadable image %s (%s); config.data.on_bad_image='skip' "
                        "uses the next readable image in its place.", error.path, error.reason)

    def _is_bad(self, index: int) -> bool:
        with self._lock:
            return index in self._bad

    def load(self, index: int, record) -> tuple[np.ndarray, int, bool]:
        """(image, label, replaced) of example ``index``, whose record is ``record``.

        Raises:
          BadImageError: the record is unreadable and the policy is 'fail', or
            no record of the split is readable.
        """
        if not (self._skip and self._is_bad(index)):
            try:
                return (*self._source.decode(record), False)
            except BadImageError as e:
                if not self._skip:
                    raise
                self._mark_bad(index, e)
        num_examples = len(self._source)
        for offset in range(1, num_examples):
            candidate = (index + offset) % num_examples
            if self._is_bad(candidate):
                continue
            try:
                return (*self._source.decode(self._source.fetch([candidate])[0]), True)
            except BadImageError as e:
                self._mark_bad(candidate, e)
        raise DatasetNotFoundError(
            f"No image of the dataset is readable (the first found bad: {self.bad_paths[0]}); "
            "config.data.on_bad_image='skip' has nothing to use in their place.")


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
        self._flips: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # index/flip are called from decoding threads.

    def __getstate__(self):
        state = dict(self.__dict__, _permutations={}, _flips={})
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            permutation = self._permutations.get(epoch)
        if permutation is None:
            rng = np.random.default_rng([self._seed, _PERMUTATION_STREAM, epoch])
            permutation = rng.permutation(self._num_examples)
            with self._lock:
                # At most a few epochs are live at a time (batches straddling them,
                # threads decoding ahead).
                while len(self._permutations) >= 3:
                    del self._permutations[min(self._permutations)]
                self._permutations[epoch] = permutation
        return permutation

    def index(self, step: int, slot: int) -> int:
        """``indices(step)[slot]``, without computing the rest of the batch."""
        epoch, offset = divmod(step * self._batch_size + slot, self._num_examples)
        return int(self._permutation(epoch)[offset])

    def flip(self, step: int, slot: int) -> bool:
        """``flips(step)[slot]``."""
        with self._lock:
            flips = self._flips.get(step)
        if flips is None:
            flips = self.flips(step)
            with self._lock:
                while len(self._flips) >= 64:
                    del self._flips[min(self._flips)]
                self._flips[step] = flips
        return bool(flips[slot])

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

    ``make_batch`` returns the batch, or ``(batch, num_replaced)`` where
    ``num_replaced`` counts its examples that stand in for unreadable images
    (``config.data.on_bad_image='skip'``); ``skipped_images`` sums those of the
    batches ``next`` has returned, so prefetched batches are not counted early.
    """

    def __init__(self, make_batch: Callable[[int], dict[str, np.ndarray] | tuple],
                 *, start_step: int, prefetch: int,
                 on_close: Callable[[], None] = lambda: None,
                 bad_image_paths: Callable[[], tuple[str, ...]] = tuple):
        self._make_batch = make_batch
        self._next_step = start_step
        self._on_close = on_close
        self._bad_image_paths = bad_image_paths
        self._skipped_images = 0
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, name="input_prefetch",
                                            daemon=True)
            self._thread.start()

    @property
    def skipped_images(self) -> int:
        """Examples of this process's returned batches that replaced an unreadable
        image, since this iterator was created (a resumed run starts at 0)."""
        return self._skipped_images

    @property
    def bad_image_paths(self) -> tuple[str, ...]:
        """The unreadable files this process has found so far (sorted), including
        those of prefetched batches."""
        return tuple(self._bad_image_paths())

    def _batch_and_count(self, step: int) -> tuple[dict[str, np.ndarray], int]:
        result = self._make_batch(step)
        return result if isinstance(result, tuple) else (result, 0)

    def _produce(self) -> None:
        step = self._next_step
        while not self._stop.is_set():
            try:
                item = self._batch_and_count(step)
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
            item = self._batch_and_count(self._next_step)
        else:
            item = self._queue.get()
            if isinstance(item, Exception):
                self.close()
                raise item
        batch, num_replaced = item
        self._skipped_images += num_replaced
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
    channels: int | None = None,
) -> "grain_pipeline.GrainInputIterator":
    """The endless, resumable training batches of this process, read by grain.

    Args:
      data_config: the ``config.data`` ConfigDict (module docstring).
      image_size: side of the square output images.
      global_batch_size: examples per step over all processes; divisible by
        ``process_count``.
      seed: non-negative data seed; with the step it fixes order and flips.
      start_step: the first step to yield (the restored step when resuming).
      process_index: this process, default ``jax.process_index()``.
      process_count: number of processes, default ``jax.process_count()``.
      num_workers: grain threads decoding and resizing images (per worker
        process with ``data_config.worker_processes > 0``), default
        ``min(8, cpu_count)``.
      channels: C, the model's ``in_channels``: a folder's images are
        converted to it, a TFDS dataset must have it. None: the dataset's
        (a folder's first image decides).

    Returns:
      A ``grain_pipeline.GrainInputIterator`` (``next``, ``close``, ``with``,
      ``skipped_images``, ``bad_image_paths``) of dicts ``{'image': float32 [B, image_size,
      image_size, C] in [-1, 1], 'label': int32 [B]}``, B =
      ``global_batch_size // process_count``: the contiguous slice
      ``process_index`` of the global batch of each step. Its
      ``skipped_images`` counts the examples that replaced unreadable images.

    Raises:
      DatasetNotFoundError, ValueError: as ``dataset_info``, for a batch
        size that does not divide over the processes, or for ``channels``
        other than a TFDS dataset's.
      BadImageError: from ``next``, for an unreadable image under
        ``on_bad_image='fail'``.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}.")
    local_batch_size = global_batch_size // process_count
    source = _reading_source(data_config, None, channels)
    policy = _bad_image_policy(data_config)
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"config.data.on_bad_image={policy!r}; use 'fail' or 'skip'.")
    sampler = IndexSampler(len(source), global_batch_size, seed)
    from simple_diffusion import grain_pipeline  # pylint: disable=g-import-not-at-top
    return grain_pipeline.create_grain_iterator(
        source, policy, sampler, process_index=process_index,
        local_batch_size=local_batch_size, image_size=image_size,
        random_flip=data_config.random_flip, start_step=start_step,
        prefetch=data_config.prefetch, num_threads=num_workers or _default_num_workers(),
        worker_processes=data_config.get("worker_processes", 0))


def _thread_pool_iterator(data_config: ml_collections.ConfigDict, *, image_size: int,
                          global_batch_size: int, seed: int, start_step: int = 0,
                          process_index: int = 0, process_count: int = 1,
                          num_workers: int | None = None,
                          channels: int | None = None) -> InputIterator:
    """The hand-written pipeline grain replaced (a thread pool decoding each batch,
    a prefetch thread): the same batches. Kept only as the baseline of
    ``benchmarks/decode_throughput.py``."""
    local_batch_size = global_batch_size // process_count
    local = slice(process_index * local_batch_size, (process_index + 1) * local_batch_size)
    source = _reading_source(data_config, None, channels)
    loader = _ExampleLoader(source, _bad_image_policy(data_config))
    sampler = IndexSampler(len(source), global_batch_size, seed)
    pool = concurrent.futures.ThreadPoolExecutor(num_workers or _default_num_workers(),
                                                 thread_name_prefix="input_worker")

    def load(index: int, record, flip: bool) -> tuple[np.ndarray, int, bool]:
        image, label, replaced = loader.load(index, record)
        image = center_crop_and_resize(image, image_size)
        return _to_model_range(image[:, ::-1] if flip else image), label, replaced

    def make_batch(step: int) -> tuple[dict[str, np.ndarray], int]:
        indices = sampler.indices(step)[local]
        records = source.fetch(indices)
        if data_config.random_flip:
            flips = sampler.flips(step)[local]
        else:
            flips = np.zeros(local_batch_size, bool)
        images, labels, replaced = zip(*pool.map(load, indices.tolist(), records, flips))
        return ({"image": np.stack(images), "label": np.asarray(labels, np.int32)},
                int(sum(replaced)))

    return InputIterator(make_batch, start_step=start_step, prefetch=data_config.prefetch,
                         on_close=pool.shutdown, bad_image_paths=lambda: loader.bad_paths)


def _bad_image_policy(data_config: ml_collections.ConfigDict) -> str:
    # Configs saved by runs from before the field existed lack it.
    return data_config.get("on_bad_image", "fail")


def load_images(data_config: ml_collections.ConfigDict, *, image_size: int, num_examples: int,
                split: str | None = None, num_workers: int | None = None,
                channels: int | None = None) -> np.ndarray:
    """The first ``num_examples`` images of a split, preprocessed without flips.

    For reference statistics in evaluation (e.g. the Fashion-MNIST test split).
    Unreadable images follow ``data_config.on_bad_image`` as in training.

    Args:
      data_config: the ``config.data`` ConfigDict (module docstring).
      image_size: side of the square output images.
      num_examples: how many images, from the start of the split.
      split: TFDS split, default ``data_config.split``; a folder is one split,
        so it ignores this.
      num_workers: decoding threads, default ``min(8, cpu_count)``.
      channels: C, as in ``create_input_iterator``.

    Returns:
      uint8 [num_examples, image_size, image_size, C] (16-bit images rounded
      to 8 bits after the resize).
    """
    source = _reading_source(data_config, split, channels)
    if not 0 < num_examples <= len(source):
        raise ValueError(f"num_examples={num_examples}, but the split has {len(source)}.")
    loader = _ExampleLoader(source, _bad_image_policy(data_config))

    def load(index: int, record) -> np.ndarray:
        return _to_uint8(center_crop_and_resize(loader.load(index, record)[0], image_size))

    with concurrent.futures.ThreadPoolExecutor(num_workers or _default_num_workers()) as pool:
        return np.stack(list(pool.map(load, range(num_examples),
                                      source.fetch(range(num_examples)))))
