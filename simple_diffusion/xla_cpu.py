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

One option cannot be passed per program: XLA:CPU's multi-output fusion, a key of
`DebugOptions.xla_backend_extra_options`, a map that `compiler_options` cannot set. Without
it, every state leaf of the train step (parameters, Adam's mu and nu, the EMA) is copied
each step: the donated buffer is updated in place by one fusion while sibling fusions
(the parameter update, the EMA) still read the old value, so XLA copies it first. That is
60 ms of the 690 ms step of configs/cpu_reference.py:128 (744 copies); with the option,
the siblings become one fusion with several outputs and 2 copies remain. The command lines
therefore call `set_process_flags()` before JAX starts (`cli_start.prepare_process()`),
which adds the option to XLA_FLAGS; library users (a notebook, the tests) call it
themselves before their first computation. Results move by float rounding only (largest
parameter difference 1.2e-7 after 4 steps of that config). Only XLA:CPU reads the key (XLA's
GPU compiler passes only keys without the `xla_` prefix on to LLVM).
"""

import functools
import logging
import os
from collections.abc import MutableMapping

import jax
from jax._src import xla_bridge
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


# `--xla_backend_extra_options` keys set for the whole process (see the module docstring).
PROCESS_BACKEND_OPTIONS = {"xla_cpu_use_multi_output_fusion": "true"}
# SIMPLE_DIFFUSION_DEFAULT_XLA_FLAGS=1 in the environment: set_process_flags() does nothing.
OPT_OUT = "SIMPLE_DIFFUSION_DEFAULT_XLA_FLAGS"
_EXTRA_OPTIONS_FLAG = "--xla_backend_extra_options="


def xla_flags_with_process_options(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS value) with PROCESS_BACKEND_OPTIONS merged in.

    The options join the last `--xla_backend_extra_options=` flag, or a new one; a key
    already there is left as it is. XLA:CPU tests these keys for presence, not value
    (`xla_cpu_use_multi_output_fusion=false` turns it on too): the way to leave the
    option out is OPT_OUT, not a value here.
    """
    tokens = xla_flags.split()
    index = max((i for i, t in enumerate(tokens) if t.startswith(_EXTRA_OPTIONS_FLAG)),
                default=None)
    current = tokens[index][len(_EXTRA_OPTIONS_FLAG):] if index is not None else ""
    entries = [e for e in current.split(",") if e]
    keys = {e.split("=", 1)[0] for e in entries}
    entries += [f"{k}={v}" for k, v in PROCESS_BACKEND_OPTIONS.items() if k not in keys]
    flag = _EXTRA_OPTIONS_FLAG + ",".join(entries)
    if index is None:
        tokens.append(flag)
    else:
        tokens[index] = flag
    return " ".join(tokens)


def set_process_flags(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Adds PROCESS_BACKEND_OPTIONS to XLA_FLAGS if JAX has not started its backends.

    XLA reads XLA_FLAGS once, when JAX first starts a backend; call this before the
    first computation. Returns whether the flags are set: True when they already were,
    False when OPT_OUT=1 or (with a warning) when the backends are already running and
    the flags would have no effect.
    """
    if environ.get(OPT_OUT) == "1":
        return False
    flags = xla_flags_with_process_options(environ.get("XLA_FLAGS", ""))
    if flags == environ.get("XLA_FLAGS"):
        return True  # Already there (set by a parent process, or by an earlier call).
    if xla_bridge.backends_are_initialized():
        logging.warning("JAX's backends are already running, so XLA_FLAGS can no longer "
                        "change; the train step will copy its state each step on CPU. Call "
                        "simple_diffusion.xla_cpu.set_process_flags() before the first "
                        "computation.")
        return False
    environ["XLA_FLAGS"] = flags
    return True
