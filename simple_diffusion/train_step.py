"""The train state and the pure, jit-able train step.

The train state is a plain dict pytree (orbax saves and restores it as is):
  * ``step``: int32 scalar, number of optimizer steps taken.
  * ``params``: model parameters (float32).
  * ``opt_state``: optax state.
  * ``ema``: list of parameter trees, one per decay in ``config.ema_decays``.
  * ``nonfinite_step``: int32 scalar, the first step whose loss or gradient was
    not finite, or -1. Such a step is not applied, so the state stays finite;
    the host checks this field at log and checkpoint time and stops the run.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax

from simple_diffusion import losses
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import schedules
from simple_diffusion import sharding as sharding_lib
from simple_diffusion import xla_cpu

State = dict[str, Any]


def model_fn_from(model: nn.Module, params: Any, labels: jax.Array | None, *,
                  train: bool, dropout_rng: jax.Array | None = None) -> Callable:
    """Closes the model over its params: ``(z, logsnr) -> raw prediction``."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}

    def model_fn(z, logsnr):
        return model.apply({"params": params}, z, logsnr, labels, train=train, rngs=rngs)

    return model_fn


def init_state(model: nn.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict, rng: jax.Array, *, boxed: bool = False) -> State:
    """Initial train state. With ``boxed`` the params keep their logical boxes
    (only meaningful under ``jax.eval_shape``, to read the partitioning)."""
    size, channels = config.model.image_size, config.model.in_channels
    z = jnp.zeros((1, size, size, channels), jnp.float32)
    logsnr = jnp.zeros((1,), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
    params_rng, dropout_rng = jax.random.split(rng)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, z, logsnr, labels,
                           train=False)
    params = variables["params"]
    if boxed:
        return {"params": params}
    params = nn.meta.unbox(params)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "ema": [params for _ in config.ema_decays],
        "nonfinite_step": jnp.full((), -1, jnp.int32),
    }


def sharded_abstract_params(model: nn.Module, config: ml_collections.ConfigDict,
                            mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """Abstract params (``ShapeDtypeStruct`` carrying their FSDP shardings), and the
    shardings alone; nothing is allocated."""
    boxed = jax.eval_shape(functools.partial(init_state, model, None, config, boxed=True),
                           jax.random.key(0))["params"]
    shardings = sharding_lib.param_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return abstract, shardings


def state_shardings(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                    ) -> tuple[State, State]:
    """Abstract train state and its shardings, without allocating anything.

    Returns:
      (abstract_state, shardings): trees of ``jax.ShapeDtypeStruct`` and of
      ``NamedSharding``. Parameters, Adam moments and EMA copies are sharded
      alike (FSDP from logical axis names); scalars are replicated.
    """
    abstract = jax.eval_shape(functools.partial(init_state, model, tx, config), jax.random.key(0))
    _, params_sh = sharded_abstract_params(model, config, mesh)
    replicated = sharding_lib.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], params_sh,
                                   transform_non_params=lambda _: replicated)
    shardings = {
        "step": replicated,
        "params": params_sh,
        "opt_state": opt_sh,
        "ema": [params_sh for _ in config.ema_decays],
        "nonfinite_step": replicated,
    }
    return abstract, shardings


def create_sharded_state(model: nn.Module, tx: optax.GradientTransformation,
                         config: ml_collections.ConfigDict, shardings: State) -> State:
    """Initialises the train state directly into ``shardings`` (from state_shardings):
    the unsharded model never exists on one device. Seeded by ``config.seed``."""
    key = jax.random.key(config.seed)
    init = jax.jit(functools.partial(init_state, model, tx, config),
                   out_shardings=shardings).lower(key)
    # XLA:CPU's optimiser spends ~0.5 s per random initialiser (35 s for the
    # tiny model); init runs once, so on CPU it is compiled unoptimised.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return init.compile(compiler_options=options)(key)


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """EMA with the usual warm-up: the effective decay is min(decay, (1+n)/(10+n))
    so early averages are not dominated by the random initialisation."""
    step = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def drop_labels(rng: jax.Array, labels: jax.Array, num_classes: int, drop_prob: float) -> jax.Array:
    """Replaces labels by the null class ``num_classes`` with prob. ``drop_prob``
    (classifier-free guidance training)."""
    drop = jax.random.bernoulli(rng, drop_prob, labels.shape)
    return jnp.where(drop, num_classes, labels)


