"""Real multi-process training on localhost: 2 processes x 4 CPU devices.

The 2-process run must equal the 1-process run on 8 devices (same global batch
and data order), and checkpoints must move between the two layouts both ways.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np

from conftest import read_checkpoint_params  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir, data_dir, num_processes: int, steps: int, timeout: int = 420) -> None:
    """Runs the tiny config to ``steps`` with 8 devices in total."""
    devices = 8 // num_processes
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "simple_diffusion.main", f"--config={REPO}/configs/tiny.py",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           f"--config.num_train_steps={steps}", "--config.sample.every_steps=0",
           "--config.checkpoint_every_steps=5",
           # Adam turns float noise in near-zero gradients into lr-sized steps
           # (lr * sign(g)); a large eps keeps updates ~ lr * g, so the two
           # layouts can be compared at float32 tolerance.
           "--config.optimizer.eps=1.0"]
    if num_processes > 1:
        port = _free_port()
        cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}"]
    procs = [subprocess.Popen(cmd + ([f"--process_id={i}"] if num_processes > 1 else []),
                              env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outs = []
    try:
        for p in procs:
            try:
                outs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack.
                outs.append(p.communicate(timeout=60)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # Every process's output on failure: when one process aborts because another
    # hung, the hung one's output (its stacks, from faulthandler) says where.
    failed = [f"process {i} exited {p.returncode}:\n{out[-6000:]}"
              for i, (p, out) in enumerate(zip(procs, outs)) if p.returncode != 0]
    assert not failed, "\n\n".join(failed)


def _params(workdir, step):
    return read_checkpoint_params(str(workdir), step)


def _assert_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


def _copy_until(src, dst, step):
    """A copy of workdir ``src`` holding only its checkpoints up to ``step``."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst / "checkpoints"):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(dst / "checkpoints" / name)


def test_two_processes_match_one_and_checkpoints_cross_layouts(tmp_path, fashion_mnist_dir):
    # One process trains 0 -> 15 (checkpoints 5, 10, 15): the reference. Two processes
    # train 0 -> 10 from scratch and must land on it; then each layout resumes the
    # other's step 10 (2 -> 1 and 1 -> 2) to 15 and must land on it again.
    one, two = tmp_path / "one", tmp_path / "two"
    _train(one, fashion_mnist_dir, num_processes=1, steps=15)
    _train(two, fashion_mnist_dir, num_processes=2, steps=10)
    # Only process 0 writes the config and TensorBoard events.
    assert (two / "config.json").exists()
    assert len([f for f in os.listdir(two) if f.startswith("events.out")]) == 1
    _assert_close(_params(two, 10), _params(one, 10))
    for src, dst, processes in [(two, tmp_path / "two_to_one", 1),
                                (one, tmp_path / "one_to_two", 2)]:
        _copy_until(src, dst, 10)
        _train(dst, fashion_mnist_dir, num_processes=processes, steps=15)
        _assert_close(_params(dst, 15), _params(one, 15))
        # The continuation really trained: step 15 differs from the step 10 it resumed.
        assert any(not np.array_equal(x, y) for x, y in zip(_params(dst, 15), _params(src, 10)))
