"""The first-GPU run (``benchmarks/gpu.sh``): largest batch, MFU, sampling, FSDP vs data.

Phases, each written out as soon as it is done (``on_update``), so a run cut
short still leaves its numbers:

  1. the train step at the largest batch of ``batch_sizes`` that fits (tried in
     descending order; a batch whose compiled peak exceeds the device memory
     is skipped before anything is allocated, a runtime out-of-memory is
     caught), on a mesh that is FSDP over all devices; model and hardware
     FLOPs from ``flops.train_step_flops``, MFU against the measured matmul
     peak and, where known, the datasheet peak;
  2. sampling: ``sample_steps`` DDPM steps with the config's guidance;
  3. the same train step on a pure data-parallel mesh, against phase 1 (on one
     device the two meshes are the same program).

Phases 2 and 3 are skipped (and say so) when the time budget is spent.
"""

import dataclasses
import gc
import time
from typing import Any, Callable, Sequence

import ml_collections

from simple_diffusion import flops
from simple_diffusion import samplers
from simple_diffusion.bench import sample as sample_lib
from simple_diffusion.bench import timing
from simple_diffusion.bench import train as train_lib

_MESHES = {"fsdp": (1, -1), "data": (-1, 1)}  # name -> (data, fsdp)


def with_batch_and_mesh(config: ml_collections.ConfigDict, batch_size: int,
                        mesh: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` at ``batch_size`` on the named mesh ('fsdp' | 'data')."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    config.mesh.data, config.mesh.fsdp = _MESHES[mesh]
    return config


def largest_fitting_batch(batch_sizes: Sequence[int], run: Callable[[int], Any]
                          ) -> tuple[int | None, Any, list[dict[str, Any]]]:
    """Calls ``run(b)`` for b in ``batch_sizes``, largest first, until one does not
    run out of memory.

    Returns:
      (batch, run(batch), attempts): batch is None (and the result None) if
      every size ran out of memory; attempts lists ``{"batch_size", "fits",
      "error"}`` in the order tried. Errors other than out-of-memory propagate.
    """
    attempts = []
    for b in sorted(set(batch_sizes), reverse=True):
        try:
            result = run(b)
        except Exception as e:  # pylint: disable=broad-except
            if not timing.is_out_of_memory(e):
                raise
            error = _summary(e)
        else:
            attempts.append({"batch_size": b, "fits": True, "error": None})
            return b, result, attempts
        attempts.append({"batch_size": b, "fits": False, "error": error})
        gc.collect()  # The failed attempt's buffers (its traceback is gone now).
    return None, None, attempts


def _summary(error: BaseException) -> str:
    """'Type: first line of the message' (at most 300 characters)."""
    lines = str(error).splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def _memory_limit(memory_limit_bytes: int) -> int:
    """The limit for the compiled-peak check: the given one, else the device's (0: none)."""
    if memory_limit_bytes:
        return memory_limit_bytes
    stats = timing.device_memory_stats() or {}
    return stats.get("bytes_limit", 0)


def _train(config, peak, *, repeats, warmup, memory_limit_bytes, counts=None):
    """One train-step benchmark with FLOPs; returns (results, (model, hardware) FLOPs)."""
    results = train_lib.benchmark_train_step(
        config, repeats=repeats, warmup=warmup, memory_limit_bytes=memory_limit_bytes)[0]
    if counts is None:
        counts = flops.train_step_flop_counts(config)
    return train_lib.add_flops(results, peak, *counts), counts


def _sample(config, peak, *, num_steps, batch):
    """DDPM with the config's guidance on fresh params, on the FSDP mesh."""
    mesh, model, _ = train_lib.setup(config)
    options = dataclasses.replace(samplers.SamplerOptions.from_config(config.sample),
                                  sampler="ddpm", num_steps=num_steps)
    params = sample_lib.init_params(model, config, mesh)
    results = sample_lib.benchmark_sampling(config, model, params, mesh, options, batch=batch,
                                            repeats=1)
    results["mfu"] = results["flops_per_sec"] / peak["flops_per_sec"]
    return results


def _unless_out_of_memory(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or ``{"error": ...}`` if it ran out of memory."""
    try:
        return fn()
    except Exception as e:  # pylint: disable=broad-except
        if not timing.is_out_of_memory(e):
            raise
        return {"error": _summary(e)}


def run_gpu(config: ml_collections.ConfigDict, *, batch_sizes: Sequence[int],
            sample_steps: int = 256, sample_batch: int = 16, repeats: int = 5,
            warmup: int = 1, time_budget_s: float = 540.0, memory_limit_bytes: int = 0,
            matmul_size: int = 0,
            on_update: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """Runs the three phases (module docstring) and returns the JSON-able results.

    Args:
      config: the run config (its dtype is used as is; gpu.sh asks for bf16).
      batch_sizes: global batch sizes to try, largest first.
      sample_steps: DDPM steps of the sampling phase.
      sample_batch: images per sampler call.
      repeats, warmup: timed and untimed train steps.
      time_budget_s: phases 2 and 3 start only within this many seconds.
      memory_limit_bytes: compiled peak per device above which a batch is not
        run; 0: the device's ``bytes_limit`` where the backend reports one.
      matmul_size: side of the peak matmul (0: the device default).
      on_update: called with the results after every phase.
    """
    start = time.monotonic()
    limit = _memory_limit(memory_limit_bytes)
    peak = timing.measure_matmul_peak(config.model.dtype, matmul_size)
    results: dict[str, Any] = {
        "device": timing.describe_devices(), "peak": peak, "memory_limit_bytes": limit,
        "config": {"model": config.model.get("name"), "dtype": config.model.dtype,
                   "image_size": config.model.image_size,
                   "remat": bool(config.model.get("remat", False)),
                   "scan_layers": bool(config.model.get("scan_layers", False))},
        "skipped": []}
    train_kwargs = dict(repeats=repeats, warmup=warmup, memory_limit_bytes=limit)

    def train_at(b):
        attempt_start = time.monotonic()
        out = _train(with_batch_and_mesh(config, b, "fsdp"), peak, **train_kwargs)
        return out, time.monotonic() - attempt_start

    batch, found, results["batch_search"] = largest_fitting_batch(batch_sizes, train_at)
    if batch is not None:
        (results["train"], counts), train_wall = found
    on_update(results)
    if batch is None:
        return results

    if time.monotonic() - start < time_budget_s:
        results["sample"] = _unless_out_of_memory(lambda: _sample(
            with_batch_and_mesh(config, batch, "fsdp"), peak, num_steps=sample_steps,
            batch=sample_batch))
        on_update(results)
    else:
        results["skipped"].append("sample")

    if time.monotonic() - start + train_wall < time_budget_s:
        data = _unless_out_of_memory(lambda: _train(
            with_batch_and_mesh(config, batch, "data"), peak, counts=counts, **train_kwargs)[0])
        results["mesh_comparison"] = {"batch_size": batch, "data": data}  # fsdp: "train".
    else:
        results["skipped"].append("mesh_comparison")
    results["seconds"] = time.monotonic() - start
    on_update(results)
    return results
