"""The XLA:CPU compile options (simple_diffusion/xla_cpu.py) take effect and change no result."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion import xla_cpu
from simple_diffusion.bench import train as train_lib

# The options exist for the CPU backend only; elsewhere compiler_options() is None and the
# programs compile with JAX's defaults, so there is nothing to check (the suite runs on CPU).
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="XLA:CPU compile options; not used on other backends")


def _ops_in_ynn_fusions(hlo: str) -> set[str]:
    """HLO opcodes inside the computations that YNNPACK fusions of compiled `hlo` call."""
    called = set(re.findall(r"calls=%([\w.-]+)[^\n]*__ynn_fusion", hlo))
    ops = set()
    for body in re.split(r"\n(?=%|ENTRY)", hlo):
        name = re.match(r"%?([\w.-]+)", body)
        if name and name.group(1) in called:
            ops.update(re.findall(r"= \S+ ([a-z-]+)\(", body))
    return ops


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_options_move_convolutions_off_ynnpack_and_keep_dots_on_it():
    """With the options no convolution of a conv's value-and-grad is in a YNNPACK fusion
    (they are Eigen's multi-threaded ones) and a dot still is; without them the
    convolutions are YNNPACK's. Values and gradients agree within float tolerance."""
    options = xla_cpu.compiler_options()
    assert options == {"xla_cpu_experimental_ynn_fusion_type":
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)) * 0.1, jnp.float32)

    def f(x, w):
        return jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(_conv(x, w))),
                                  argnums=(0, 1))(x, w)

    default = jax.jit(f).lower(x, w).compile()
    ours = jax.jit(f, compiler_options=options).lower(x, w).compile()
    assert "convolution" in _ops_in_ynn_fusions(default.as_text())
    assert "convolution" not in _ops_in_ynn_fusions(ours.as_text())
    assert "convolution" in ours.as_text()
    dot = jax.jit(lambda a: a @ a, compiler_options=options).lower(w[0, 0]).compile()
    assert "dot" in _ops_in_ynn_fusions(dot.as_text())
    for a, b in zip(jax.tree.leaves(default(x, w)), jax.tree.leaves(ours(x, w))):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


def test_train_step_with_and_without_options_agree(tiny_config, monkeypatch):
    """Two steps of the trainer's jitted step (the tiny U-ViT) give the same losses and
    parameters with the CPU options as with XLA's defaults, within float tolerance."""
    config = tiny_config
    mesh, model, tx = train_lib.setup(config)
    _, shardings = train_step_lib.state_shardings(model, tx, config, mesh)
    batch = train_lib.synthetic_batch(config, sharding_lib.batch_sharding(mesh))
    results = []
    for options in (xla_cpu.compiler_options(), None):
        monkeypatch.setattr(xla_cpu, "compiler_options", lambda options=options: options)
        step = train_step_lib.jit_train_step(model, tx, config, mesh, shardings)
        state = train_step_lib.create_sharded_state(model, tx, config, shardings)
        losses = []
        for _ in range(2):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state["params"])))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
