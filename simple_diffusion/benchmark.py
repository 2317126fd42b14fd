r"""Benchmark: train-step throughput, MFU, compile time, memory and sampler cost.

  python -m simple_diffusion.benchmark --config=configs/fashion_mnist_demo.py \
      --sample_steps=16 --output=/tmp/demo.json
  python -m simple_diffusion.benchmark --config=configs/imagenet256.py \
      --config.model.dtype=bfloat16 --config.batch_size=64 --config.mesh.fsdp=1

Runs on whatever devices JAX sees, with the trainer's own pieces
(``optimizer.make_optimizer``, ``train_step.state_shardings``,
``train_step.make_train_step``, ``sharding.create_mesh``,
``sampling.make_sample_fn``) on synthetic batches (random arrays of the right
shape, no data pipeline), so it measures compute only. It reports:

  * train step: compile time, median step time (each step timed with
    ``jax.block_until_ready`` after warm-up) and the per-step time of an
    un-synchronised loop of the same steps (equal when the loop has no host
    synchronisation or retracing), images/s, FLOPs per step from XLA's cost
    analysis of the compiled step, achieved FLOP/s and MFU;
  * the device peak used for MFU: a large matrix product in the config's
    compute dtype (``config.model.dtype``), measured in the same run, times
    the device count;
  * peak memory from the compiled memory analysis, and
    ``device.memory_stats()`` where the backend has them (GPU/TPU);
  * optionally (``--breakdown``) the model's forward and forward+backward on
    the training batch, each with its FLOPs and FLOP/s, to see where a train
    step loses against the peak;
  * sampling: compile time, time per denoising step, the loop's overhead
    beyond the model calls (the sampler against a ``lax.scan`` of the same
    number of bare model calls) and images/s for 256-step sampling
    (extrapolated linearly from ``--sample_steps`` when fewer are run).

Output: a JSON file (``--output``) and a Markdown table on stdout.
"""

import json
import math
import platform
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from simple_diffusion import config_validation
from simple_diffusion import models
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import sampling
from simple_diffusion import schedules
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib

