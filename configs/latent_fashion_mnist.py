r"""Latent diffusion on Fashion-MNIST: the demo's U-ViT recipe on a frozen f = 4 autoencoder's latents.

First train the autoencoder (configs/autoencoder_fashion_mnist.py), then:

  python -m simple_diffusion.main --config=configs/autoencoder_fashion_mnist.py \
      --workdir=workdirs/autoencoder_fashion_mnist
  python -m simple_diffusion.main --config=configs/latent_fashion_mnist.py \
      --workdir=workdirs/latent_fashion_mnist
  python -m simple_diffusion.sample --workdir=workdirs/latent_fashion_mnist --num_samples=64
  python -m simple_diffusion.evaluate --workdir=workdirs/latent_fashion_mnist

configs/fashion_mnist_demo.py (class-conditional simple diffusion: v-prediction,
eps-MSE, plain cosine schedule, DDPM sampling with guidance 1, 1200 steps of
batch 64) with the data in the autoencoder's 8x8x4 latent space instead of
32x32x1 pixels: the demo U-ViT with a 1x1 patch stem (8x8 -> one conv level ->
a 4x4 transformer). The latents are scaled by 1/std (computed from the first 8
batches, stored in <workdir>/latent_scale.json); ``schedule.image_d`` is the
latent resolution 8, which the plain cosine schedule does not use (like the
pixel demo, whose 32x32 is below the shifted schedule's reference 64).
Training reads every training image's posterior from a cache built at start-up
(faster here than encoding each batch; docs/latent.md has both numbers);
samples and evaluation decode to 32x32 pixels and use the pixel protocol.
"""

from simple_diffusion import latent
from simple_diffusion import recipes


def get_config():
    c = recipes.fashion_mnist(recipes.simple_diffusion_imagenet(64), "demo")
    c.schedule.name = "cosine"
    for section in (c.sample, c.eval):
        section.num_steps = 128
    c.sample.guidance_scale = 1.0
    c.model.image_size = 8       # 32 / f
    c.model.in_channels = 4      # c
    c.model.patch_size = 1
    c.schedule.image_d = 8
    c.latent = latent.default_section()
    c.latent.autoencoder_workdir = "workdirs/autoencoder_fashion_mnist"
    c.latent.pixel_size = 32
    c.latent.pixel_channels = 1
    c.latent.data = "cached"
    return c
