r"""Offline CPU demo of the seeds' DCGAN (seed 002): class-conditional, Fashion-MNIST 32x32.

  python -m simple_diffusion.main --config=configs/dcgan_fashion_mnist.py --workdir=workdirs/dcgan
  python -m simple_diffusion.main --config=configs/dcgan_fashion_mnist.py:1:2 \
      --workdir=workdirs/dcgan_1to2
  python -m simple_diffusion.evaluate --workdir=workdirs/dcgan                  # EMA generator
  python -m simple_diffusion.evaluate --workdir=workdirs/dcgan --ema_index=-1   # raw generator

The config argument is the D:G update ratio per iteration, "D:G" with one side 1:
"1:1" (default), "2:1" (two D updates per G update) or "1:2" (the seed's final
choice: one D update per two G updates). Data, batch, EMA, sample/eval cadence and
the evaluation protocol are recipes.fashion_mnist's (the diffusion demos'), so the
runs compare. The DCGAN (models/dcgan.py, GroupNorm in G, none in D, projection
discriminator) is 0.30M (G) + 0.17M (D) parameters; non-saturating loss; Adam(2e-4,
0.5, 0.999) for both players, constant, no clipping (DCGAN's); EMA 0.999 of G.
[project]: widths, latent 64, batch 64, budget. docs/gan.md has the measured numbers.
"""

import ml_collections

from simple_diffusion import config_defaults
from simple_diffusion import gan_train
from simple_diffusion import recipes
from simple_diffusion.models import dcgan


def get_config(ratio: str = "1:1") -> ml_collections.ConfigDict:
    try:
        d, g = (int(x) for x in (ratio or "1:1").split(":"))
    except ValueError:
        raise ValueError(f"D:G ratio {ratio!r}: use e.g. 1:1, 2:1 or 1:2 "
                         "(--config=configs/dcgan_fashion_mnist.py:1:2).") from None
    c = recipes.fashion_mnist(config_defaults.base_config(), "demo", num_train_steps=1500)
    c.model = dcgan.default_config(image_size=32, in_channels=1, num_classes=10)
    c.schedule.name = "cosine"  # Diffusion fields are unused; this one has no resolution.
    c.gan = gan_train.default_section()
    c.gan.d_steps_per_g_step, c.gan.g_steps_per_d_step = d, g
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    c.optimizer.b1, c.optimizer.b2 = 0.5, 0.999
    c.optimizer.grad_clip_norm = 0.0
    c.sample.every_steps = 500
    c.checkpoint_every_steps = 500
    c.eval.every_steps = 750
    return c
