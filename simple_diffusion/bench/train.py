"""The trainer's train step measured on synthetic batches: compile, time, memory, FLOPs.

Built from the trainer's own pieces (``optimizer.make_optimizer``,
``train_step.state_shardings`` / ``create_sharded_state`` / ``jit_train_step``,
``sharding.create_mesh``) on random arrays of the right shape (no data
pipeline), so it measures compute only.
"""

import resource
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simple_diffusion import config_validation
from simple_diffusion import flops
from simple_diffusion import models
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion import xla_cpu
from simple_diffusion.bench import timing


def setup(config: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, nn.Module, Any]:
    """(mesh, model, optimizer) exactly as the trainer builds them."""
    mesh_shape = config_validation.validate_config(
        config, num_devices=jax.device_count(), process_count=jax.process_count())
    mesh = sharding_lib.create_mesh(*mesh_shape)
    model = models.create_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
    return mesh, model, tx


def synthetic_batch(config: ml_collections.ConfigDict, batch_sharding, seed: int = 0
                    ) -> dict[str, jax.Array]:
    """A global batch: image float32 [B, S, S, C] in [-1, 1], label int32 [B], placed like
    the trainer's (every process builds the same arrays and places its own shards)."""
    rng = np.random.default_rng(seed)
    size, channels = config.model.image_size, config.model.in_channels
    shape = (config.batch_size, size, size, channels)
    image = np.clip(rng.normal(0.0, 0.5, shape), -1.0, 1.0).astype(np.float32)
    label = rng.integers(0, max(config.model.num_classes, 1), (config.batch_size,)).astype(
        np.int32)
    return {k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
            for k, v in {"image": image, "label": label}.items()}


def _compile(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
             ) -> tuple[jax.stages.Compiled, dict[str, Any]]:
    """The trainer's step compiled on abstract inputs, with trace/compile seconds and memory."""
    start = time.perf_counter()
    lowered = flops.lower_train_step(config, mesh)
    trace_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, {"trace_seconds": trace_seconds,
                      "compile_seconds": time.perf_counter() - start,
                      "memory": timing.compiled_memory(compiled),
                      # Per device, every loop body once: kept to show the undercount.
                      "xla_compiled_flops_per_device": flops.xla_flops(compiled)}


def _state_summary(model, tx, config, mesh) -> tuple[Any, Any, dict[str, int]]:
    """(abstract state, shardings, {"num_params", "state_bytes_per_device"})."""
    abstract_state, state_sh = train_step_lib.state_shardings(model, tx, config, mesh)
    return abstract_state, state_sh, {
        "num_params": int(sum(x.size for x in jax.tree.leaves(abstract_state["params"]))),
        "state_bytes_per_device": sharding_lib.bytes_per_device(abstract_state, state_sh),
    }


