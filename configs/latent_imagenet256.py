r"""Latent diffusion at ImageNet 256x256 on the f = 8, c = 4 autoencoder (32x32x4 latents).

  python -m simple_diffusion.main --config=configs/autoencoder_imagenet256.py \
      --workdir=gs://bucket/autoencoder_imagenet256
  python -m simple_diffusion.main --config=configs/latent_imagenet256.py \
      --workdir=gs://bucket/latent_imagenet256 \
      --config.latent.autoencoder_workdir=gs://bucket/autoencoder_imagenet256

The simple-diffusion ImageNet recipe (v-prediction, eps-MSE, DDPM sampling,
guidance) on latents: the U-ViT of the imagenet64 preset with one conv level
at 32x32 (256 channels) before its 16x16 x 1024 x 16 transformer, the cosine
schedule shifted for the latent resolution (image_d = 32, reference 64), the
latent scale factor 1/std from the first 8 batches (stored in the workdir),
batches encoded on the fly (random flips happen in pixel space; a cache of
1.28M posteriors would not fit this recipe's hosts). Samples and evaluation
decode to 256x256 pixels, scored against the same validation statistics as
the pixel-space imagenet256 configs. [project] throughout.
"""

from simple_diffusion import latent
from simple_diffusion import recipes


def get_config():
    c = recipes.simple_diffusion_imagenet(64)
    m = c.model
    m.image_size, m.in_channels = 32, 4
    m.channels, m.num_res_blocks = (256,), (2,)
    c.schedule.image_d = 32
    c.latent = latent.default_section()
    c.latent.autoencoder_workdir = "workdirs/autoencoder_imagenet256"
    c.latent.pixel_size = 256
    c.latent.pixel_channels = 3
    c.latent.data = "on_the_fly"
    return c
