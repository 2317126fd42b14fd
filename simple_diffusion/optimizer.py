"""Optimizer and learning-rate schedule from the config (optax)."""

import ml_collections
import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           num_train_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``config.learning_rate``, then constant or cosine.

    Args:
      config: ``config.optimizer`` (learning_rate, warmup_steps, schedule,
        final_lr_fraction for cosine).
      num_train_steps: total optimizer steps, the end of the cosine decay.
    """
    peak = config.learning_rate
    warmup = optax.linear_schedule(0.0, peak, max(config.warmup_steps, 1))
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            peak, max(num_train_steps - config.warmup_steps, 1),
            alpha=config.get("final_lr_fraction", 0.0))
    else:
        raise ValueError(f"config.optimizer.schedule={config.schedule!r}; use one of {SCHEDULES}.")
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict,
                   num_train_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (clip before the Adam moments)."""
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(
        learning_rate=learning_rate_schedule(config, num_train_steps),
        b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay))
    return optax.chain(*parts)
