"""The trainer end to end on the tiny config (8 simulated CPU devices)."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from simple_diffusion import checkpointing
from simple_diffusion import config_validation
from simple_diffusion import models
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import schedules
from simple_diffusion import sharding
from simple_diffusion import train
from simple_diffusion import train_step as train_step_lib

from conftest import read_checkpoint_params  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parent.parent


def _one_step(config, mesh):
    """Initialises the state on ``mesh`` and takes one step on a fixed batch."""
    model = models.create_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
    lr = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
    _, state_sh = train_step_lib.state_shardings(model, tx, config, mesh)
    state = train_step_lib.create_sharded_state(model, tx, config, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    rs = np.random.RandomState(0)
    size = config.model.image_size
    batch = {
        "image": rs.uniform(-1, 1, (config.batch_size, size, size, 1)).astype(np.float32),
        "label": rs.randint(0, 10, (config.batch_size,)).astype(np.int32),
    }
    batch = jax.device_put(batch, batch_sh)
    step = jax.jit(train_step_lib.make_train_step(
        model, tx, config, schedules.from_config(config.schedule), lr, batch_sh),
        in_shardings=(state_sh, batch_sh), donate_argnums=(0,))
    init_params = jax.device_get(state["params"])
    new_state, metrics = step(state, batch)
    return init_params, jax.device_get(new_state["params"]), jax.device_get(metrics)


def test_one_step_agrees_on_1_device_data_parallel_and_fsdp(tiny_config):
    config = tiny_config
    config.optimizer.warmup_steps = 0  # Full learning rate at step 0.
    # Adam's first step is lr * sign(g) for |g| >> eps, which turns float noise
    # in near-zero gradients into lr-sized differences; a large eps makes the
    # update ~ lr * g, so parameters compare like gradients.
    config.optimizer.eps = 1.0
    init, ref_params, ref_metrics = _one_step(
        config, sharding.create_mesh(1, 1, jax.devices()[:1]))
    # The step really updated parameters (layers feeding zero-initialised
    # residual outputs get zero gradient at step 0, so not all of them).
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init),
                                                      jax.tree.leaves(ref_params))]
    assert sum(moved) >= 10, sum(moved)
    for data, fsdp in [(8, 1), (2, 4)]:
        _, params, metrics = _one_step(config, sharding.create_mesh(data, fsdp))
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _params(workdir, step):
    return read_checkpoint_params(str(workdir), step)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def test_tiny_run_writes_checkpoints_samples_and_events(tiny_run):
    workdir, summary = tiny_run
    assert summary["step"] == 20 and not summary["preempted"]
    assert np.isfinite(summary["metrics"]["loss"])
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                  if s.isdigit()) == [10, 20]
    assert os.path.exists(os.path.join(workdir, "config.json"))
    pngs = os.listdir(os.path.join(workdir, "samples"))
    assert pngs == ["step_00000020.png"]
    # TensorBoard's own reader sees the scalars and the sample image.
    events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
    assert events
    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalar_tags = set(tags["tensors"]) | set(tags["scalars"])
    for tag in ("loss", "grad_norm", "learning_rate", "examples_per_sec"):
        assert tag in scalar_tags, scalar_tags
    loss_steps = [e.step for e in (acc.Tensors("loss") if "loss" in tags["tensors"]
                                   else acc.Scalars("loss"))]
    assert loss_steps == [5, 10, 15, 20]
    assert "samples" in set(tags["images"]) | set(tags["tensors"])


def test_resume_reproduces_the_tiny_run_bitwise(tiny_run, tiny_config, tmp_path):
    workdir, _ = tiny_run
    config = tiny_config
    config.num_train_steps = 10
    # A constant learning rate does not depend on num_train_steps, so stopping
    # at 10 and continuing to 20 is the same run as 20 straight.
    assert config.optimizer.schedule == "constant"
    resumed = str(tmp_path / "resumed")
    assert train.train_and_evaluate(config, resumed)["step"] == 10
    config.num_train_steps = 20
    assert train.train_and_evaluate(config, resumed)["step"] == 20
    _assert_trees_equal(_params(resumed, 20), _params(workdir, 20))
    _assert_trees_equal(_params(resumed, 10), _params(workdir, 10))


def test_corrupt_latest_checkpoint_falls_back_and_is_kept_aside(tiny_run, tiny_config,
                                                                tmp_path):
    src, _ = tiny_run
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(src, workdir)
    state_dir = pathlib.Path(workdir, "checkpoints", "20", "state")
    # Truncate every data file of the newest checkpoint.
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
            f.write_bytes(b"")
    summary = train.train_and_evaluate(tiny_config, workdir)
    assert summary["step"] == 20
    assert os.path.isdir(os.path.join(workdir, "checkpoints_corrupt", "20"))
    _assert_trees_equal(_params(workdir, 20), _params(src, 20))


def test_incompatible_checkpoint_is_refused_with_a_clear_message(tiny_run, tiny_config,
                                                                 tmp_path):
    src, _ = tiny_run
    workdir = str(tmp_path / "incompatible")
    shutil.copytree(src, workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    config = tiny_config
    config.num_train_steps = 30
    config.ema_decays = (0.99,)  # One EMA copy instead of two: a different state.
    with pytest.raises(checkpointing.IncompatibleCheckpointError,
                       match="does not match the current config"):
        train.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_restore_onto_a_different_mesh(tiny_run, tiny_config, tmp_path):
    src, _ = tiny_run
    workdir = str(tmp_path / "remesh")
    shutil.copytree(src, workdir)
    config = tiny_config
    config.mesh.data, config.mesh.fsdp = 2, 4
    config.num_train_steps = 20  # Already done: restore only, no step taken.
    summary = train.train_and_evaluate(config, workdir)
    assert summary["step"] == 20
    _assert_trees_equal(_params(workdir, 20), _params(src, 20))


def test_resuming_past_num_train_steps_says_so(tiny_run, tiny_config, tmp_path, caplog):
    src, _ = tiny_run
    workdir = str(tmp_path / "done")
    shutil.copytree(src, workdir)
    def files():  # A TensorBoard writer is opened (an events file) before the restore.
        return sorted(f for f in os.listdir(workdir) if not f.startswith("events.out"))
    before = files()
    caplog.set_level("WARNING")
    for num_train_steps in (10, 20):  # Below and equal to the saved step 20.
        caplog.clear()
        tiny_config.num_train_steps = num_train_steps
        summary = train.train_and_evaluate(tiny_config, workdir)
        assert summary["step"] == 20 and not summary["preempted"]
        [message] = [r.getMessage() for r in caplog.records if "Nothing to train" in r.getMessage()]
        assert "step 20" in message and f"num_train_steps={num_train_steps}" in message
        assert "--config.num_train_steps" in message
    # Nothing written: no new checkpoint, sample or config.
    assert files() == before
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == sorted(
        os.listdir(os.path.join(src, "checkpoints")))


def test_nonfinite_loss_stops_with_step_and_writes_no_checkpoint(tiny_config, tmp_path):
    config = tiny_config
    config.optimizer.learning_rate = 1e35
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_clip_norm = 0.0
    workdir = str(tmp_path / "nan")
    with pytest.raises(train.NonFiniteLossError, match=r"Non-finite loss or gradient at step \d+"):
        train.train_and_evaluate(config, workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    assert not [s for s in os.listdir(ckpt_dir) if s.isdigit()] if os.path.isdir(ckpt_dir) else True


def test_check_finite_names_the_step_the_player_and_the_fix():
    """The one check every trainer (diffusion, distillation, autoencoder, GAN) calls."""
    from simple_diffusion import train_step  # pylint: disable=g-import-not-at-top
    state = {"nonfinite_step": jnp.int32(-1), "d_nonfinite_step": jnp.int32(7)}
    train_step.check_finite(state, "unused")  # -1: no skipped update, no error.
    with pytest.raises(train.NonFiniteLossError,
                       match=r"Non-finite discriminator loss or gradient at step 7 .*Lower it"):
        train_step.check_finite(state, "Lower it.", key="d_nonfinite_step",
                                what="discriminator loss or gradient")


def test_bad_batch_size_fails_before_any_work(tiny_config, tmp_path):
    config = tiny_config
    config.batch_size = 12  # Not a multiple of the 8 devices.
    workdir = tmp_path / "bad"
    with pytest.raises(config_validation.ConfigError, match="per device 1.50"):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_sigterm_saves_and_resume_matches_tiny_run(tiny_run, fashion_mnist_dir, tmp_path):
    """A real process gets SIGTERM mid-run, checkpoints, exits 0; the resumed
    run ends with the same parameters as the uninterrupted one."""
    src, _ = tiny_run
    workdir = tmp_path / "preempted"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    # A relative --workdir (run from tmp_path), as users type it.
    cmd = [sys.executable, "-m", "simple_diffusion.main", f"--config={REPO}/configs/tiny.py",
           "--workdir=preempted", f"--config.data.data_dir={fashion_mnist_dir}",
           "--config.num_train_steps=20", "--config.sample.every_steps=0"]
    proc = subprocess.Popen(cmd + ["--config.checkpoint_every_steps=1000"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Wait until training is under way (the first log line at step 5), then preempt.
    deadline = time.time() + 240
    events = []
    while time.time() < deadline and proc.poll() is None:
        events = [f for f in os.listdir(workdir)] if workdir.exists() else []
        if any(f.startswith("events.out") for f in events) and _logged_step(workdir) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and 5 <= steps[0] < 20, (steps, out[-2000:])
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_trees_equal(_params(str(workdir), 20), _params(src, 20))


def _logged_step(workdir) -> int:
    try:
        acc = event_accumulator.EventAccumulator(str(workdir))
        acc.Reload()
        tags = acc.Tags()
        if "loss" in tags["tensors"]:
            return max(e.step for e in acc.Tensors("loss"))
        if "loss" in tags["scalars"]:
            return max(e.step for e in acc.Scalars("loss"))
    except Exception:  # pylint: disable=broad-except  # File still being written.
        pass
    return -1
