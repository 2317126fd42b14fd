"""FLOPs of the train step, the forward pass and the sampler, correct for scanned models.

XLA's cost analysis counts the body of a while loop once, not once per iteration.
Three loops hide FLOPs from it here: the scanned transformer stack
(``scan_layers=True``, the ImageNet presets), the gradient-accumulation scan
(``grad_accum_steps > 1``) and the sampler's ``lax.scan`` over denoising steps.
Rematerialisation (``remat=True``) adds the recomputed forward on top. So the
count of the compiled program of a run is not the model's FLOPs.

Method: the function is lowered (traced to StableHLO; never compiled, nothing
allocated: inputs and parameters are ``jax.ShapeDtypeStruct``) on one device
for the global batch, with a copy of the config whose model is unrolled
(``scan_layers=False``) and not rematerialised (``remat=False``) and whose
gradients are not accumulated, and ``Lowered.cost_analysis()['flops']`` is read
(2 FLOPs per multiply-add of a dot or convolution, plus the elementwise
arithmetic). The transformer blocks of a U-ViT are identical, so the count is
affine in ``transformer_depth``: it is taken at depths 1 and 2 and extrapolated,
F(D) = F(1) + (D - 1) (F(2) - F(1)), which is exact and keeps the ~2B-parameter
presets cheap (seconds on a CPU).

* Model FLOPs (the numerator of MFU): as above, no recompute.
* Hardware FLOPs (``hardware=True``): the same with the config's ``remat``
  kept, so the recomputed forward is counted too.
* Sampler: the network evaluations of one call
  (``samplers.num_model_evaluations``: N per sample, 2N - 1 for Heun, a
  guided evaluation counting 2 since it runs the conditional and
  unconditional halves as one 2B batch) times the forward FLOPs of the batch.
  The sampler's own arithmetic is left out (well under 1% for any real model).

Every count is a total over all devices for one call: one optimizer step on
``config.batch_size`` images, one forward of ``batch`` images, one sampler call.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simple_diffusion import models
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import samplers
from simple_diffusion import schedules
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import train_step as train_step_lib
from simple_diffusion.models import presets

# (run config, or model config, with the model unrolled) -> the lowered function.
_Lower = Callable[[ml_collections.ConfigDict], jax.stages.Lowered]


def xla_flops(lowered_or_compiled: Any) -> float:
    """``cost_analysis()['flops']`` of a ``jax.stages.Lowered`` or ``Compiled`` (0 if none).

    On its own this counts every loop body once (and a compiled SPMD program
    per device): use the functions below for a model's FLOPs.
    """
    analysis = lowered_or_compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # Older jax: one dict per device.
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def unrolled_model_config(model_config: ml_collections.ConfigDict, *, depth: int | None = None,
                          keep_remat: bool = False) -> ml_collections.ConfigDict:
    """A copy of a model config with the transformer unrolled and, unless
    ``keep_remat``, remat off; ``depth`` sets the U-ViT's ``transformer_depth``."""
    config = model_config.copy_and_resolve_references()
    if "scan_layers" in config:
        config.scan_layers = False
    if "remat" in config and not keep_remat:
        config.remat = False
    if depth is not None:
        config.transformer_depth = depth
    return config


def _count(lower: _Lower, config: ml_collections.ConfigDict, *, hardware: bool) -> float:
    """FLOPs of ``lower(config')`` where config' has the model unrolled.

    ``config`` is a run config (with a ``model`` field) or a model config. A
    U-ViT is counted at depths 1 and 2 and extrapolated (module docstring).
    """
    is_run_config = "model" in config
    model_config = config.model if is_run_config else config

    def count_at(depth):
        unrolled = unrolled_model_config(model_config, depth=depth, keep_remat=hardware)
        if is_run_config:
            run_config = config.copy_and_resolve_references()
            run_config.model = unrolled
            unrolled = run_config
        return xla_flops(lower(unrolled))

    if model_config.name != "uvit":
        return count_at(None)
    depth, one = model_config.transformer_depth, count_at(1)
    return one if depth == 1 else one + (depth - 1) * (count_at(2) - one)


