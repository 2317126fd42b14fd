"""Timers, the device's matmul peak, memory analyses and out-of-memory detection."""

import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Dense bfloat16 tensor-core peaks per device from the vendors' datasheets
# (FLOP/s, without sparsity), matched as substrings of ``device_kind``. The H100
# figure is the SXM part's; the PCIe H100 is 756 TFLOP/s.
DATASHEET_BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` (blocked until ready) over ``repeats`` calls, and all times."""
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


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


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """The datasheet bf16 peak FLOP/s of one device, or None if not known."""
    if dtype != "bfloat16":
        return None
    return next((v for k, v in DATASHEET_BF16_PEAK.items() if k in device_kind), None)


def measure_matmul_peak(dtype: str = "float32", size: int = 0, repeats: int = 10
                        ) -> dict[str, Any]:
    """FLOP/s of a square matmul in ``dtype`` on one device.

    Args:
      dtype: 'float32' | 'bfloat16' (the compute dtype of the model).
      size: matrix side; 0 picks 2048 on CPU and 8192 on accelerators.
      repeats: timed calls (the fastest is used), after one warm-up.

    Returns:
      ``{"dtype", "size", "seconds", "flops_per_sec_per_device", "device_count",
      "flops_per_sec", "flops_per_cpu_second", "datasheet_flops_per_sec", ...}``:
      ``flops_per_sec`` is the per-device figure times the device count, the
      peak MFU is measured against; ``flops_per_cpu_second`` divides by this
      process's CPU time instead (on a shared CPU it moves far less with other
      jobs' load); the datasheet figure (all devices) is None when unknown.
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
    _, times = median_time(lambda: matmul(a, b), repeats)
    cpu_seconds = (time.process_time() - cpu_start) / max(repeats, 1)
    # A peak is the best the device does: other load only ever slows a call down.
    seconds = min(times)
    flops = 2.0 * size**3
    per_device = flops / seconds
    sheet = datasheet_peak(device.device_kind, dtype)
    return {"dtype": dtype, "size": size, "seconds": seconds,
            "seconds_median": statistics.median(times),
            "flops_per_sec_per_device": per_device, "device_count": jax.device_count(),
            "flops_per_sec": per_device * jax.device_count(),
            "flops_per_cpu_second": flops / cpu_seconds if cpu_seconds > 0 else 0.0,
            "datasheet_flops_per_sec": sheet * jax.device_count() if sheet else None}


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Per-device byte counts from the compiled memory analysis.

    ``peak_bytes`` is the larger of XLA's own peak and arguments + outputs -
    aliased (donated) + temporaries (XLA:CPU reports a peak below its own temp
    size), so it never under-reports.
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
    out["xla_peak_bytes"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    out["estimate_bytes"] = estimate
    out["peak_bytes"] = max(out["xla_peak_bytes"], estimate)
    return out


def device_memory_stats() -> dict[str, int] | None:
    """``memory_stats()`` of the first local device (None on CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # pylint: disable=broad-except
        return None
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {k: int(stats[k]) for k in keys if k in stats}


class PredictedOutOfMemory(RuntimeError):
    """The compiled memory analysis exceeds the device memory: not run."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device out-of-memory (runtime or predicted)."""
    if isinstance(error, PredictedOutOfMemory):
        return True
    text = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError) and (
        "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())
