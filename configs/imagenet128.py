r"""Class-conditional ImageNet 128x128, the simple diffusion recipe.

Choices and their sources: simple_diffusion/recipes.py (simple_diffusion_imagenet).
Needs ImageNet 2012 prepared by TFDS (docs/data.md). Every host of a pod/cluster runs:

  python -m simple_diffusion.main --config=configs/imagenet128.py --workdir=gs://BUCKET/in128

Override anything, e.g. `--config.batch_size=256 --config.mesh.fsdp=4`.
"""

from simple_diffusion import recipes


def get_config():
    return recipes.simple_diffusion_imagenet(128)