def apply_gradients(state: State, grads: Any, loss: jax.Array,
                    tx: optax.GradientTransformation, ema_decays) -> tuple[State, jax.Array]:
    """One optimizer step and EMA update of ``state`` with ``grads``.

    A step whose loss or gradient norm is not finite is dropped: the state is
    kept (but ``step`` advances) and ``nonfinite_step`` records the first such
    step. Returns (new_state, gradient global norm).
    """
    step, params = state["step"], state["params"]
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {
        "step": step + 1,
        "params": new_params,
        "opt_state": opt_state,
        "ema": [ema_update(e, new_params, d, step) for e, d in zip(state["ema"], ema_decays)],
        "nonfinite_step": state["nonfinite_step"],
    }
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = jax.tree.map(keep, new_state, state)
    new_state["step"] = step + 1
    new_state["nonfinite_step"] = jnp.where(
        (~finite) & (state["nonfinite_step"] < 0), step, state["nonfinite_step"])
    return new_state, grad_norm


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, logsnr_fn: Callable,
                    lr_schedule: optax.Schedule, batch_sharding: jax.sharding.NamedSharding
                    ) -> Callable[[State, dict[str, jax.Array]], tuple[State, dict[str, jax.Array]]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``.

    ``batch`` holds the global batch: ``image`` float32 [B, H, W, C] in [-1, 1]
    and ``label`` int32 [B], sharded over the batch axes. The step's randomness
    is ``fold_in(key(config.seed), step)``, drawn for the global batch, so it is
    the same for any device count or process layout. With
    ``config.optimizer.grad_accum_steps = A`` the batch is split into A
    micro-batches whose gradients are averaged in a ``lax.scan``.
    """
    num_classes = config.model.num_classes
    accum = config.optimizer.grad_accum_steps
    loss_kwargs = losses.kwargs_from_config(
        config.loss, image_size=config.model.image_size,
        num_timesteps=schedules.num_timesteps_from_config(config.schedule))

    def micro_loss(params, image, label, rng):
        label_rng, dropout_rng, loss_rng = jax.random.split(rng, 3)
        labels = None
        if num_classes:
            labels = drop_labels(label_rng, label, num_classes, config.cond_drop_prob)
        model_fn = model_fn_from(model, params, labels, train=True, dropout_rng=dropout_rng)
        return losses.diffusion_loss(model_fn, image, loss_rng, logsnr_fn=logsnr_fn, **loss_kwargs)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(jax.random.key(config.seed), step)
        params = state["params"]
        if accum == 1:
            (loss, metrics), grads = grad_fn(params, batch["image"], batch["label"], rng)
        else:
            # [B, ...] -> [B/A, A, ...] keeps each device's rows on the device;
            # micro-batch i is column i.
            def split(x):
                x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
                return jnp.moveaxis(x, 1, 0)

            micro = jax.tree.map(split, batch)

            def body(carry, inputs):
                i, mb = inputs
                mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), mb)
                (loss_i, metrics_i), grads_i = grad_fn(params, mb["image"], mb["label"],
                                                      jax.random.fold_in(rng, i))
                carry = jax.tree.map(jnp.add, carry, (grads_i, metrics_i))
                return carry, None

            zeros = jax.tree.map(jnp.zeros_like, params)
            zero_metrics = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                jax.eval_shape(lambda: grad_fn(params, micro["image"][0], micro["label"][0],
                                               rng)[0][1]))
            (grads, metrics), _ = jax.lax.scan(body, (zeros, zero_metrics),
                                               (jnp.arange(accum), micro))
            grads = jax.tree.map(lambda g: g / accum, grads)
            metrics = jax.tree.map(lambda m: m / accum, metrics)
            loss = metrics["loss"]

        new_state, grad_norm = apply_gradients(state, grads, loss, tx, config.ema_decays)
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(step))
        return new_state, metrics

    return train_step


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   shardings: State) -> Callable:
    """The train step jitted with explicit shardings and the state donated
    (updated in place: no second copy of params, Adam moments and EMA), with
    `xla_cpu.compiler_options()`."""
    lr_schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_train_steps)
    logsnr_fn = schedules.from_config(config.schedule)
    batch_sh = sharding_lib.batch_sharding(mesh)
    step = make_train_step(model, tx, config, logsnr_fn, lr_schedule, batch_sh)
    return jax.jit(step, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)),
                   donate_argnums=(0,), compiler_options=xla_cpu.compiler_options())


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient."""


def check_finite(state: dict[str, Any], advice: str, *, key: str = "nonfinite_step",
                 what: str = "loss or gradient") -> None:
    """Raises NonFiniteLossError if ``state[key]`` (int32 scalar: the first step whose
    update was skipped for a non-finite value, -1 if none) records one.

    One device-to-host read: call it at log/checkpoint steps, not every step.
    """
    bad = int(jax.device_get(state[key]))
    if bad >= 0:
        raise NonFiniteLossError(
            f"Non-finite {what} at step {bad} (that update was skipped; no non-finite "
            f"checkpoint was written). {advice}")


def mean_metrics(pending: list[dict]) -> dict[str, float]:
    """The mean of each metric over the steps in ``pending`` (device dicts), fetched
    with one host transfer; a key missing from some steps averages over the others."""
    host = jax.device_get(pending)
    keys = sorted({k for m in host for k in m})
    return {k: float(np.mean([m[k] for m in host if k in m])) for k in keys}
