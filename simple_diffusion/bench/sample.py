"""The sampler (``sampling.make_sample_fn``) timed against a scan of bare network calls."""

import dataclasses
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simple_diffusion import flops
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion import xla_cpu
from simple_diffusion.bench import timing

REFERENCE_STEPS = 256  # Sampling images/s are reported for this many steps.


def init_params(model: nn.Module, config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh) -> Any:
    """Freshly initialised params (seed ``config.seed``), sharded like the trainer's."""
    _, shardings = train_step_lib.sharded_abstract_params(model, config, mesh)
    init = lambda key: nn.meta.unbox(
        train_step_lib.init_state(model, None, config, key, boxed=True)["params"])
    return jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))


def _bare_model_scan(model, params, config, mesh, calls: int, net_batch: int):
    """A compiled ``lax.scan`` of ``calls`` bare network calls on ``net_batch`` images,
    and its arguments."""
    size, channels = config.model.image_size, config.model.in_channels
    batch_sh = sharding_lib.batch_sharding(mesh)
    labels = (jax.device_put(np.zeros((net_batch,), np.int32), batch_sh)
              if config.model.num_classes else None)
    z0 = jax.device_put(np.random.default_rng(0).normal(
        size=(net_batch, size, size, channels)).astype(np.float32), batch_sh)
    logsnrs = jnp.linspace(-10.0, 10.0, calls, dtype=jnp.float32)

    def bare(p, z, lab, grid):
        def body(z, logsnr):
            out = model.apply({"params": p}, z, jnp.full((z.shape[0],), logsnr), lab,
                              train=False)
            return out.astype(jnp.float32), None
        return jax.lax.scan(body, z, grid)[0]

    args = (params, z0, labels, logsnrs)
    # The sampler's compile options, so that the overhead is the sampler's own.
    return jax.jit(bare, out_shardings=batch_sh,
                   compiler_options=xla_cpu.compiler_options()).lower(*args).compile(), args


def benchmark_sampling(config: ml_collections.ConfigDict, model: nn.Module, params: Any,
                       mesh: jax.sharding.Mesh, options: samplers.SamplerOptions, *,
                       batch: int = 0, repeats: int = 3, compare_bare: bool = True
                       ) -> dict[str, Any]:
    """Times one sampler against a ``lax.scan`` of the same network evaluations.

    Args:
      config: the run config (model, schedule, prediction).
      model, params, mesh: the model, its parameters and the device mesh.
      options: the sampler settings (``options.num_steps`` steps are run).
      batch: images per call (0: ``config.sample.num_images``); rounded up to
        a multiple of the device count.
      repeats: timed calls (median).
      compare_bare: also time the bare network scan (sampler and bare timed
        alternately, so that other load hits both alike).

    Returns:
      Compile time, seconds per call and per step, model FLOPs per call (see
      ``flops.sampler_flops``) and FLOP/s, images/s for 256 steps
      (extrapolated linearly when fewer are run) and, with ``compare_bare``,
      the overhead fraction (sampler - bare) / sampler.
    """
    if not config.model.num_classes:
        options = dataclasses.replace(options, guidance_scale=0.0)
    n_dev = jax.device_count()
    batch = -(-(batch or config.sample.num_images) // n_dev) * n_dev
    sample_fn = sampling.make_sample_fn(model, config, mesh, options)
    labels = sampling.replicate_labels(
        sampling.default_labels(batch, config.model.num_classes), mesh)
    rng = jax.random.key(config.seed + 1)
    start = time.perf_counter()
    compiled = sample_fn.lower(params, rng, labels).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(params, rng, labels))
    counts = flops.sampler_flops(config, options, batch)

    run = lambda: timing.median_time(lambda: compiled(params, rng, labels), 1)[0]
    if compare_bare:
        # Guided evaluations everywhere: one call on 2B images per evaluation pair.
        pairs = options.guided and options.guidance_interval is None
        net_batch = 2 * batch if pairs else batch
        calls = counts["model_evaluations"] // (2 if pairs else 1)
        bare, bare_args = _bare_model_scan(model, params, config, mesh, calls, net_batch)
        bare_finite = bool(jnp.all(jnp.isfinite(bare(*bare_args))))
        times, bare_times = [], []
        for _ in range(max(repeats, 1)):
            times.append(run())
            bare_times.append(timing.median_time(lambda: bare(*bare_args), 1)[0])
    else:
        times = [run() for _ in range(max(repeats, 1))]
    seconds = statistics.median(times)
    per_step = seconds / options.num_steps
    out = {
        "sampler": options.sampler,
        "guidance_scale": float(options.guidance_scale),
        "batch": batch,
        "num_steps": options.num_steps,
        "model_evaluations": counts["model_evaluations"],
        "compile_seconds": compile_seconds,
        "seconds": seconds,
        "seconds_per_step": per_step,
        "seconds_all": times,
        "images_per_sec_256_steps": batch / (per_step * REFERENCE_STEPS),
        "extrapolated_to_256_steps": options.num_steps != REFERENCE_STEPS,
        "flops_per_call": counts["flops_per_call"],
        "flops_per_sec": counts["flops_per_call"] / seconds,
        "memory": timing.compiled_memory(compiled),
    }
    if compare_bare:
        bare_seconds = statistics.median(bare_times)
        out.update({
            "bare_model_calls": calls,
            "bare_model_batch": net_batch,
            "bare_model_seconds": bare_seconds,
            "bare_model_seconds_all": bare_times,
            "bare_output_finite": bare_finite,
            "overhead_fraction": (seconds - bare_seconds) / seconds,
            # Median over the alternating (sampler, bare) pairs: robust to a load spike.
            "overhead_fraction_paired": statistics.median(
                (t - b) / t for t, b in zip(times, bare_times)),
        })
    return out
