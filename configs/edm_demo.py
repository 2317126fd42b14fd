r"""Offline CPU demo of the EDM recipe: Fashion-MNIST 32x32.

EDM preconditioning, log-normal sigma training and the EDM weight, sampled with
deterministic Heun on the Karras grid (EDM's own sigma in [0.002, 80]). The
network is the demo U-ViT of configs/fashion_mnist_demo.py (not EDM's U-Net) so
that the demos differ in method only; budget as recipes.fashion_mnist. EDM's
ImageNet churn is off here: at 32 steps it is tuned for 256. [project]

  python -m simple_diffusion.main --config=configs/edm_demo.py --workdir=workdirs/edm_demo
"""

from simple_diffusion import recipes


def get_config():
    c = recipes.fashion_mnist(recipes.edm_imagenet64(), "demo")
    c.optimizer.grad_clip_norm = 1.0  # At lr 1e-3 the demo needs it. [project]
    for section in (c.sample, c.eval):
        section.num_steps = 32  # 63 network evaluations per image.
        section.s_churn = 0.0
    return c
