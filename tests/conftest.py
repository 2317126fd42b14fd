"""Test setup: 8 simulated CPU devices and the CLIs' XLA flags, set before JAX initialises."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# Keep TensorFlow (used by TFDS / clu writers) quiet and off any accelerator.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from simple_diffusion import xla_cpu

# The process-wide XLA:CPU option the command lines set (multi-output fusion), so tests
# compile what users run; subprocesses inherit it through XLA_FLAGS.
xla_cpu.set_process_flags()

REPO = pathlib.Path(__file__).resolve().parent.parent


def eval_without_process_flags(module: str, expression: str):
    """`expression` (a Python literal once evaluated) computed in a fresh process that opted
    out of the process flags (xla_cpu.OPT_OUT), after importing conftest and `tests/<module>`.

    For tests that compare what XLA:CPU does with and without them: the flags are read once
    per process, so "without" needs its own process.
    """
    env = dict(os.environ, XLA_FLAGS="", **{xla_cpu.OPT_OUT: "1"})
    code = (f"import sys; sys.path.insert(0, 'tests'); import conftest, {module}; "
            f"print(repr({expression}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return ast.literal_eval(out.splitlines()[-1])


def load_config(name: str):
    """Loads configs/<name>.py's get_config() (unlocked, a fresh copy)."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """A TFDS data_dir shared by the tests; Fashion-MNIST is prepared on first use."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, fashion_mnist_dir):
    """configs/tiny.py trained 20 steps in one go (checkpoints at 10 and 20).

    Returns (workdir, summary). Tests must not modify the workdir: copy it.
    """
    from simple_diffusion import train  # pylint: disable=g-import-not-at-top
    config = load_config("tiny")
    config.data.data_dir = fashion_mnist_dir
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    return workdir, train.train_and_evaluate(config, workdir)


@pytest.fixture
def tiny_config(fashion_mnist_dir):
    """configs/tiny.py reading Fashion-MNIST from the session data_dir."""
    config = load_config("tiny")
    config.data.data_dir = fashion_mnist_dir
    return config

# Tests build the same tiny programs many times (one trainer per test, and
# subprocesses); a persistent compilation cache makes every compile after the
# first a cache hit. Subprocesses inherit it through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

# Evaluations of Fashion-MNIST recipes score samples with a cached classifier
# (evaluation/classifier.py): tests never read or write the user's cache, so a
# test that needs it trains it, in CI and here alike.
if "SIMPLE_DIFFUSION_CACHE" not in os.environ:
    import tempfile

    os.environ["SIMPLE_DIFFUSION_CACHE"] = tempfile.mkdtemp(prefix="simple_diffusion_cache_")


def read_checkpoint_params(workdir: str, step: int) -> list:
    """The raw params of checkpoint ``step`` as a list of NumPy arrays (any layout)."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta["params"])
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item={"params": meta["params"]}, restore_args={"params": args},
            partial_restore=True))
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]