REFERENCE_SAMPLE_STEPS = 256  # images/s for sampling are reported for this many steps.

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py).", lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON to this path.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed train steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps after compilation.")
_SAMPLE_STEPS = flags.DEFINE_integer(
    "sample_steps", REFERENCE_SAMPLE_STEPS,
    "Denoising steps actually run; images/s is extrapolated to 256 steps when fewer. "
    "0 skips the sampling benchmark.")
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch", 0, "Images per sampling call (0: config.sample.num_images, rounded up "
    "to a multiple of the device count).")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 3, "Timed sampling calls (median).")
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size", 0, "Side of the square peak matmul (0: 2048 on CPU, 8192 otherwise).")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Only compile the train step on abstract inputs (nothing is "
    "allocated) and report FLOPs, compile time and memory: for models too big to run here.")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "Also time the model forward and forward+backward on the batch.")


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` (blocked until ready) over ``repeats`` calls."""
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _cost_flops(compiled) -> float:
    """FLOPs of a compiled executable from XLA's cost analysis (0 if unavailable)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # Older jax: one dict per device.
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def _memory(compiled) -> dict[str, int]:
    """Per-device byte counts from the compiled memory analysis.

    ``peak_bytes`` is XLA's peak where the backend reports one, otherwise
    arguments + outputs - aliased (donated) + temporaries, an upper bound.
    """
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    out = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "generated_code_bytes": int(stats.generated_code_size_in_bytes),
    }
    estimate = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                + out["temp_bytes"])
    # XLA:CPU reports a peak below its own temp size; never report less than the estimate.
    out["xla_peak_bytes"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    out["estimate_bytes"] = estimate
    out["peak_bytes"] = max(out["xla_peak_bytes"], estimate)
    return out


def _device_memory_stats() -> dict[str, int] | None:
    """``memory_stats()`` of the first local device (None on CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # pylint: disable=broad-except
        return None
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {k: int(stats[k]) for k in keys if k in stats}


def describe_devices() -> dict[str, Any]:
    """The devices JAX sees and the software versions."""
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def measure_matmul_peak(dtype: str = "float32", size: int = 0, repeats: int = 10
                        ) -> dict[str, Any]:
    """FLOP/s of a square matmul in ``dtype`` on one device.

    Args:
      dtype: 'float32' | 'bfloat16' (the compute dtype of the model).
      size: matrix side; 0 picks 2048 on CPU and 8192 on accelerators.
      repeats: timed calls (the fastest is used), after one warm-up.

    Returns:
      ``{"dtype", "size", "seconds", "flops_per_sec_per_device", "device_count",
      "flops_per_sec", "flops_per_cpu_second", ...}``: ``flops_per_sec`` is the
      per-device figure times the device count, the peak the train step's MFU
      is measured against; ``flops_per_cpu_second`` divides by this process's
      CPU time instead of wall time (on a CPU shared with other jobs it moves
      far less with their load).
    """
    device = jax.devices()[0]
    if not size:
        size = 2048 if device.platform == "cpu" else 8192
    jdtype = jnp.dtype(dtype)
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), jdtype), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), jdtype), device)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jdtype))
    jax.block_until_ready(matmul(a, b))
    cpu_start = time.process_time()
    _, times = _median_time(lambda: matmul(a, b), repeats)
    cpu_seconds = (time.process_time() - cpu_start) / max(repeats, 1)
    # A peak is the best the device does: other load only ever slows a call down.
    seconds = min(times)
    flops = 2.0 * size**3
    per_device = flops / seconds
    return {"dtype": dtype, "size": size, "seconds": seconds,
            "seconds_median": statistics.median(times),
            "flops_per_sec_per_device": per_device, "device_count": jax.device_count(),
            "flops_per_sec": per_device * jax.device_count(),
            "flops_per_cpu_second": flops / cpu_seconds if cpu_seconds > 0 else 0.0}


def _compile_train_step(model, tx, config, mesh, state_sh, state, batch):
    """The trainer's own jitted step, lowered and compiled; returns
    (compiled, trace seconds, compile seconds)."""
    jitted = train_step_lib.jit_train_step(model, tx, config, mesh, state_sh)
    start = time.perf_counter()
    lowered = jitted.lower(state, batch)
    trace_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, trace_seconds, time.perf_counter() - start


def synthetic_batch(config: ml_collections.ConfigDict, batch_sharding, seed: int = 0
                    ) -> dict[str, jax.Array]:
    """A global batch of random images in [-1, 1] and labels, placed like the trainer's."""
    rng = np.random.default_rng(seed)
    size, channels = config.model.image_size, config.model.in_channels
    shape = (config.batch_size, size, size, channels)
    image = np.clip(rng.normal(0.0, 0.5, shape), -1.0, 1.0).astype(np.float32)
    label = rng.integers(0, max(config.model.num_classes, 1), (config.batch_size,)).astype(
        np.int32)
    # Every process builds the same global arrays and places its own shards.
    return {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
            for k, v in {"image": image, "label": label}.items()}


def _setup(config: ml_collections.ConfigDict):
    """Mesh, model, optimizer, schedules and shardings exactly as the trainer builds them."""
    mesh_shape = config_validation.validate_config(
        config, num_devices=jax.device_count(), process_count=jax.process_count())
    mesh = sharding_lib.create_mesh(*mesh_shape)
    model = models.create_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
    lr_schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
    logsnr_fn = schedules.get_logsnr_fn(**config.schedule)
    return mesh, model, tx, lr_schedule, logsnr_fn


def benchmark_train_step(config: ml_collections.ConfigDict, *, repeats: int = 10,
                         warmup: int = 2, breakdown: bool = False
                         ) -> tuple[dict[str, Any], Any, Any, Any]:
    """Compiles and times the trainer's train step on a synthetic batch.

    Returns:
      (results, state, model, mesh): the measured numbers, and the train state
      after the timed steps (its params feed the sampling benchmark).
    """
    mesh, model, tx, lr_schedule, logsnr_fn = _setup(config)
    batch_sh = sharding_lib.batch_sharding(mesh)
    abstract_state, state_sh = train_step_lib.state_shardings(model, tx, config, mesh)
    state = jax.block_until_ready(
        train_step_lib.create_sharded_state(model, tx, config, state_sh))
    batch = synthetic_batch(config, batch_sh, config.seed)

    compiled, trace_seconds, compile_seconds = _compile_train_step(
        model, tx, config, mesh, state_sh, state, batch)

    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    first_step_seconds = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = jax.block_until_ready(compiled(state, batch))

    times = []
    cpu_start = time.process_time()
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    step_cpu_seconds = (time.process_time() - cpu_start) / max(repeats, 1)
    step_seconds = statistics.median(times)

    # The trainer's loop: dispatch steps back to back, synchronise once.
    start = time.perf_counter()
    for _ in range(max(repeats, 1)):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    loop_step_seconds = (time.perf_counter() - start) / max(repeats, 1)

    flops = _cost_flops(compiled)
    num_params = int(sum(x.size for x in jax.tree.leaves(abstract_state["params"])))
    results = {
        "batch_size": config.batch_size,
        "num_params": num_params,
        "trace_seconds": trace_seconds,
        "compile_seconds": compile_seconds,
        "first_step_seconds": first_step_seconds,
        "step_seconds": step_seconds,
        "step_seconds_all": times,
        "step_seconds_min": min(times),
        "loop_step_seconds": loop_step_seconds,
        "step_cpu_seconds": step_cpu_seconds,
        "images_per_sec": config.batch_size / step_seconds,
        "flops_per_step": flops,
        "flops_per_sec": flops / step_seconds,
        "memory": _memory(compiled),
        "state_bytes_per_device": sharding_lib.bytes_per_device(abstract_state, state_sh),
        "loss": float(metrics["loss"]),
    }
    if breakdown:
        results["breakdown"] = _model_breakdown(model, state["params"], batch, config, repeats)
    return results, state, model, mesh


def analyze_train_step(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Compiles the train step on abstract inputs (nothing allocated) and reads XLA's analyses.

    For models too large to run here: gives the compile time, FLOPs per step
    and the per-device memory of the compiled step for this backend (on a CPU
    the buffer assignment differs from a GPU's, so treat it as an estimate).
    """
    mesh, model, tx, lr_schedule, logsnr_fn = _setup(config)
    batch_sh = sharding_lib.batch_sharding(mesh)
    abstract_state, state_sh = train_step_lib.state_shardings(model, tx, config, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract_state, state_sh)
    size, channels = config.model.image_size, config.model.in_channels
    batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, size, size, channels), jnp.float32,
                                      sharding=batch_sh),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sh),
    }
    compiled, trace_seconds, compile_seconds = _compile_train_step(
        model, tx, config, mesh, state_sh, state, batch)
    return {
        "batch_size": config.batch_size,
        "num_params": int(sum(x.size for x in jax.tree.leaves(abstract_state["params"]))),
        "trace_seconds": trace_seconds,
        "compile_seconds": compile_seconds,
        "flops_per_step": _cost_flops(compiled),
        "memory": _memory(compiled),
        "state_bytes_per_device": sharding_lib.bytes_per_device(abstract_state, state_sh),
    }


def _model_breakdown(model: nn.Module, params: Any, batch: dict[str, jax.Array],
                     config: ml_collections.ConfigDict, repeats: int) -> dict[str, Any]:
    """Times the model forward and forward+backward (w.r.t. params) on the batch."""
    image, labels = batch["image"], batch["label"] if config.model.num_classes else None
    logsnr = jnp.linspace(-10.0, 10.0, image.shape[0], dtype=jnp.float32)
    rngs = {"dropout": jax.random.key(0)}

    def forward(p):
        return model.apply({"params": p}, image, logsnr, labels, train=True, rngs=rngs)

    def loss(p):
        return jnp.mean(jnp.square(forward(p)))

    out = {}
    for name, fn in (("forward", forward), ("forward_backward", jax.grad(loss))):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(params).compile()
        compile_seconds = time.perf_counter() - start
        jax.block_until_ready(compiled(params))
        seconds, _ = _median_time(lambda c=compiled: c(params), repeats)
        flops = _cost_flops(compiled)
        out[name] = {"seconds": seconds, "flops": flops, "flops_per_sec": flops / seconds,
                     "compile_seconds": compile_seconds}
    return out


def benchmark_sampling(config: ml_collections.ConfigDict, model: nn.Module, params: Any,
                       mesh: jax.sharding.Mesh, *, num_steps: int, batch: int = 0,
                       repeats: int = 3) -> dict[str, Any]:
    """Times ``sampling.make_sample_fn`` against a ``lax.scan`` of bare model calls.

    Args:
      config: the run config (sampler, guidance from ``config.sample``).
      model, params, mesh: the model, its parameters and the device mesh.
      num_steps: denoising steps actually run.
      batch: images per call (0: ``config.sample.num_images``); rounded up to
        a multiple of the device count.
      repeats: timed calls (median).

    Returns:
      Compile time, seconds per call and per denoising step, the bare model
      time for the same number of calls, the overhead fraction
      ``(sampler - bare) / sampler`` and images/s for 256 steps.
    """
    n_dev = jax.device_count()
    batch = batch or config.sample.num_images
    batch = int(math.ceil(batch / n_dev) * n_dev)
    num_classes = config.model.num_classes
    sampler = config.sample.sampler
    guidance = config.sample.guidance_scale if num_classes else 0.0
    sample_fn = sampling.make_sample_fn(
        model, config, mesh, sampler=sampler, num_steps=num_steps, guidance_scale=guidance,
        clip_x=config.sample.clip_x)
    labels = sampling.replicate_labels(sampling.default_labels(batch, num_classes), mesh)
    rng = jax.random.key(config.seed + 1)
    start = time.perf_counter()
    compiled = sample_fn.lower(params, rng, labels).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(params, rng, labels))

    # The same model calls with nothing else: a guided step evaluates 2B images
    # in one call, Heun makes 2N - 1 calls.
    calls = 2 * num_steps - 1 if sampler == "heun" else num_steps
    net_batch = 2 * batch if guidance != 0 else batch
    size, channels = config.model.image_size, config.model.in_channels
    batch_sh = sharding_lib.batch_sharding(mesh)
    net_labels = np.zeros((net_batch,), np.int32) if num_classes else None
    z0 = jax.device_put(np.random.default_rng(0).normal(
        size=(net_batch, size, size, channels)).astype(np.float32), batch_sh)
    if net_labels is not None:
        net_labels = jax.device_put(net_labels, batch_sh)
    logsnrs = jnp.linspace(-10.0, 10.0, calls, dtype=jnp.float32)

    def bare(p, z, lab, grid):
        def body(z, logsnr):
            out = model.apply({"params": p}, z, jnp.full((z.shape[0],), logsnr), lab,
                              train=False)
            return out.astype(jnp.float32), None
        return jax.lax.scan(body, z, grid)[0]

    bare_compiled = jax.jit(bare, out_shardings=batch_sh).lower(
        params, z0, net_labels, logsnrs).compile()
    bare_finite = bool(jnp.all(jnp.isfinite(bare_compiled(params, z0, net_labels, logsnrs))))
    # Interleaved, so that load from other processes hits both alike.
    times, bare_times = [], []
    for _ in range(max(repeats, 1)):
        times.append(_median_time(lambda: compiled(params, rng, labels), 1)[0])
        bare_times.append(_median_time(
            lambda: bare_compiled(params, z0, net_labels, logsnrs), 1)[0])
    seconds, bare_seconds = statistics.median(times), statistics.median(bare_times)
    per_step = seconds / num_steps
    return {
        "sampler": sampler,
        "guidance_scale": float(guidance),
        "batch": batch,
        "num_steps": num_steps,
        "model_calls": calls,
        "compile_seconds": compile_seconds,
        "seconds": seconds,
        "seconds_per_step": per_step,
        "seconds_all": times,
        "bare_model_seconds": bare_seconds,
        "bare_model_seconds_all": bare_times,
        "bare_output_finite": bare_finite,
        "overhead_fraction": (seconds - bare_seconds) / seconds,
        # Median over the interleaved (sampler, bare) pairs: robust to a load spike.
        "overhead_fraction_paired": statistics.median(
            (t - b) / t for t, b in zip(times, bare_times)),
        "images_per_sec_256_steps": batch / (per_step * REFERENCE_SAMPLE_STEPS),
        "extrapolated_to_256_steps": num_steps != REFERENCE_SAMPLE_STEPS,
        "flops_per_call": _cost_flops(compiled) / max(calls, 1),
        "memory": _memory(compiled),
    }


def run_benchmark(config: ml_collections.ConfigDict, *, repeats: int = 10, warmup: int = 2,
                  sample_steps: int = REFERENCE_SAMPLE_STEPS, sample_batch: int = 0,
                  sample_repeats: int = 3, matmul_size: int = 0,
                  breakdown: bool = False) -> dict[str, Any]:
    """Runs every measurement and returns the JSON-able results.

    Args:
      config: the run config (its model, batch size, optimizer, mesh, sampler).
      repeats: timed train steps (median reported).
      warmup: untimed steps after compilation.
      sample_steps: denoising steps run (0 skips sampling).
      sample_batch: images per sampling call (0: config.sample.num_images).
      sample_repeats: timed sampling calls.
      matmul_size: side of the peak matmul (0: device default).
      breakdown: also time the model forward and forward+backward.
    """
    results = {"device": describe_devices(), "config": {
        "model": config.model.get("name"), "dtype": config.model.dtype,
        "image_size": config.model.image_size, "batch_size": config.batch_size,
        "grad_accum_steps": config.optimizer.grad_accum_steps,
        "mesh": dict(config.mesh), "remat": bool(config.model.get("remat", False)),
    }}
    peak = measure_matmul_peak(config.model.dtype, matmul_size)
    results["peak"] = peak
    train, state, model, mesh = benchmark_train_step(config, repeats=repeats, warmup=warmup,
                                                     breakdown=breakdown)
    train["mfu"] = train["flops_per_sec"] / peak["flops_per_sec"]
    # The same ratio in FLOPs per CPU-second of this process: robust to other jobs' load
    # on a shared CPU (meaningless on accelerators, where the host mostly waits).
    if train["step_cpu_seconds"] > 0 and peak["flops_per_cpu_second"] > 0:
        train["mfu_cpu_time"] = (train["flops_per_step"] / train["step_cpu_seconds"]
                                 / peak["flops_per_cpu_second"])
    for part in train.get("breakdown", {}).values():
        part["mfu"] = part["flops_per_sec"] / peak["flops_per_sec"]
    results["train"] = train
    if sample_steps > 0:
        results["sample"] = benchmark_sampling(
            config, model, state["ema"][0], mesh, num_steps=sample_steps, batch=sample_batch,
            repeats=sample_repeats)
    results["device_memory_stats"] = _device_memory_stats()
    return results


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def markdown_table(results: dict[str, Any]) -> str:
    """The headline numbers as a two-column Markdown table."""
    d, p, t = results["device"], results["peak"], results["train"]
    c = results["config"]
    rows = [
        ("device", f"{d['device_count']} x {d['device_kind']} ({d['platform']}), "
                   f"jax {d['jax_version']}"),
        ("model", f"{c['model']} {c['image_size']}px, {t['num_params']:,} params, "
                  f"{c['dtype']}, batch {c['batch_size']}"),
        ("matmul peak", f"{p['flops_per_sec'] / 1e9:.1f} GFLOP/s ({p['size']}^2 {p['dtype']}, "
                        f"{p['flops_per_sec_per_device'] / 1e9:.1f} per device)"),
        ("train compile", f"{t['compile_seconds']:.2f} s (+ trace {t['trace_seconds']:.2f} s)"),
        ("train step (median)", f"{1e3 * t['step_seconds']:.1f} ms "
                                f"(min {1e3 * t['step_seconds_min']:.1f} ms)"),
        ("train step (unsynced loop)", f"{1e3 * t['loop_step_seconds']:.1f} ms"),
        ("train images/s", f"{t['images_per_sec']:.1f}"),
        ("FLOPs / step (XLA)", f"{t['flops_per_step'] / 1e9:.3f} GFLOP"),
        ("achieved", f"{t['flops_per_sec'] / 1e9:.2f} GFLOP/s"),
        ("MFU (vs matmul peak)", f"{100 * t['mfu']:.1f}%"),
    ]
    if d["platform"] == "cpu" and "mfu_cpu_time" in t:
        rows += [("train step CPU time", f"{1e3 * t['step_cpu_seconds']:.1f} ms"),
                 ("MFU by CPU time", f"{100 * t['mfu_cpu_time']:.1f}%")]
    mem = t.get("memory", {})
    if mem:
        rows.append(("train peak memory / device", f"{_fmt_bytes(mem['peak_bytes'])} "
                     f"(temp {_fmt_bytes(mem['temp_bytes'])}, args "
                     f"{_fmt_bytes(mem['argument_bytes'])})"))
    for name, part in t.get("breakdown", {}).items():
        rows.append((f"model {name.replace('_', '+')}",
                     f"{1e3 * part['seconds']:.1f} ms, {part['flops'] / 1e9:.3f} GFLOP, "
                     f"{part['flops_per_sec'] / 1e9:.2f} GFLOP/s ({100 * part['mfu']:.1f}%)"))
    s = results.get("sample")
    if s:
        label = " (extrapolated)" if s["extrapolated_to_256_steps"] else ""
        rows += [
            ("sampler", f"{s['sampler']}, {s['num_steps']} steps, batch {s['batch']}, "
                        f"guidance {s['guidance_scale']}"),
            ("sampler compile", f"{s['compile_seconds']:.2f} s"),
            ("time / denoising step", f"{1e3 * s['seconds_per_step']:.2f} ms"),
            ("loop overhead vs bare model scan",
             f"{100 * s['overhead_fraction']:.1f}% (median), "
             f"{100 * s['overhead_fraction_paired']:.1f}% (median of pairs)"),
            (f"sample images/s @256 steps{label}", f"{s['images_per_sec_256_steps']:.2f}"),
        ]
    dms = results.get("device_memory_stats")
    if dms:
        rows.append(("device memory_stats peak", _fmt_bytes(dms.get("peak_bytes_in_use", 0))))
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _COMPILE_ONLY.value:
        results = {"device": describe_devices(), "train_compile_only":
                   analyze_train_step(_CONFIG.value)}
        print(json.dumps(results, indent=2))
        if _OUTPUT.value:
            with open(_OUTPUT.value, "w") as f:
                json.dump(results, f, indent=2)
        return
    results = run_benchmark(
        _CONFIG.value, repeats=_REPEATS.value, warmup=_WARMUP.value,
        sample_steps=_SAMPLE_STEPS.value, sample_batch=_SAMPLE_BATCH.value,
        sample_repeats=_SAMPLE_REPEATS.value, matmul_size=_MATMUL_SIZE.value,
        breakdown=_BREAKDOWN.value)
    print(markdown_table(results))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nWrote {_OUTPUT.value}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
