r"""Class-conditional ImageNet 64x64, the DDPM recipe of the seeds (U-Net, eps, T = 1000).

The beta schedule is the config argument: linear (default), cosine or sigmoid.
Numbers and sources: simple_diffusion/recipes.py (ddpm_unet). Needs ImageNet 2012:

  python -m simple_diffusion.main --config=configs/ddpm_unet_imagenet64.py:cosine \
      --workdir=gs://BUCKET/ddpm64_cosine
"""

from simple_diffusion import recipes


def get_config(beta_schedule: str = "linear"):
    return recipes.ddpm_unet(beta_schedule or "linear", preset="unet_imagenet64")