def analyze_train_step(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Compiles the train step on abstract inputs (nothing allocated): compile time,
    per-device memory of this backend's compiled step (a CPU's buffer assignment
    differs from a GPU's: an estimate there) and the state size."""
    mesh, model, tx = setup(config)
    _, _, summary = _state_summary(model, tx, config, mesh)
    _, compile_info = _compile(config, mesh)
    return {"batch_size": config.batch_size, **summary, **compile_info}


def benchmark_train_step(config: ml_collections.ConfigDict, *, repeats: int = 10,
                         warmup: int = 2, breakdown: bool = False,
                         memory_limit_bytes: int = 0) -> tuple[dict[str, Any], Any, Any, Any]:
    """Compiles and times the trainer's train step on a synthetic batch.

    Args:
      config: the run config.
      repeats: timed steps (median reported).
      warmup: untimed steps after the first.
      breakdown: also time the model forward and forward+backward.
      memory_limit_bytes: if > 0, raise ``timing.PredictedOutOfMemory`` before
        allocating anything when the compiled step's peak per device exceeds it.

    Returns:
      (results, state, model, mesh): the measured numbers (no FLOPs: see
      ``add_flops``), the train state after the timed steps, the model and mesh.
    """
    mesh, model, tx = setup(config)
    _, state_sh, summary = _state_summary(model, tx, config, mesh)
    compiled, compile_info = _compile(config, mesh)
    peak_bytes = compile_info["memory"].get("peak_bytes", 0)
    if memory_limit_bytes and peak_bytes > memory_limit_bytes:
        raise timing.PredictedOutOfMemory(
            f"batch {config.batch_size}: compiled peak {peak_bytes} bytes per device > "
            f"limit {memory_limit_bytes}")
    state = jax.block_until_ready(
        train_step_lib.create_sharded_state(model, tx, config, state_sh))
    batch = synthetic_batch(config, sharding_lib.batch_sharding(mesh), config.seed)

    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch))
    first_step_seconds = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = jax.block_until_ready(compiled(state, batch))

    times = []
    cpu_start = time.process_time()
    usage_start = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - start)
    step_cpu_seconds = (time.process_time() - cpu_start) / max(repeats, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # Kernel time and page faults: on CPU each step maps XLA's temp buffer afresh
    # (simple_diffusion/host_malloc.py), which user time alone does not show.
    step_system_seconds = (usage.ru_stime - usage_start.ru_stime) / max(repeats, 1)
    step_minor_faults = (usage.ru_minflt - usage_start.ru_minflt) / max(repeats, 1)
    step_seconds = statistics.median(times)

    # The trainer's loop: dispatch steps back to back, synchronise once.
    start = time.perf_counter()
    for _ in range(max(repeats, 1)):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    loop_step_seconds = (time.perf_counter() - start) / max(repeats, 1)

    results = {
        "batch_size": config.batch_size,
        **summary,
        **compile_info,
        "first_step_seconds": first_step_seconds,
        "step_seconds": step_seconds,
        "step_seconds_all": times,
        "step_seconds_min": min(times),
        "loop_step_seconds": loop_step_seconds,
        "step_cpu_seconds": step_cpu_seconds,
        "step_system_seconds": step_system_seconds,
        "step_minor_faults": step_minor_faults,
        "images_per_sec": config.batch_size / step_seconds,
        "loss": float(metrics["loss"]),
        "device_memory_stats": timing.device_memory_stats(),
    }
    if breakdown:
        results["breakdown"] = model_breakdown(model, state["params"], batch, config, repeats)
    return results, state, model, mesh


def add_flops(train: dict[str, Any], peak: dict[str, Any], model_flops: float,
              hardware_flops: float) -> dict[str, Any]:
    """Adds FLOPs per step, achieved FLOP/s and utilisations to ``train`` (in place).

    Args:
      train: ``benchmark_train_step`` results.
      peak: ``timing.measure_matmul_peak`` results (all devices).
      model_flops: ``flops.train_step_flops(config)`` (no remat recompute).
      hardware_flops: ``flops.train_step_flops(config, hardware=True)``.

    Returns:
      ``train`` with ``flops_per_step`` (model FLOPs), ``hardware_flops_per_step``,
      ``flops_per_sec``, ``mfu`` (model FLOPs over the measured matmul peak),
      ``hfu`` (hardware FLOPs, same peak), ``mfu_datasheet`` (None if the
      device's datasheet peak is unknown) and, on CPU, ``mfu_cpu_time``.
    """
    seconds = train["step_seconds"]
    train["flops_per_step"] = model_flops
    train["flops_per_image"] = model_flops / train["batch_size"]
    train["hardware_flops_per_step"] = hardware_flops
    train["flops_per_sec"] = model_flops / seconds
    train["mfu"] = train["flops_per_sec"] / peak["flops_per_sec"]
    train["hfu"] = hardware_flops / seconds / peak["flops_per_sec"]
    sheet = peak.get("datasheet_flops_per_sec")
    train["mfu_datasheet"] = train["flops_per_sec"] / sheet if sheet else None
    # FLOPs per CPU-second of the step over those of the matmul: robust to other jobs'
    # load on a shared CPU (meaningless on accelerators, where the host mostly waits).
    if train["step_cpu_seconds"] > 0 and peak["flops_per_cpu_second"] > 0:
        train["mfu_cpu_time"] = (model_flops / train["step_cpu_seconds"]
                                 / peak["flops_per_cpu_second"])
    for part in train.get("breakdown", {}).values():
        part["mfu"] = part["flops_per_sec"] / peak["flops_per_sec"]
    return train


def model_breakdown(model: nn.Module, params: Any, batch: dict[str, jax.Array],
                    config: ml_collections.ConfigDict, repeats: int) -> dict[str, Any]:
    """Times the model forward (train mode) and forward+backward (w.r.t. the params)
    on the batch; FLOPs from ``flops`` (model FLOPs, no remat recompute)."""
    image, labels = batch["image"], batch["label"] if config.model.num_classes else None
    logsnr = jnp.linspace(-10.0, 10.0, image.shape[0], dtype=jnp.float32)
    rngs = {"dropout": jax.random.key(0)}

    def forward(p):
        return model.apply({"params": p}, image, logsnr, labels, train=True, rngs=rngs)

    def loss(p):
        return jnp.mean(jnp.square(forward(p)))

    counts = {"forward": flops.forward_flops(config.model, config.batch_size, train=True),
              "forward_backward": flops.forward_backward_flops(config.model, config.batch_size)}
    out = {}
    for name, fn in (("forward", forward), ("forward_backward", jax.grad(loss))):
        start = time.perf_counter()
        compiled = jax.jit(fn, compiler_options=xla_cpu.compiler_options()).lower(
            params).compile()
        compile_seconds = time.perf_counter() - start
        jax.block_until_ready(compiled(params))
        seconds, _ = timing.median_time(lambda c=compiled: c(params), repeats)
        out[name] = {"seconds": seconds, "flops": counts[name],
                     "flops_per_sec": counts[name] / seconds, "compile_seconds": compile_seconds}
    return out
