r"""KL autoencoder (the LDM first stage) on Fashion-MNIST 32x32: f = 4, c = 4, on a 2-core CPU.

  python -m simple_diffusion.main --config=configs/autoencoder_fashion_mnist.py \
      --workdir=workdirs/autoencoder_fashion_mnist

Encodes 32x32x1 images to 8x8x4 latents (4x fewer numbers) with LDM's loss:
per-pixel L1 summed per image + 1e-6 KL. The optional patch-GAN
(``--config.autoencoder.disc_weight=0.5``) and EfficientNet-Lite0 perceptual
term (``--config.autoencoder.perceptual_weight=1.0``) are off here: on this CPU
they triple the step time. Evaluation at the end: PSNR and rFID-style
``recon/fd_effnet_lite0`` of reconstructions of 1,000 test images against 2,000
(``eval/reconstruction/step_<N>.json``); ``samples/reconstructions_*.png``
pairs originals and reconstructions. ``configs/latent_fashion_mnist.py`` trains
diffusion on its latents. Measured numbers: docs/latent.md.
"""

from simple_diffusion import autoencoder_train


def get_config():
    return autoencoder_train.fashion_mnist()
