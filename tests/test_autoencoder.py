"""KL autoencoder / VAE (autoencoder.py, models/autoencoder.py, autoencoder_train.py) and
latent diffusion (latent.py) on tiny sizes (8 simulated CPU devices)."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from simple_diffusion import autoencoder as ae_lib
from simple_diffusion import autoencoder_train
from simple_diffusion import config_validation
from simple_diffusion.evaluation import workdir_evaluation
from simple_diffusion import latent
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion import sharding
from simple_diffusion import train
from simple_diffusion.models import autoencoder as ae_models

from conftest import load_config, read_checkpoint_params  # pylint: disable=g-bad-import-order

# One xdist worker runs this module (pytest.ini: --dist loadgroup), so its
# module-scoped fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("autoencoder")

SPLIT = "train[:256]"  # A slice keeps the latent cache (one pass of the split) fast.


@pytest.mark.parametrize("f,channels", [(2, (4, 8)), (4, (4, 8, 8)), (8, (4, 8, 8, 8))])
def test_encode_decode_shapes_for_each_downsampling_factor(f, channels):
    config = ae_models.preset(32, 3, channels=channels, num_res_blocks=1, latent_channels=3)
    assert ae_models.downsampling_factor(config) == f
    model = ae_models.from_config(config)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda r, x: model.init({"params": r}, x, sample=False),
                               jax.random.key(0), x)
    mean, logvar = jax.eval_shape(
        lambda v, x: model.apply(v, x, method=model.encode), variables, x)
    assert mean.shape == logvar.shape == (2, 32 // f, 32 // f, 3) == (2,) + (
        ae_models.latent_shape(config))
    out = jax.eval_shape(lambda v, z: model.apply(v, z, method=model.decode), variables, mean)
    assert out.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="not divisible"):
        ae_models.from_config(ae_models.preset(33, 3, channels=channels))


def test_kl_matches_the_closed_form():
    rs = np.random.RandomState(0)
    mean = rs.normal(0, 1.5, (3, 4, 4, 2))
    logvar = rs.normal(0, 1.0, (3, 4, 4, 2))
    sigma = np.exp(0.5 * logvar)
    # KL(N(m, s^2) || N(0, 1)) = log(1 / s) + (s^2 + m^2) / 2 - 1/2 per dimension (float64).
    expected = np.sum(np.log(1.0 / sigma) + (sigma ** 2 + mean ** 2) / 2 - 0.5, axis=(1, 2, 3))
    got = ae_lib.kl_to_standard_normal(jnp.asarray(mean, jnp.float32),
                                       jnp.asarray(logvar, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    zero = ae_lib.kl_to_standard_normal(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))
    assert float(zero[0]) == 0.0


def test_reparameterisation_gradient_matches_the_analytic_one():
    # E[z^2] = mu^2 + exp(logvar): d/dmu = 2 mu, d/dlogvar = exp(logvar).
    mu, logvar = jnp.full((200_000,), 0.7), jnp.full((200_000,), -0.4)

    def objective(mu, logvar):
        return jnp.mean(jnp.square(ae_lib.sample_posterior(jax.random.key(1), mu, logvar)))

    g_mu, g_logvar = jax.grad(objective, argnums=(0, 1))(mu, logvar)
    # The per-element gradients of the batch mean sum to the gradient of E[z^2].
    np.testing.assert_allclose(float(jnp.sum(g_mu)), 2 * 0.7, rtol=0.02)
    np.testing.assert_allclose(float(jnp.sum(g_logvar)), np.exp(-0.4), rtol=0.02)
    # A linear f has the exact gradient for any sample: d/dmu a.z = a.
    a = jnp.linspace(-1, 1, 8)
    g = jax.grad(lambda m: jnp.sum(a * ae_lib.sample_posterior(jax.random.key(2), m,
                                                               jnp.zeros(8))))(jnp.zeros(8))
    np.testing.assert_allclose(np.asarray(g), np.asarray(a), rtol=1e-6)


def test_latent_scale_factor_on_synthetic_data_with_known_variance():
    rs = np.random.RandomState(0)
    mean = jnp.asarray(rs.normal(0.0, 2.0, (4096, 4, 4, 4)), jnp.float32)
    logvar = jnp.full(mean.shape, 2 * np.log(0.5), jnp.float32)
    z = ae_lib.sample_posterior(jax.random.key(0), mean, logvar)  # Var = 4 + 0.25.
    np.testing.assert_allclose(float(ae_lib.latent_scale_factor(z)), 1 / np.sqrt(4.25),
                               rtol=5e-3)
    np.testing.assert_allclose(float(jnp.std(ae_lib.latent_scale_factor(z) * z)), 1.0,
                               rtol=1e-5)


def test_psnr_gan_and_perceptual_terms():
    x = jnp.zeros((2, 4, 4, 1))
    np.testing.assert_allclose(np.asarray(ae_lib.psnr(x, x + 0.1)), 10 * np.log10(4 / 0.01),
                               rtol=1e-5)
    real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1]: 0.5 * (0.25 + 0.5).
    np.testing.assert_allclose(float(ae_lib.hinge_d_loss(real, fake)), 0.375)
    assert float(ae_lib.generator_adversarial_loss(fake)) == 1.0
    f = jax.random.normal(jax.random.key(0), (2, 3, 3, 5))
    np.testing.assert_allclose(np.asarray(ae_lib.perceptual_distance([f], [3.0 * f])), 0.0,
                               atol=1e-6)  # Channel-normalised: a scale is not a difference.
    assert float(ae_lib.perceptual_distance([f], [-f])[0]) > 1.0


def _tiny_autoencoder_config(data_dir, num_train_steps=4):
    c = autoencoder_train.fashion_mnist()
    c.model = ae_models.preset(16, 1, channels=(8, 8), num_res_blocks=0, latent_channels=2)
    c.data.data_dir, c.data.split = data_dir, SPLIT
    c.batch_size, c.num_train_steps = 16, num_train_steps
    c.optimizer.warmup_steps = 1
    a = c.autoencoder
    a.disc_weight, a.disc_start, a.disc_channels, a.disc_layers = 0.5, 2, 8, 1
    c.sample.every_steps = 0
    c.eval.every_steps = 0
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    return c


@pytest.fixture(scope="module")
def autoencoder_runs(tmp_path_factory, fashion_mnist_dir):
    """The tiny autoencoder trained 4 steps in one go, and 2 + 2 steps with a resume."""
    straight = str(tmp_path_factory.mktemp("ae_straight"))
    resumed = str(tmp_path_factory.mktemp("ae_resumed"))
    out = autoencoder_train.train_and_evaluate(_tiny_autoencoder_config(fashion_mnist_dir),
                                               straight)
    autoencoder_train.train_and_evaluate(_tiny_autoencoder_config(fashion_mnist_dir, 2), resumed)
    config = _tiny_autoencoder_config(fashion_mnist_dir)
    config.sample.every_steps, config.sample.num_images = 4, 8  # Also the grids' path.
    autoencoder_train.train_and_evaluate(config, resumed)
    return straight, resumed, out


def test_autoencoder_trains_and_resumes_exactly(autoencoder_runs):
    straight, resumed, out = autoencoder_runs
    m = out["metrics"]
    assert out["step"] == 4 and np.isfinite(m["loss"]) and m["psnr"] > 0
    assert m["disc_factor"] == 1.0 and np.isfinite(m["d_loss"])  # The GAN is on from step 2.
    first = read_checkpoint_params(straight, 2)
    a, b = read_checkpoint_params(straight, 4), read_checkpoint_params(resumed, 4)
    assert any(not np.array_equal(x, y) for x, y in zip(first, a))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    grid = np.asarray(Image.open(pathlib.Path(resumed, "samples",
                                              "reconstructions_00000004.png")))
    assert grid.shape == (17 + 1, 16 * 17 + 1)  # 8 (original, reconstruction) pairs in a row.


def test_autoencoder_config_errors_are_one_line(fashion_mnist_dir):
    config = _tiny_autoencoder_config(fashion_mnist_dir)
    config.autoencoder.rec_loss = "l3"
    with pytest.raises(config_validation.ConfigError, match="rec_loss"):
        config_validation.validate_autoencoder_config(config, num_devices=8, process_count=1)
    with pytest.raises(config_validation.ConfigError, match="no trained autoencoder"):
        config_validation.check_autoencoder_workdir("/nonexistent/autoencoder")


def _tiny_latent_config(data_dir, autoencoder_workdir):
    c = load_config("tiny")
    c.data.data_dir, c.data.split = data_dir, SPLIT
    c.model.image_size, c.model.in_channels = 8, 2  # The tiny autoencoder's 8x8x2 latents.
    c.schedule.image_d = 8
    c.latent = latent.default_section()
    c.latent.autoencoder_workdir = autoencoder_workdir
    c.latent.pixel_size, c.latent.pixel_channels = 16, 1
    c.latent.scale_num_batches = 2
    c.num_train_steps = 2
    c.sample.every_steps = 2
    c.checkpoint_every_steps = 2
    return c


def test_latent_diffusion_trains_on_latents_and_samples_decode(autoencoder_runs,
                                                              fashion_mnist_dir, tmp_path):
    ae_dir = autoencoder_runs[1]
    workdir = str(tmp_path / "latent")
    out = train.train_and_evaluate(_tiny_latent_config(fashion_mnist_dir, ae_dir), workdir)
    assert out["step"] == 2 and np.isfinite(out["metrics"]["loss"])
    record = json.loads((tmp_path / "latent" / latent.SCALE_FILE).read_text())
    assert record["autoencoder_step"] == 4 and record["scale_factor"] > 0
    np.testing.assert_allclose(record["scale_factor"] * record["latent_std"], 1.0, rtol=1e-5)
    # The periodic grid is of decoded 16x16 pixels (8 images, 3 x 3 tiles), not 8x8 latents.
    grid = np.asarray(Image.open(tmp_path / "latent" / "samples" / "step_00000002.png"))
    assert grid.shape == (3 * 17 + 1, 3 * 17 + 1)

    # Sampling from the run (as the sample/evaluate CLIs do): a sampler step, then decoding.
    config = sampling.load_run_config(workdir)
    assert config.latent.scale_factor == record["scale_factor"]
    step, params, model, mesh = workdir_evaluation.load_ema_params(workdir, config)
    space = latent.load(config, mesh)
    options = dataclasses.replace(samplers.SamplerOptions.from_config(config.sample),
                                  num_steps=1)
    sample_fn = space.decoding(sampling.make_sample_fn(model, config, mesh, options))
    images = np.asarray(sample_fn(params, jax.random.key(0), sampling.replicate_labels(
        sampling.default_labels(8, 10), mesh)))
    assert step == 2 and images.shape == (8, 16, 16, 1) and np.isfinite(images).all()

    # Cached posteriors and on-the-fly encoding give the same latents for a step, and the
    # stored scale makes the latents of the batches it was computed on unit-variance.
    batch_sh = sharding.batch_sharding(mesh)
    to_global = lambda b: {k: jax.make_array_from_process_local_data(batch_sh, v)
                           for k, v in b.items()}
    with space.input_iterator(0) as cached, space.pixel_iterator(0) as pixels:
        zs = []
        for step in range(2):
            z_cached = space.encode_batch(to_global(next(cached)), step)
            z_pixels = space.encode_batch(to_global(next(pixels)), step)
            np.testing.assert_allclose(np.asarray(z_cached["image"]),
                                       np.asarray(z_pixels["image"]), atol=1e-4)
            np.testing.assert_array_equal(np.asarray(z_cached["label"]),
                                          np.asarray(z_pixels["label"]))
            zs.append(np.asarray(z_pixels["image"]))
    np.testing.assert_allclose(np.std(np.concatenate(zs)), 1.0, rtol=1e-3)


def test_latent_run_refuses_a_missing_autoencoder(fashion_mnist_dir, tmp_path):
    config = _tiny_latent_config(fashion_mnist_dir, str(tmp_path / "no_autoencoder"))
    with pytest.raises(config_validation.ConfigError, match="no trained autoencoder"):
        train.train_and_evaluate(config, str(tmp_path / "latent"))


def test_imagenet_autoencoder_recipe_takes_a_step_with_gan_and_perceptual_terms():
    """configs/autoencoder_imagenet256.py at a tiny width: mid attention, the EfficientNet
    perceptual term and the patch-GAN with its adaptive weight all in one step."""
    config = load_config("autoencoder_imagenet256")
    config_validation.validate_autoencoder_config(config, num_devices=8, process_count=1)
    m, a = config.model, config.autoencoder
    m.image_size, m.channels, m.num_res_blocks, m.dtype = 32, (4, 4, 4, 4), 1, "float32"
    a.perceptual_size, a.disc_channels, a.disc_start = 32, 4, 0
    config.batch_size = 8
    config.optimizer.warmup_steps = 0  # A non-zero learning rate at step 0.
    model, disc = autoencoder_train.create_models(config)
    tx, disc_tx = autoencoder_train._optimizers(config)  # pylint: disable=protected-access
    state = jax.jit(lambda k: autoencoder_train.init_state(model, disc, tx, disc_tx, config, k))(
        jax.random.key(0))
    before = jax.device_get(state)
    step = jax.jit(autoencoder_train.make_train_step(
        model, disc, tx, disc_tx, config, autoencoder_train.make_perceptual_fn(32)))
    batch = {"image": jax.random.uniform(jax.random.key(1), (8, 32, 32, 3), minval=-1, maxval=1)}
    step = step.lower(state, batch).compile(
        compiler_options={"xla_backend_optimization_level": 0})  # Does it run, not how fast.
    state, metrics = step(state, batch)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["perceptual"]) > 0 and float(metrics["adaptive_weight"]) > 0
    for key in ("params", "disc"):  # Both the autoencoder and the discriminator moved.
        moved = [not np.array_equal(x, y) for x, y in zip(
            jax.tree.leaves(before[key]["params"] if key == "disc" else before[key]),
            jax.tree.leaves(jax.device_get(state[key]["params"] if key == "disc"
                                           else state[key])))]
        assert any(moved), key
