"""DCGAN: losses against hand-computed values, the two update steps, EMA, resume, ratio.

Runs on 8 simulated CPU devices with an 8x8 DCGAN on a 2-class folder of 8x8 PNGs
written here (no dataset preparation).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from simple_diffusion import config_validation
from simple_diffusion import gan
from simple_diffusion import gan_train
from simple_diffusion import sampling
from simple_diffusion import sharding

from conftest import load_config  # pylint: disable=g-bad-import-order

# One xdist worker runs this module (pytest.ini: --dist loadgroup), so its
# module-scoped fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("gan")

REPO = pathlib.Path(__file__).resolve().parent.parent


# --- Losses (float64 NumPy by hand) ----------------------------------------

REAL = np.array([2.0, -0.5, 0.0, 1.5])
FAKE = np.array([-1.0, 0.3, 2.0, -3.0])


def _softplus(x):
    return np.log1p(np.exp(x))


def test_non_saturating_losses_match_hand_computed_values():
    # L_D = mean(-log sigmoid(l_real)) + mean(-log(1 - sigmoid(l_fake))).
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    want_d = np.mean(-np.log(sig(REAL))) + np.mean(-np.log(1.0 - sig(FAKE)))
    want_g = np.mean(-np.log(sig(FAKE)))
    np.testing.assert_allclose(want_d, np.mean(_softplus(-REAL)) + np.mean(_softplus(FAKE)))
    got_d = gan.discriminator_loss(jnp.asarray(REAL), jnp.asarray(FAKE), "non_saturating")
    got_g = gan.generator_loss(jnp.asarray(FAKE), "non_saturating")
    np.testing.assert_allclose(float(got_d), want_d, rtol=1e-6)
    np.testing.assert_allclose(float(got_g), want_g, rtol=1e-6)
    # Pinned numbers: a sign error anywhere changes them.
    np.testing.assert_allclose(float(got_d), 1.3346744, rtol=1e-6)
    np.testing.assert_allclose(float(got_g), 1.2607831, rtol=1e-6)


def test_hinge_losses_match_hand_computed_values():
    # relu(1 - real) = [0, 1.5, 1, 0] -> 0.625; relu(1 + fake) = [0, 1.3, 3, 0] -> 1.075.
    got_d = gan.discriminator_loss(jnp.asarray(REAL), jnp.asarray(FAKE), "hinge")
    np.testing.assert_allclose(float(got_d), 0.625 + 1.075, rtol=1e-6)
    np.testing.assert_allclose(float(gan.generator_loss(jnp.asarray(FAKE), "hinge")),
                               -np.mean(FAKE), rtol=1e-6)
    # Accuracy: real > 0 for 2 of 4, fake < 0 for 2 of 4.
    np.testing.assert_allclose(float(gan.discriminator_accuracy(jnp.asarray(REAL),
                                                                jnp.asarray(FAKE))), 0.5)
    with pytest.raises(ValueError, match="wasserstein"):
        gan.generator_loss(jnp.asarray(FAKE), "wasserstein")


def test_r1_penalty_is_the_mean_squared_input_gradient():
    rs = np.random.RandomState(0)
    w = rs.normal(size=(3, 2, 2, 1))
    x = rs.normal(size=(4, 2, 2, 1))
    # l(x) = <w_c, x> + 0.5 ||x||^2 with a class-dependent w: grad = w_c + x.
    c = np.array([0, 2, 1, 2])

    def logits(images):
        flat = images.reshape(4, -1)
        return jnp.sum(jnp.asarray(w[c]).reshape(4, -1) * flat, axis=1) + 0.5 * jnp.sum(
            flat ** 2, axis=1)

    want = np.mean(np.sum((w[c] + x).reshape(4, -1) ** 2, axis=1))
    np.testing.assert_allclose(float(gan.r1_penalty(logits, jnp.asarray(x, jnp.float32))),
                               want, rtol=1e-5)


# --- A tiny GAN on 8 devices -------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 8x8 grayscale PNGs (bright squares / dark bars)."""
    root = tmp_path_factory.mktemp("gan_images")
    rs = np.random.RandomState(0)
    for label in range(2):
        os.makedirs(root / f"class_{label}")
        for i in range(24):
            image = rs.randint(0, 60, (8, 8)).astype(np.uint8)
            if label == 0:
                image[2:6, 2:6] = 230
            else:
                image[:, 3:5] = 200
            Image.fromarray(image).save(root / f"class_{label}" / f"{i:03d}.png")
    return str(root)


