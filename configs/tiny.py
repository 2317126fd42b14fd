r"""Tiny config for tests and smoke runs (seconds on a CPU).

  python -m simple_diffusion.main --config=configs/tiny.py --workdir=/tmp/tiny

Trains the `tiny` U-ViT on Fashion-MNIST 32x32 for 20 steps with checkpoints
every 10 steps and a 4-step sample grid at the end.
"""

import ml_collections

from simple_diffusion import config_defaults
from simple_diffusion.models import presets


def get_config() -> ml_collections.ConfigDict:
    c = config_defaults.base_config()
    c.model = presets.get_preset("tiny")
    c.model.image_size = 32
    c.model.in_channels = 1
    c.model.num_classes = 10
    c.data.name = "fashion_mnist_local"
    c.schedule.name = "cosine_shifted"
    c.schedule.image_d = 32
    c.schedule.noise_d = 64
    c.loss.multiscale_min_res = 8
    c.batch_size = 16
    c.num_train_steps = 20
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 5
    c.ema_decays = (0.99, 0.999)
    c.sample.every_steps = 20
    c.sample.num_images = 8
    c.sample.num_steps = 4
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
    return c
