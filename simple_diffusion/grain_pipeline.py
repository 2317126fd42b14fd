"""Training batches on grain: the reading, decoding and prefetching of input_pipeline.

``input_pipeline.create_input_iterator`` builds its iterator here. The order is
still ``input_pipeline.IndexSampler``'s (a pure function of seed and step), so
the guarantees of input_pipeline's docstring hold; grain does the rest:

  * a ``grain.MapDataset`` whose element ``j`` is this process's ``j``-th
    example of the stream (step ``j // B``, position ``process_index * B +
    j % B`` of that step's global batch, B the per-process batch), read from
    the TFDS ``data_source`` (array_record) or the folder and decoded,
    cropped, resized, flipped and scaled;
  * ``to_iter_dataset(ReadOptions(num_threads, prefetch_buffer_size))``:
    grain's thread pool decodes examples ahead, in order;
  * with ``worker_processes > 0`` (``config.data.worker_processes``), grain's
    ``mp_prefetch``: that many worker processes each build whole batches
    (batch ``k`` by worker ``k % workers``), returned in order through shared
    memory, for decoding that the GIL would otherwise limit.

Why not grain's own ``IndexSampler`` and ``ShardByJaxProcess``: grain shards
the *records* per process (process ``p`` reads a contiguous ``1/P`` of the
split, shuffled within it), so the global batch of a step depends on the
number of processes, and 2 processes would not see what 1 process sees. Here
the sampler decides the global batch and every process takes its slice of it,
as before. A grain iterator's checkpointable state is not needed either: the
position is the step, so a resume starts the dataset at ``start_step``.
"""

import threading
from collections.abc import Iterator

from absl import flags
import grain
import numpy as np

from simple_diffusion import input_pipeline

# The stream is endless; grain needs a length. 2**40 examples is far beyond any run.
_STREAM_LENGTH = 2**40


class _LoadExample:
    """Position in this process's stream -> (image, label, replaced index or -1).

    Picklable (grain's worker processes get a copy): the decoder's lock and
    caches are rebuilt on the other side.
    """

    def __init__(self, source, policy: str, sampler: "input_pipeline.IndexSampler",
                 *, first: int, local_batch_size: int, image_size: int, random_flip: bool):
        self._source, self._policy, self._sampler = source, policy, sampler
        self._first, self._local_batch_size = first, local_batch_size
        self._image_size, self._random_flip = image_size, random_flip
        self.loader = input_pipeline._ExampleLoader(source, policy)  # pylint: disable=protected-access

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["loader"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.loader = input_pipeline._ExampleLoader(self._source, self._policy)  # pylint: disable=protected-access

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        step, offset = divmod(int(position), self._local_batch_size)
        slot = self._first + offset  # Position in the step's global batch.
        index = int(self._sampler.index(step, slot))
        record = self._source.fetch([index])[0]
        image, label, replaced = self.loader.load(index, record)
        image = input_pipeline.center_crop_and_resize(image, self._image_size)
        if self._random_flip and self._sampler.flip(step, slot):
            image = image[:, ::-1]
        return {"image": input_pipeline._to_model_range(image),  # pylint: disable=protected-access
                "label": np.int32(label),
                "replaced": np.int64(index if replaced else -1)}


def _stack(examples) -> dict[str, np.ndarray]:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


class GrainInputIterator(Iterator[dict[str, np.ndarray]]):
    """This process's batches from step ``start_step`` on, read by grain.

    Same interface as ``input_pipeline.InputIterator``: ``next``, ``close`` (or
    a ``with`` block), ``skipped_images`` and ``bad_image_paths``.
    """

    def __init__(self, dataset: "grain.IterDataset", source, load: _LoadExample):
        self._dataset = dataset
        self._iterator = iter(dataset)
        self._source, self._load = source, load
        self._skipped_images = 0
        self._bad_indices: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def skipped_images(self) -> int:
        """Examples of this process's returned batches that replaced an unreadable
        image, since this iterator was created (a resumed run starts at 0)."""
        return self._skipped_images

    @property
    def bad_image_paths(self) -> tuple[str, ...]:
        """The unreadable files this process has found so far, sorted: those of the
        returned batches, and (with in-process decoding) of prefetched ones."""
        with self._lock:
            found = {self._source.describe(i) for i in self._bad_indices}
        return tuple(sorted(found | set(self._load.loader.bad_paths)))

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise StopIteration
        try:
            batch = next(self._iterator)
        except Exception:
            self.close()
            raise
        replaced = batch.pop("replaced")
        bad = replaced[replaced >= 0]
        self._skipped_images += int(bad.size)
        if bad.size:
            with self._lock:
                self._bad_indices.update(int(i) for i in bad)
        return batch

    def close(self) -> None:
        """Stops grain's prefetch threads and worker processes; idempotent."""
        if self._closed:
            return
        self._closed = True
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "GrainInputIterator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def create_grain_iterator(source, policy: str, sampler: "input_pipeline.IndexSampler", *,
                          process_index: int, local_batch_size: int, image_size: int,
                          random_flip: bool, start_step: int, prefetch: int,
                          num_threads: int, worker_processes: int = 0) -> GrainInputIterator:
    """The grain pipeline of ``input_pipeline.create_input_iterator`` (its docstring).

    Args:
      source: an ``input_pipeline._Source``.
      policy: ``config.data.on_bad_image``.
      sampler: the global order.
      process_index: this process; it takes slice ``process_index`` of each
        global batch.
      local_batch_size: examples per process and step.
      image_size, random_flip: preprocessing.
      start_step: the first step to yield.
      prefetch: batches prepared ahead (0: none; each ``next`` decodes its batch).
      num_threads: decoding threads (per worker process if any).
      worker_processes: grain worker processes; 0 decodes in this process.
    """
    load = _LoadExample(source, policy, sampler, first=process_index * local_batch_size,
                        local_batch_size=local_batch_size, image_size=image_size,
                        random_flip=random_flip)
    examples = grain.MapDataset.range(start_step * local_batch_size, _STREAM_LENGTH).map(load)
    if worker_processes > 0:
        if not flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags (their defaults outside an
            # absl app, e.g. in a notebook or a test).
            flags.FLAGS.mark_as_parsed()
        # Whole batches per worker: a worker's slice of the dataset is every
        # W-th element, so batching after the split would change the batches.
        dataset = examples.batch(local_batch_size, batch_fn=_stack).to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads,
                              prefetch_buffer_size=max(1, prefetch)))
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_processes, per_worker_buffer_size=max(1, prefetch)))
    else:
        read = (grain.ReadOptions(num_threads=num_threads,
                                  prefetch_buffer_size=prefetch * local_batch_size)
                if prefetch > 0 else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        dataset = examples.to_iter_dataset(read).batch(local_batch_size, batch_fn=_stack)
    return GrainInputIterator(dataset, source, load)
