"""FLOPs per forward pass of every model preset, and CPU forward time of the small ones.

Run: .venv/bin/python benchmarks/model_flops.py [--presets tiny,demo] [--batch 1]

FLOPs come from XLA's compiled cost analysis of the jitted forward at the preset's
resolution, with jax.ShapeDtypeStruct inputs and parameters, so the ~2B-parameter models
are compiled but never allocated. XLA's cost analysis counts a while-loop body once, not
once per iteration, so FLOPs are taken from the unrolled transformer stack
(scan_layers=False); the last line of the output shows the undercount of the scanned stack.
Forward time is measured on this machine for presets with fewer than 10M parameters.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simple_diffusion import models
from simple_diffusion.models import presets

_TIMED_MAX_PARAMS = 10_000_000


def _forward(config):
    model = models.create_model(config)
    return jax.jit(lambda p, z, l, y: model.apply({"params": p}, z, l, y, train=False))


def _abstract_inputs(config, batch):
    size, ch = config.image_size, config.in_channels
    return (jax.ShapeDtypeStruct((batch, size, size, ch), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32))


def forward_flops(config, batch: int = 1) -> float:
    """FLOPs of one forward pass of `config` as given (XLA cost analysis, CPU executable)."""
    params = nn.unbox(presets.abstract_variables(config, batch)["params"])
    compiled = _forward(config).lower(params, *_abstract_inputs(config, batch)).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per device
        analysis = analysis[0]
    return float(analysis["flops"])


def forward_seconds(config, batch: int = 1, repeats: int = 20) -> float:
    """Median wall time of one jitted forward pass on the default device."""
    abstract = nn.unbox(presets.abstract_variables(config, batch)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), abstract)
    size, ch = config.image_size, config.in_channels
    z = jnp.asarray(rng.normal(size=(batch, size, size, ch)), jnp.float32)
    logsnr = jnp.zeros((batch,), jnp.float32)
    labels = jnp.zeros((batch,), jnp.int32)
    fn = _forward(config)
    fn(params, z, logsnr, labels).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(params, z, logsnr, labels).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(presets.preset_names()))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, batch {args.batch}")
    print("| preset | model | resolution | params | GFLOPs / forward | CPU forward (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.presets.split(","):
        config = presets.get_preset(name)
        n_params = presets.count_params(config)
        timed = (f"{1e3 * forward_seconds(config, args.batch):.2f}"
                 if n_params < _TIMED_MAX_PARAMS else "-")
        if config.name == "uvit":
            config.scan_layers = False  # see the module docstring
        gflops = forward_flops(config, args.batch) / 1e9
        print(f"| {name} | {config.name} | {config.image_size} | {n_params / 1e6:,.2f}M | "
              f"{gflops:,.4f} | {timed} |", flush=True)

    config = presets.get_preset("tiny")
    unrolled = forward_flops(config)
    config.scan_layers = True
    print(f"tiny: unrolled stack {unrolled / 1e6:.3f} MFLOPs; scanned stack as counted by XLA "
          f"{forward_flops(config) / 1e6:.3f} MFLOPs (loop body counted once)")


if __name__ == "__main__":
    main()
