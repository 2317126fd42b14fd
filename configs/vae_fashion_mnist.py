r"""VAE on Fashion-MNIST 32x32, evaluated as a generator (prior samples decoded).

  python -m simple_diffusion.main --config=configs/vae_fashion_mnist.py \
      --workdir=workdirs/vae_fashion_mnist

The autoencoder of ``configs/autoencoder_fashion_mnist.py`` with one more level
(f = 8: 4x4x4 latents, 64 numbers per image) and a VAE's loss: squared error
summed per image + beta * KL with beta = 0.1, the negative ELBO of a Gaussian
decoder with sigma^2 = 0.05 in [-1, 1] units (beta = 2 sigma^2). LDM's first
stage (beta = 1e-6) leaves the posterior far from N(0, I), and so did a first
try here with f = 4 and beta = 0.02 (KL ~370 nats per image; prior samples
decoded to texture, docs/latent.md): a generator needs a small latent whose
every position the prior can fill, and a KL that costs. Evaluation at the end:
the generator's ``fd_effnet_lite0`` / KID (1,000 prior samples against 2,000
test images, ``eval/step_<N>.json``), plus reconstruction PSNR and rFID-style
``recon/fd_effnet_lite0``. Grids: ``samples/step_*.png`` (prior samples).
"""

from simple_diffusion import autoencoder_train


def get_config():
    c = autoencoder_train.fashion_mnist()
    c.model.channels = (16, 32, 64, 64)  # f = 8.
    c.autoencoder.rec_loss = "l2"
    c.autoencoder.kl_weight = 0.1
    c.autoencoder.generate = True
    c.sample.num_images = 64
    return c
