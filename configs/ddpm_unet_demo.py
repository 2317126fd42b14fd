r"""Offline CPU demo of the seeds' DDPM: Fashion-MNIST 32x32, small U-Net, eps, T = 1000.

The beta schedule is the config argument: linear (default), cosine or sigmoid.
The U-Net runs every convolution at full resolution, which XLA:CPU executes ~20x
slower per image than the demo U-ViT, so this demo uses a 0.38M-parameter U-Net
(base 16 channels, attention at 16x16 as in DDPM) and batch 32, and draws one
16-image grid at the end over the full 1000-step ancestral chain. [project]

  python -m simple_diffusion.main --config=configs/ddpm_unet_demo.py:sigmoid \
      --workdir=workdirs/ddpm_demo_sigmoid
"""

from simple_diffusion import recipes


def get_config(beta_schedule: str = "linear"):
    c = recipes.fashion_mnist(recipes.ddpm_unet(beta_schedule or "linear"), "unet_demo")
    c.model.base_channels = 16
    c.model.attention_resolutions = (16,)  # DDPM's attention at 16x16.
    c.batch_size = 32
    c.sample.every_steps = c.num_train_steps
    c.sample.num_images = 16
    return c
