r"""Class-conditional ImageNet 64x64, the simple diffusion recipe.

See config_defaults.imagenet_config for the choices. Needs ImageNet 2012
prepared by TFDS (docs/data.md). Every host of a pod/cluster runs:

  python -m simple_diffusion.main --config=configs/imagenet64.py --workdir=gs://BUCKET/in64

Override anything, e.g. `--config.batch_size=256 --config.mesh.fsdp=4`.
"""

from simple_diffusion import config_defaults


def get_config():
    return config_defaults.imagenet_config(64)
