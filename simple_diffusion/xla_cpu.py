"""XLA:CPU compile options for this project's jitted train steps, samplers and feature nets.

jaxlib 0.10's XLA:CPU hands dots, convolutions and reductions to YNNPACK. Its convolutions
run on one thread: a 3x3 conv (batch 8, 64x64, 64 -> 64 channels) took as long on one
core as on two, while Eigen's, which XLA used before, uses both and ran it about 1.7x
faster, value-and-grad 2x (docs/benchmarks.md, "Results: CPU train step"). So on CPU the
steps are compiled with YNNPACK kept for dots and reductions and convolutions back on
Eigen. GPUs and TPUs get no options: they compile as JAX does by default.

Per-program compiler options, not XLA_FLAGS: nothing global changes, a user's own
XLA_FLAGS still apply to everything else, and a jaxlib that no longer knows the option
gets none (with a warning) instead of a failed compile.
"""

import functools
import logging

import jax
import numpy as np

# Fusion types of `xla_cpu_experimental_ynn_fusion_type` kept: jaxlib 0.10.2's default
# less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_REDUCE")


@functools.cache
def _cpu_options() -> dict[str, str] | None:
    options = {"xla_cpu_experimental_ynn_fusion_type": ",".join(YNN_FUSION_TYPES)}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(
            np.zeros((1,), np.float32)).compile()
    except Exception as e:  # pylint: disable=broad-except
        logging.warning("XLA:CPU rejected %s (%s); compiling with its defaults, where "
                        "convolutions run on one thread.", options, e)
        return None
    return options


def compiler_options() -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` for a program run on the default backend:
    the options above on CPU, None elsewhere."""
    if jax.default_backend() != "cpu":
        return None
    return _cpu_options()
