"""simple_diffusion: pixel-space diffusion (simple diffusion, SiD2) in JAX/Flax.

Conventions used throughout the package:
  * Continuous time t in [0, 1]; t = 0 is data, t = 1 is pure noise.
  * z_t = alpha_t * x + sigma_t * eps (variance preserving), with
    alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr), logsnr = log(alpha^2 / sigma^2).
  * logSNR is the single currency: schedules map t -> logsnr, models are
    conditioned on logsnr, samplers and losses work from logsnr.
  * Images are NHWC float32 in [-1, 1].
"""
