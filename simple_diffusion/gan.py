r"""GAN losses on discriminator logits: pure ``jnp`` functions, no state.

Sign convention: the discriminator outputs a logit l(x) (no sigmoid); l > 0 means
"real", D(x) = sigmoid(l(x)) is the probability it assigns to "real". Every loss is
a mean over the batch and is *minimised* by its player.

Non-saturating (Goodfellow et al. 2014, the DCGAN loss)::

  L_D = E_x[-log D(x)] + E_z[-log(1 - D(G(z)))] = E[softplus(-l(x))] + E[softplus(l(G(z)))]
  L_G = E_z[-log D(G(z))]                        = E[softplus(-l(G(z)))]

Hinge (Lim & Ye 2017; Miyato et al. 2018)::

  L_D = E[max(0, 1 - l(x))] + E[max(0, 1 + l(G(z)))]
  L_G = -E[l(G(z))]

R1 gradient penalty on real data (Mescheder et al. 2018), added to L_D as
(gamma / 2) * r1 with::

  r1 = E_x[ || grad_x l(x) ||^2 ]
"""

from typing import Callable

import jax
import jax.numpy as jnp

LOSSES = ("non_saturating", "hinge")


def _check(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"GAN loss {kind!r}; use one of {LOSSES}.")


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
    """L_D (module docstring) from logits [B] of real and of generated images."""
    _check(kind)
    real_logits = real_logits.astype(jnp.float32)
    fake_logits = fake_logits.astype(jnp.float32)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def generator_loss(fake_logits: jax.Array, kind: str) -> jax.Array:
    """L_G (module docstring) from the discriminator's logits [B] of generated images."""
    _check(kind)
    fake_logits = fake_logits.astype(jnp.float32)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-fake_logits))
    return -jnp.mean(fake_logits)


def r1_penalty(logit_fn: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """E_x ||grad_x l(x)||^2 over real images ``real`` [B, ...]; ``logit_fn`` maps images
    to logits [B] (each logit depends only on its own image, so the gradient of the sum
    gives every example's own gradient)."""
    grads = jax.grad(lambda x: jnp.sum(logit_fn(x)))(real)
    return jnp.mean(jnp.sum(jnp.square(grads.astype(jnp.float32)),
                            axis=tuple(range(1, grads.ndim))))


def discriminator_accuracy(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Fraction of real (l > 0) and generated (l < 0) images classified correctly."""
    return 0.5 * (jnp.mean((real_logits > 0).astype(jnp.float32))
                  + jnp.mean((fake_logits < 0).astype(jnp.float32)))
