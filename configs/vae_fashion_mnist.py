r"""VAE on Fashion-MNIST 32x32, evaluated as a generator (prior samples decoded).

  python -m simple_diffusion.main --config=configs/vae_fashion_mnist.py \
      --workdir=workdirs/vae_fashion_mnist

The autoencoder of ``configs/autoencoder_fashion_mnist.py`` (f = 4, c = 4) with
a VAE's loss: squared error summed per image + beta * KL with beta = 0.02,
i.e. the negative ELBO of a Gaussian decoder with sigma = 0.1 in [-1, 1] units
(beta = 2 sigma^2). LDM's first stage uses beta = 1e-6, which leaves the
posterior far from N(0, I) and prior samples meaningless; here the KL is
strong enough that z ~ N(0, I) decodes to clothing. Evaluation at the end: the
generator's ``fd_effnet_lite0`` / KID (1,000 prior samples against 2,000 test
images, ``eval/step_<N>.json``), plus reconstruction PSNR and rFID-style
``recon/fd_effnet_lite0``. Grids: ``samples/step_*.png`` (prior samples).
"""

from simple_diffusion import autoencoder_train


def get_config():
    c = autoencoder_train.fashion_mnist()
    c.autoencoder.rec_loss = "l2"
    c.autoencoder.kl_weight = 0.02
    c.autoencoder.generate = True
    c.sample.num_images = 64
    return c
