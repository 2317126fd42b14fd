"""The XLA:CPU options (simple_diffusion/xla_cpu.py) take effect and change no result."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import eval_without_process_flags  # pylint: disable=g-bad-import-order
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion import xla_cpu
from simple_diffusion.bench import train as train_lib

REPO = pathlib.Path(__file__).resolve().parent.parent

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


@pytest.mark.parametrize("flags,expected", [
    ("", "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion=true"),
    ("--xla_force_host_platform_device_count=8",
     "--xla_force_host_platform_device_count=8 "
     "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion=true"),
    ("--xla_backend_extra_options=a=1 --xla_dump_to=/tmp/d",
     "--xla_backend_extra_options=a=1,xla_cpu_use_multi_output_fusion=true "
     "--xla_dump_to=/tmp/d"),
    # A key already there is left as it is.
    ("--xla_backend_extra_options=xla_cpu_use_multi_output_fusion",
     "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"),
])
def test_process_flags_merge_into_the_users_xla_flags(flags, expected):
    assert xla_cpu.xla_flags_with_process_options(flags) == expected


def test_process_flags_are_refused_once_the_backends_run_or_when_opted_out():
    jnp.zeros(1).block_until_ready()
    for environ in ({"XLA_FLAGS": "--xla_dump_to=/tmp/d"},
                    {xla_cpu.OPT_OUT: "1", "XLA_FLAGS": "--xla_dump_to=/tmp/d"}):
        before = dict(environ)
        assert not xla_cpu.set_process_flags(environ)
        assert environ == before
    # Already set (this process's conftest did it): nothing to change, and no warning.
    environ = dict(os.environ)
    assert xla_cpu.set_process_flags(environ) and environ == dict(os.environ)


def optimizer_step_probe() -> dict:
    """Compiles the trainer's optimizer step (clip + AdamW + EMA + the non-finite guard,
    `train_step.apply_gradients`) with its state donated, as the train step does; returns
    the compiled program's state copies and multi-output fusions and two steps' state."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
             "ema": [jax.tree.map(jnp.copy, params)], "nonfinite_step": jnp.int32(-1)}
    x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)

    def step(state, x):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2))(state["params"])
        return train_step_lib.apply_gradients(state, grads, loss, tx, (0.9,))[0]

    compiled = jax.jit(step, donate_argnums=0).lower(state, x).compile()
    hlo = compiled.as_text()
    for _ in range(2):
        state = compiled(state, x)
    return {"copies": len(re.findall(r"= \S+ copy\(%", hlo)),
            "multi_output_fusions": len(re.findall(r"= \([^)]*\) fusion\(", hlo)),
            "state": [np.asarray(a).tolist() for a in jax.tree.leaves(state)]}


def test_multi_output_fusion_stops_the_optimizer_step_copying_its_state():
    """conftest set the process flags, as the command lines do: the optimizer step fuses
    the siblings that read each state leaf and copies (almost) nothing. A process that
    opted out copies every leaf before updating it in place, and computes the same state
    within float rounding."""
    ours = optimizer_step_probe()
    off = eval_without_process_flags("test_xla_cpu", "test_xla_cpu.optimizer_step_probe()")
    assert ours["multi_output_fusions"] > 0 and off["multi_output_fusions"] == 0
    # params, mu, nu and the EMA of two leaves are copied without the option.
    assert off["copies"] >= 8 and ours["copies"] <= 1
    for a, b in zip(ours["state"], off["state"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_command_lines_set_the_process_flags_before_jax_starts():
    """`cli_start.prepare_process()`, which every command line calls first, leaves the
    option in XLA_FLAGS (GLIBC_TUNABLES set, so the process is not restarted)."""
    env = {k: v for k, v in os.environ.items() if k != xla_cpu.OPT_OUT}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2",
               GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    code = ("import os; from simple_diffusion import cli_start; cli_start.prepare_process(); "
            "import jax; jax.devices(); print(os.environ['XLA_FLAGS'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True)
    assert out.stdout.split("\n")[-2] == ("--xla_force_host_platform_device_count=2 "
                                          "--xla_backend_extra_options="
                                          "xla_cpu_use_multi_output_fusion=true")
    assert "already running" not in out.stderr