def _model_inputs(model_config: ml_collections.ConfigDict, batch: int) -> tuple:
    """Abstract (params, z [B, S, S, C] f32, logsnr [B] f32, labels [B] int32 or None)."""
    params = nn.unbox(presets.abstract_variables(model_config)["params"])
    size, channels = model_config.image_size, model_config.in_channels
    z = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
    logsnr = jax.ShapeDtypeStruct((batch,), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if model_config.num_classes else None
    return params, z, logsnr, labels


def _lower_forward(batch: int, *, train: bool, backward: bool) -> _Lower:
    """Lowers the forward (or the params-gradient of its mean square output)."""

    def lower(model_config):
        model = models.create_model(model_config)
        rngs = {"dropout": jax.random.key(0)} if train else {}

        def forward(params, z, logsnr, labels):
            return model.apply({"params": params}, z, logsnr, labels, train=train, rngs=rngs)

        fn = jax.grad(lambda *a: jnp.mean(jnp.square(forward(*a)))) if backward else forward
        return jax.jit(fn).lower(*_model_inputs(model_config, batch))

    return lower


def forward_flops(model_config: ml_collections.ConfigDict, batch: int, *, train: bool = False,
                  hardware: bool = False) -> float:
    """FLOPs of one forward pass of ``batch`` images (``train``: with dropout)."""
    return _count(_lower_forward(batch, train=train, backward=False), model_config,
                  hardware=hardware)


def forward_backward_flops(model_config: ml_collections.ConfigDict, batch: int, *,
                           hardware: bool = False) -> float:
    """FLOPs of the params-gradient of the mean square of a train-mode forward."""
    return _count(_lower_forward(batch, train=True, backward=True), model_config,
                  hardware=hardware)


def abstract_train_batch(config: ml_collections.ConfigDict,
                         sharding: jax.sharding.Sharding | None = None) -> dict[str, Any]:
    """The global batch as ``jax.ShapeDtypeStruct``: image float32 [B, S, S, C], label int32 [B]."""
    size, channels, batch = config.model.image_size, config.model.in_channels, config.batch_size
    return {
        "image": jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32,
                                      sharding=sharding),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding),
    }


def lower_train_step(config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh | None = None) -> jax.stages.Lowered:
    """The trainer's jitted step (``train_step.jit_train_step``) lowered on abstract inputs.

    Args:
      config: the run config, used as is (scanned models stay scanned).
      mesh: the device mesh; None: one device (then the cost analysis of the
        result covers the whole global batch).
    """
    if mesh is None:
        mesh = sharding_lib.create_mesh(1, 1, devices=jax.devices()[:1])
    model = models.create_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
    abstract_state, shardings = train_step_lib.state_shardings(model, tx, config, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract_state, shardings)
    step = train_step_lib.jit_train_step(model, tx, config, mesh, shardings)
    return step.lower(state, abstract_train_batch(config, sharding_lib.batch_sharding(mesh)))


def _lower_train_step_unaccumulated(config: ml_collections.ConfigDict) -> jax.stages.Lowered:
    """``lower_train_step`` on one device with grad_accum_steps = 1 (its scan would
    count one micro-batch; A micro-batches are the FLOPs of one pass over the batch)."""
    config = config.copy_and_resolve_references()
    config.optimizer.grad_accum_steps = 1
    return lower_train_step(config)


def train_step_flops(config: ml_collections.ConfigDict, *, hardware: bool = False) -> float:
    """FLOPs of one optimizer step of the trainer on ``config.batch_size`` images.

    Everything in the step is counted: loss, noise, Adam, EMA, finiteness check.
    """
    return _count(_lower_train_step_unaccumulated, config, hardware=hardware)


def train_step_flop_counts(config: ml_collections.ConfigDict) -> tuple[float, float]:
    """(model, hardware) FLOPs of one train step; hardware is only counted apart with remat."""
    model = train_step_flops(config)
    if not config.model.get("remat", False):
        return model, model
    return model, train_step_flops(config, hardware=True)


def sampler_flops(config: ml_collections.ConfigDict, options: samplers.SamplerOptions,
                  batch: int) -> dict[str, float]:
    """FLOPs of one call of ``sampling.make_sample_fn`` drawing ``batch`` images.

    Args:
      config: the run config (model, schedule).
      options: the sampler settings; guidance is dropped for unconditional
        models, as ``make_sample_fn`` does.
      batch: images per call.

    Returns:
      ``{"model_evaluations", "flops_per_forward", "flops_per_call"}``:
      network evaluations per sample (a guided one counts 2), FLOPs of one
      forward of ``batch`` images, and their product.
    """
    if not config.model.num_classes:
        options = dataclasses.replace(options, guidance_scale=0.0)
    grid = samplers.logsnr_grid(
        options, schedules.from_config(config.schedule),
        num_timesteps=schedules.num_timesteps_from_config(config.schedule))
    evaluations = samplers.num_model_evaluations(options, grid)
    per_forward = forward_flops(config.model, batch)
    return {"model_evaluations": evaluations, "flops_per_forward": per_forward,
            "flops_per_call": evaluations * per_forward}
