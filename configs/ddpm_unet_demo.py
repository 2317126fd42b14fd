r"""Offline CPU demo of the seeds' DDPM: Fashion-MNIST 32x32, small U-Net, eps, T = 1000.

The beta schedule is the config argument: linear (default), cosine or sigmoid.
Sample grids and evaluation run the full 1000-step ancestral chain, as DDPM does.
Budget as recipes.fashion_mnist.

  python -m simple_diffusion.main --config=configs/ddpm_unet_demo.py:sigmoid \
      --workdir=workdirs/ddpm_demo_sigmoid
"""

from simple_diffusion import recipes


def get_config(beta_schedule: str = "linear"):
    return recipes.fashion_mnist(recipes.ddpm_unet(beta_schedule or "linear"), "unet_demo")
