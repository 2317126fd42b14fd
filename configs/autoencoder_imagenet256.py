r"""LDM's KL-f8 first stage at ImageNet 256x256: f = 8, c = 4 (32x32x4 latents).

  python -m simple_diffusion.main --config=configs/autoencoder_imagenet256.py \
      --workdir=gs://bucket/autoencoder_imagenet256

From LDM (Rombach et al. 2022, kl-f8): channels 128, 256, 512, 512 with 2
residual blocks per level and self-attention in the middle blocks, L1 +
perceptual reconstruction loss with kl_weight 1e-6, a 3-layer patch-GAN with
hinge loss and adaptive weight 0.5 switched on at step 50001. [project]: the
perceptual network is EfficientNet-Lite0 (LPIPS's VGG weights do not ship
offline), GroupNorm in the discriminator, AdamW 1e-4 (LDM: 4.5e-6 x batch) with
5K warm-up, batch 256 for 200K steps, bf16 compute, EMA 0.999, evaluation of
rFID-style fd_effnet_lite0 and PSNR on 10K validation reconstructions.
configs/latent_imagenet256.py trains diffusion on its latents.
"""

from simple_diffusion import autoencoder_train
from simple_diffusion.models import autoencoder


def get_config():
    c = autoencoder_train.base_config()
    c.model = autoencoder.preset(256, 3, channels=(128, 256, 512, 512), num_res_blocks=2,
                                 latent_channels=4, mid_attention=True, num_heads=1)
    c.model.dtype = "bfloat16"
    c.data.name = "imagenet2012"
    c.data.random_flip = True
    c.batch_size = 256
    c.num_train_steps = 200_000
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 5_000
    c.optimizer.b1, c.optimizer.b2 = 0.5, 0.9  # LDM's Adam betas for the first stage.
    c.ema_decays = (0.999,)
    a = c.autoencoder
    a.rec_loss = "l1"
    a.kl_weight = 1e-6
    a.perceptual_weight = 1.0
    a.perceptual_size = 224
    a.disc_weight = 0.5
    a.disc_start = 50_001
    a.disc_channels, a.disc_layers = 64, 3
    c.sample.every_steps = 5_000
    c.sample.num_images = 32
    c.eval.every_steps = 20_000
    c.eval.reference_split = "validation"
    c.eval.num_samples = 10_000
    c.eval.num_reference = 10_000
    c.eval.batch_size = 128
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.keep_every_steps = 50_000
    return c