def tiny_gan_config(folder: str):
    c = load_config("dcgan_fashion_mnist")
    c.model.update(image_size=8, num_classes=2, latent_dim=8, g_channels=(16,),
                   d_channels=(8,))
    c.data.source, c.data.folder = "folder", folder
    c.batch_size = 8
    c.num_train_steps = 4
    c.ema_decays = (0.9,)
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.keep_checkpoints = 5
    c.sample.every_steps = 0
    c.sample.num_images = 8
    c.eval.every_steps = 0
    c.async_checkpoints = False
    return c


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


def _assert_all_changed(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert not np.array_equal(x, y), what


@pytest.fixture(scope="module")
def tiny_gan(image_folder):
    """(config, mesh, models, optimizers, shardings, jitted d_step, g_step)."""
    c = tiny_gan_config(image_folder)
    mesh = sharding.create_mesh(-1, 1)
    g, d = gan_train.create_models(c)
    g_tx, d_tx = gan_train.create_optimizers(c)
    _, sh = gan_train.state_shardings(g, d, g_tx, d_tx, c, mesh)
    d_step, g_step = gan_train.jit_steps(g, d, g_tx, d_tx, c, mesh, sh)
    return c, mesh, (g, d, g_tx, d_tx), sh, d_step, g_step


G_KEYS = ("params", "opt_state", "ema", "step", "nonfinite_step")
D_KEYS = ("d_params", "d_opt_state", "d_step", "d_nonfinite_step")


def test_each_step_changes_only_its_players_state_and_ema_is_closed_form(tiny_gan):
    c, mesh, parts, sh, d_step, g_step = tiny_gan
    state = gan_train.create_sharded_state(*parts, c, sh)
    rs = np.random.RandomState(1)
    batch = jax.device_put({
        "image": rs.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
        "label": rs.randint(0, 2, (8,)).astype(np.int32)}, sharding.batch_sharding(mesh))
    before = _host(state)
    assert set(before) == set(G_KEYS) | set(D_KEYS)

    state, metrics = d_step(state, batch)
    after_d = _host(state)
    _assert_equal([before[k] for k in G_KEYS], [after_d[k] for k in G_KEYS])
    _assert_all_changed(before["d_params"], after_d["d_params"], "a D weight did not move")
    assert int(after_d["d_step"]) == 1 and int(after_d["step"]) == 0
    assert np.isfinite(float(metrics["d_loss"])) and 0.0 <= float(metrics["d_accuracy"]) <= 1.0

    decay = c.ema_decays[0]
    previous = after_d
    for n in range(2):  # G updates n = 0, 1: EMA decay min(0.9, (1 + n) / (10 + n)).
        state, metrics = g_step(state)
        now = _host(state)
        _assert_equal([previous[k] for k in D_KEYS], [now[k] for k in D_KEYS])
        _assert_all_changed(previous["params"], now["params"], "a G weight did not move")
        assert int(now["step"]) == n + 1 and int(now["d_step"]) == 1
        d = min(decay, (1.0 + n) / (10.0 + n))
        want = jax.tree.map(lambda e, p: d * e.astype(np.float64) + (1 - d) * p.astype(
            np.float64), previous["ema"][0], now["params"])
        for x, y in zip(jax.tree.leaves(now["ema"][0]), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        assert not np.allclose(jax.tree.leaves(now["ema"][0])[0],
                               jax.tree.leaves(now["params"])[0])
        previous = now
    assert np.isfinite(float(metrics["g_loss"]))


def _checkpoint_state(workdir, step):
    """Every array of checkpoint ``step`` as NumPy, keyed by path."""
    path = pathlib.Path(workdir, "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=meta, restore_args=args))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def _adam_counts(arrays, prefix):
    return {k: int(v) for k, v in arrays.items() if k.startswith(prefix) and "count" in k}


@pytest.fixture(scope="module")
def straight_run(image_folder, tmp_path_factory):
    """4 iterations of 2 D + 1 G updates in one go (checkpoints at 2 and 4, grids at 4)."""
    c = tiny_gan_config(image_folder)
    c.gan.d_steps_per_g_step = 2
    c.sample.every_steps = 4
    workdir = str(tmp_path_factory.mktemp("gan_straight"))
    return c, workdir, gan_train.train_and_evaluate(c, workdir)


def test_resume_is_bit_exact_and_the_update_ratio_is_honoured(straight_run, tmp_path):
    c, straight, summary = straight_run
    assert (summary["step"], summary["d_updates"], summary["g_updates"]) == (4, 8, 4)
    c = ml_collections.ConfigDict(c.to_dict())
    c.sample.every_steps = 0
    resumed = str(tmp_path / "resumed")
    c.num_train_steps = 2
    assert gan_train.train_and_evaluate(c, resumed)["step"] == 2
    c.num_train_steps = 4
    assert gan_train.train_and_evaluate(c, resumed)["step"] == 4
    for step in (2, 4):
        a, b = _checkpoint_state(straight, step), _checkpoint_state(resumed, step)
        assert a.keys() == b.keys() and len(a) > 20
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    final = _checkpoint_state(straight, 4)
    assert int(final["['d_step']"]) == 8 and int(final["['step']"]) == 4
    # The optimizers' own counters: 8 Adam updates of D, 4 of G.
    assert set(_adam_counts(final, "['d_opt_state']").values()) == {8}
    assert set(_adam_counts(final, "['opt_state']").values()) == {4}

    # And the other way round: two G updates per D update.
    c.gan.d_steps_per_g_step, c.gan.g_steps_per_d_step = 1, 2
    c.num_train_steps = 1
    summary = gan_train.train_and_evaluate(c, str(tmp_path / "g2"))
    assert (summary["d_updates"], summary["g_updates"]) == (1, 2)


def test_sample_cli_and_load_generator_give_the_raw_and_the_ema_generator(straight_run,
                                                                            tmp_path):
    c, workdir, _ = straight_run
    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
        "step_00000004.png", "step_00000004_raw.png"]
    out = tmp_path / "raw"
    done = subprocess.run(
        [sys.executable, "-m", "simple_diffusion.sample", f"--workdir={workdir}",
         "--num_samples=6", "--labels=1", "--ema_index=-1", "--seed=3", f"--output_dir={out}"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        cli_images, cli_labels = f["images"], f["labels"]
    assert cli_images.shape == (6, 8, 8, 1) and cli_images.dtype == np.uint8
    np.testing.assert_array_equal(cli_labels, [1] * 6)
    assert cli_images.std() > 0
    # The same draw in this process, from the raw and from the EMA generator.
    images = {}
    for index in (None, 0):
        step, params, mesh = gan_train.load_generator(workdir, c, None, index)
        assert step == 4
        images[index], _ = sampling.generate(
            c, params, mesh, gan_train.NO_SAMPLER, num_samples=6, labels=np.array([1]),
            seed=3, sample_fn=gan_train.make_sample_fn(c, mesh))
    np.testing.assert_array_equal(images[None], cli_images)
    assert not np.array_equal(images[0], images[None])  # EMA and raw G differ.


@pytest.mark.parametrize("field,value,match", [
    ("gan.loss", "wgan", "config.gan.loss"),
    ("gan.d_steps_per_g_step", 0, "d_steps_per_g_step"),
    ("gan.r1_gamma", -1.0, "r1_gamma"),
    ("gan.d_optimizer.b1", 1.5, "config.gan.d_optimizer.b1"),
    ("model.image_size", 24, "4 \\* 2\\^L"),
    ("model.g_channels", (8, 8), "g_channels"),
])
def test_bad_gan_values_are_refused_in_one_line(field, value, match):
    c = load_config("dcgan_fashion_mnist")
    *path, key = field.split(".")
    section = c
    for p in path:
        section = section[p]
    section[key] = value
    with pytest.raises(config_validation.ConfigError, match=match) as e:
        config_validation.validate_config(c, num_devices=8, process_count=1)
    assert "\n" not in str(e.value)


def test_config_ratios():
    path = REPO / "configs" / "dcgan_fashion_mnist.py"
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.spec_from_file_location("dcgan_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg, want in [("1:1", (1, 1)), ("2:1", (2, 1)), ("1:2", (1, 2))]:
        c = module.get_config(arg)
        config_validation.validate_config(c, num_devices=8, process_count=1)
        assert (c.gan.d_steps_per_g_step, c.gan.g_steps_per_d_step) == want
    with pytest.raises(config_validation.ConfigError, match="one of them to 1"):
        config_validation.validate_config(module.get_config("2:2"), num_devices=8,
                                          process_count=1)
    with pytest.raises(ValueError, match="D:G ratio"):
        module.get_config("fast")
