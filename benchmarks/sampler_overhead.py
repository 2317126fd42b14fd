"""Sampler overhead beyond the model call, and compile time versus step count.

Usage:
  .venv/bin/python benchmarks/sampler_overhead.py [--batch 8 --res 32 --channels 32 --steps 256]

Measures, for a small 3-layer conv model (the model cost is what a real network
would dominate; the sampler's own arithmetic is what we want to see):
  * the time of `samplers.sample` per step for each sampler, against a
    `lax.scan` of the same number of bare model calls (Heun is compared with
    2 calls per step);
  * the jit compile time of `samplers.sample` for 8 and 512 steps (a scan is
    compiled once, so the two should be close).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from simple_diffusion import samplers
from simple_diffusion import schedules


def make_model(rng, channels, width):
    """A small conv net (z, logsnr, labels) -> output; params closed over."""
    k1, k2, k3 = jax.random.split(rng, 3)
    w1 = jax.random.normal(k1, (3, 3, channels, width)) * 0.1
    w2 = jax.random.normal(k2, (3, 3, width, width)) * 0.05
    w3 = jax.random.normal(k3, (3, 3, width, channels)) * 0.05
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def model_fn(z, logsnr, labels):
        del labels
        h = jax.nn.silu(conv(z, w1) + 0.01 * logsnr[:, None, None, None])
        h = jax.nn.silu(conv(h, w2))
        return conv(h, w3)
    return model_fn


def timed(fn, *args, repeats=3):
    """Best wall time of fn(*args) over repeats (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=256)
    args = parser.parse_args()

    shape = (args.batch, args.res, args.res, args.channels)
    model_fn = make_model(jax.random.PRNGKey(0), args.channels, args.width)
    logsnr_fn = schedules.get_logsnr_fn("cosine")
    noise = jax.random.normal(jax.random.PRNGKey(1), shape)
    print(f"device: {jax.devices()[0].device_kind}  shape: {shape}  steps: {args.steps}")

    def bare(calls_per_step):
        def run(z):
            def body(z, logsnr):
                for _ in range(calls_per_step):
                    z = model_fn(z, jnp.full((shape[0],), logsnr), None)
                return z, None
            return jax.lax.scan(body, z, jnp.linspace(-10.0, 10.0, args.steps))[0]
        return jax.jit(run)

    bare_times = {1: timed(bare(1), noise), 2: timed(bare(2), noise)}
    for name in ["ddpm", "ddim", "euler", "heun"]:
        run = jax.jit(lambda z, name=name: samplers.sample(
            model_fn, jax.random.PRNGKey(2), noise=z, sampler=name, num_steps=args.steps,
            logsnr_fn=logsnr_fn, prediction="v", eta=0.0))
        t_sample = timed(run, noise)
        # Heun makes 2N - 1 calls; the bare reference makes 2N.
        t_bare = bare_times[2 if name == "heun" else 1]
        print(f"{name:6s} sampler {1e3 * t_sample / args.steps:8.3f} ms/step   "
              f"bare model {1e3 * t_bare / args.steps:8.3f} ms/step   "
              f"overhead {1e3 * (t_sample - t_bare) / args.steps:+8.3f} ms/step "
              f"({100 * (t_sample / t_bare - 1):+.1f}%)")

    for name in ["ddpm", "heun"]:
        for steps in (8, 512):
            fn = lambda z, name=name, steps=steps: samplers.sample(
                model_fn, jax.random.PRNGKey(2), noise=z, sampler=name, num_steps=steps,
                logsnr_fn=logsnr_fn, prediction="v")
            start = time.perf_counter()
            jax.jit(fn).lower(noise).compile()
            print(f"compile {name:5s} {steps:4d} steps: {time.perf_counter() - start:6.2f} s")


if __name__ == "__main__":
    main()
