r"""Offline CPU demo of the SiD2 recipe: Fashion-MNIST 32x32, residual U-ViT.

The SiD2 method (sigmoid weighting with its bias shifted to 32x32, shifted cosine
schedule, guidance interval) on the demo U-ViT and budget of
configs/fashion_mnist_demo.py (recipes.fashion_mnist). Trains on a 2-core CPU in
minutes; README.md reports its time and fd_effnet_lite0.

  python -m simple_diffusion.main --config=configs/sid2_demo.py --workdir=workdirs/sid2_demo
"""

from simple_diffusion import recipes


def get_config():
    c = recipes.fashion_mnist(recipes.sid2_imagenet(64), "demo")
    c.sample.num_steps = 128
    c.eval.num_steps = 128
    return c
