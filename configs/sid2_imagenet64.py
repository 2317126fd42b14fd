r"""Class-conditional ImageNet 64x64, the SiD2 recipe.

Residual U-ViT, sigmoid loss weighting with a resolution-shifted bias, guidance
interval. Choices, their sources and what is this project's choice:
simple_diffusion/recipes.py (sid2_imagenet). Needs ImageNet 2012 (docs/data.md):

  python -m simple_diffusion.main --config=configs/sid2_imagenet64.py --workdir=gs://BUCKET/sid2_64
"""

from simple_diffusion import recipes


def get_config():
    return recipes.sid2_imagenet(64)
