r"""Class-conditional ImageNet 64x64, the EDM recipe (Karras et al. 2022).

EDM preconditioning, log-normal sigma training, EDM loss weight, ADM-style U-Net,
Heun sampling with churn. Numbers and sources: simple_diffusion/recipes.py
(edm_imagenet64). Needs ImageNet 2012 (docs/data.md):

  python -m simple_diffusion.main --config=configs/edm_imagenet64.py --workdir=gs://BUCKET/edm64
"""

from simple_diffusion import recipes


def get_config():
    return recipes.edm_imagenet64()
