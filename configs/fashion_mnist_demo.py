r"""Offline CPU demo: class-conditional U-ViT on Fashion-MNIST at 32x32 (simple diffusion).

Trains on a 2-core laptop/CI CPU in minutes, from the Debian package
`dataset-fashion-mnist` (no download). Run:

  python -m simple_diffusion.main --config=configs/fashion_mnist_demo.py --workdir=workdirs/demo

The simple diffusion recipe (v-prediction, eps-MSE, DDPM sampling) on the demo
U-ViT and budget of recipes.fashion_mnist, with the plain cosine schedule: 32x32
is below the 64x64 reference resolution of the shifted schedule.
Expect: loss ~0.1 after a few hundred steps; <workdir>/samples/step_*.png grids
in which clothing items (shirts, trousers, shoes, bags) are recognisable by
the end; checkpoints in <workdir>/checkpoints; TensorBoard events in <workdir>.
See README.md for measured time and numbers.
"""

from simple_diffusion import recipes


def get_config():
    c = recipes.fashion_mnist(recipes.simple_diffusion_imagenet(64), "demo")
    c.schedule.name = "cosine"
    for section in (c.sample, c.eval):
        section.num_steps = 128
    c.sample.guidance_scale = 1.0
    return c
