"""KL autoencoder / VAE objectives as pure functions (plain jnp, no state).

Conventions follow LDM's ``LPIPSWithDiscriminator`` (Rombach et al. 2022):
images are in [-1, 1]; per-example losses are *sums* over pixels (or latent
elements), averaged over the batch, so ``kl_weight`` means what LDM's
``kl_weight`` means (1e-6 for a first stage; a VAE needs a far larger one for
its posterior to match the N(0, I) prior it is sampled from).

  loss_G = mean_b[ sum_pixels(|x - x_hat| + w_p * perceptual) ] + kl_weight * mean_b[KL]
           + disc_factor * lambda * w_d * (-mean(D(x_hat)))
  loss_D = disc_factor * hinge(D(x), D(x_hat))

lambda is LDM's adaptive weight: the ratio of the gradient norms of the
reconstruction and the adversarial term at the decoder's last layer.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

REC_LOSSES = ("l1", "l2")


def _sum_per_example(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def sample_posterior(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Reparameterised z = mean + exp(logvar / 2) * eps, eps ~ N(0, I)."""
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the other axes: [B].

    0.5 * sum(mean^2 + exp(logvar) - 1 - logvar).
    """
    return 0.5 * _sum_per_example(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def reconstruction_error(x: jax.Array, x_hat: jax.Array, kind: str) -> jax.Array:
    """Elementwise |x - x_hat| ('l1') or (x - x_hat)^2 ('l2'), same shape as x."""
    if kind == "l1":
        return jnp.abs(x - x_hat)
    if kind == "l2":
        return jnp.square(x - x_hat)
    raise ValueError(f"reconstruction loss {kind!r}; use one of {REC_LOSSES}.")


def psnr(x: jax.Array, x_hat: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB per example: 10 log10(range^2 / MSE), [B].

    ``data_range`` 2 for images in [-1, 1] (the same number as for [0, 1] images
    with range 1); ``x_hat`` is clipped to the range's interval first.
    """
    x_hat = jnp.clip(x_hat, -data_range / 2, data_range / 2)
    mse = jnp.mean(jnp.square(x - x_hat).reshape(x.shape[0], -1), axis=-1)
    return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-12))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """The discriminator's hinge loss: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) +
                  jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """The generator's side of the hinge GAN: -mean D(x_hat)."""
    return -jnp.mean(logits_fake)


def adaptive_weight(rec_grad: jax.Array, adv_grad: jax.Array, max_weight: float = 1e4
                    ) -> jax.Array:
    """LDM's lambda = ||grad rec|| / (||grad adv|| + 1e-4), clipped to [0, max], both
    gradients taken w.r.t. the decoder's last layer; no gradient flows through it."""
    w = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(adv_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def disc_factor(step: jax.Array, disc_start: int) -> jax.Array:
    """1 from step ``disc_start`` on, else 0 (the GAN terms are off before it)."""
    return jnp.where(step >= disc_start, 1.0, 0.0)


def perceptual_distance(feats_a: Sequence[jax.Array], feats_b: Sequence[jax.Array]
                        ) -> jax.Array:
    """LPIPS-style distance without learned weights, per example [B]: for each layer
    [B, h, w, c], unit-normalise over channels, average the squared difference over
    positions and sum over channels; then average the layers."""
    def unit(f):
        return f * jax.lax.rsqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + 1e-10)

    dists = [jnp.sum(jnp.mean(jnp.square(unit(a) - unit(b)), axis=(1, 2)), axis=-1)
             for a, b in zip(feats_a, feats_b)]
    return sum(dists) / len(dists)


def generator_losses(x: jax.Array, x_hat: jax.Array, mean: jax.Array, logvar: jax.Array, *,
                     rec_loss: str, kl_weight: float, perceptual_weight: float = 0.0,
                     perceptual_fn: Callable | None = None) -> tuple[jax.Array, dict]:
    """The reconstruction + beta * KL part of the autoencoder loss (scalar) and metrics."""
    per_pixel = reconstruction_error(x, x_hat, rec_loss)
    metrics = {}
    if perceptual_weight:
        p = perceptual_fn(x, x_hat)  # [B]
        per_pixel = per_pixel + perceptual_weight * p[:, None, None, None]
        metrics["perceptual"] = jnp.mean(p)
    rec = jnp.mean(_sum_per_example(per_pixel))
    kl = jnp.mean(kl_to_standard_normal(mean, logvar))
    loss = rec + kl_weight * kl
    metrics.update(rec_loss=rec, kl=kl, psnr=jnp.mean(psnr(x, x_hat)),
                   posterior_std=jnp.mean(jnp.exp(0.5 * logvar)))
    return loss, metrics


def latent_scale_factor(latents: jax.Array) -> jax.Array:
    """LDM's scale factor: 1 / std of the latents over every element (a scalar), so
    that scaled latents have unit variance, as the diffusion schedules assume."""
    return 1.0 / jnp.std(latents.astype(jnp.float32))
