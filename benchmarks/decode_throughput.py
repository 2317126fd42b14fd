r"""Decoding throughput of the input pipeline on an ImageNet-shaped JPEG folder.

  python benchmarks/decode_throughput.py --num_images=2000 --threads=1,2 --workers=2

Generates ``--num_images`` 500x375 JPEGs (smooth gradients, a few shapes and
noise, quality 90, ~50-80 kB like ImageNet's) in ``--folder`` once, then reads
them through ``input_pipeline`` at 512x512 with random flips, as the
imagenet512 config does, and prints images/s per host for:

  * ``threadpool``: the hand-written pipeline grain replaced
    (``input_pipeline._thread_pool_iterator``);
  * ``grain``: ``create_input_iterator`` with ``--threads`` grain threads;
  * ``grain+processes``: ``config.data.worker_processes`` = each of ``--workers``.

and what one host must feed: ``--per_host_batch / --step_seconds`` (or, from
FLOPs, ``devices_per_host * peak * mfu / train FLOPs per image``). The load
average (/proc/loadavg) before and after each measurement is printed with it:
numbers taken on a loaded machine say so.
"""

import argparse
import os
import time

import ml_collections
import numpy as np
from PIL import Image

from simple_diffusion import input_pipeline

# docs/benchmarks.md: imagenet512's train step with remat, per image.
TRAIN_TFLOP_PER_IMAGE = 5.764


def make_folder(folder: str, num_images: int, seed: int = 0) -> None:
    """``num_images`` 500x375 JPEGs in 10 class subfolders (kept if already there)."""
    done = os.path.join(folder, f"DONE_{num_images}")
    if os.path.exists(done):
        return
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(num_images):
        a, b, c = rng.uniform(-1, 1, 3)
        base = 128 + 60 * np.sin(a * x / 40 + b * y / 30 + c * 6)[..., None] * rng.uniform(
            0.3, 1, 3)
        image = base + rng.normal(0, 12, (375, 500, 3))
        for _ in range(4):  # Rectangles of flat colour: edges for the encoder.
            x0, y0 = rng.integers(0, 400), rng.integers(0, 300)
            image[y0:y0 + rng.integers(20, 100), x0:x0 + rng.integers(20, 100)] = rng.uniform(
                0, 255, 3)
        path = os.path.join(folder, f"class{i % 10}", f"{i:06d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
    open(done, "w").close()


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def measure(make_iterator, batch_size: int, num_batches: int) -> float:
    """Images/s over ``num_batches`` after 2 warm-up batches (start-up excluded)."""
    with make_iterator() as iterator:
        for _ in range(2):
            next(iterator)
        start = time.perf_counter()
        for _ in range(num_batches):
            next(iterator)
        return num_batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="/tmp/imagenet_shaped_jpegs")
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32, help="per host, for the timing")
    parser.add_argument("--num_batches", type=int, default=8)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--workers", default="2", help="comma-separated worker-process counts")
    parser.add_argument("--per_host_batch", type=int, default=0,
                        help="imagenet512's batch per host; with --step_seconds gives the need")
    parser.add_argument("--step_seconds", type=float, default=0.0)
    parser.add_argument("--devices_per_host", type=int, default=8)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense, H100/H200")
    parser.add_argument("--mfu", type=float, default=0.4)
    args = parser.parse_args()

    make_folder(args.folder, args.num_images)
    config = ml_collections.ConfigDict(dict(
        source="folder", folder=args.folder, name=None, split=None, data_dir=None,
        random_flip=True, prefetch=2, on_bad_image="fail", worker_processes=0))
    common = dict(image_size=args.image_size, global_batch_size=args.batch_size, seed=0,
                  process_index=0, process_count=1, channels=3)
    runs = []
    for threads in [int(t) for t in args.threads.split(",") if t]:
        runs.append((f"threadpool, {threads} threads", lambda t=threads: (
            input_pipeline._thread_pool_iterator(config, num_workers=t, **common))))  # pylint: disable=protected-access
        runs.append((f"grain, {threads} threads", lambda t=threads: (
            input_pipeline.create_input_iterator(config, num_workers=t, **common))))
    for workers in [int(w) for w in args.workers.split(",") if w]:
        def grain_processes(w=workers):
            c = ml_collections.ConfigDict(config.to_dict())
            c.worker_processes = w
            return input_pipeline.create_input_iterator(c, num_workers=1, **common)
        runs.append((f"grain, {workers} worker processes x 1 thread", grain_processes))

    print(f"{os.cpu_count()} CPUs; {args.num_images} JPEGs 500x375 -> "
          f"{args.image_size}x{args.image_size}, batches of {args.batch_size}")
    print("| pipeline | images/s | load average before / after |")
    print("| --- | --- | --- |")
    for name, make in runs:
        before = _loadavg()
        rate = measure(make, args.batch_size, args.num_batches)
        print(f"| {name} | {rate:.1f} | {before} / {_loadavg()} |", flush=True)

    need_flops = (args.devices_per_host * args.peak_tflops * args.mfu / TRAIN_TFLOP_PER_IMAGE)
    print(f"\nimagenet512 at {args.mfu:.0%} MFU on {args.devices_per_host} devices of "
          f"{args.peak_tflops:g} TFLOP/s per host ({TRAIN_TFLOP_PER_IMAGE} TFLOP per image "
          f"per train step): a host must feed {need_flops:.0f} images/s.")
    if args.per_host_batch and args.step_seconds:
        print(f"Given per-host batch {args.per_host_batch} and {args.step_seconds} s/step: "
              f"{args.per_host_batch / args.step_seconds:.0f} images/s.")


if __name__ == "__main__":
    main()
