"""FLOP counts of scanned and rematerialised models equal those of the unrolled program.

XLA's cost analysis counts a loop body once; ``simple_diffusion.flops`` counts an
unrolled copy of the model at transformer depths 1 and 2 and extrapolates. These
tests compare it with the cost analysis of the fully unrolled program itself.
"""

import dataclasses

import jax
import pytest

from conftest import load_config
from simple_diffusion import flops
from simple_diffusion import models
from simple_diffusion import samplers
from simple_diffusion import schedules

_DEPTH = 4


def _tiny(*, scanned: bool, depth: int = _DEPTH):
    """configs/tiny.py at transformer depth ``depth``, scanned and rematerialised or not."""
    config = load_config("tiny")
    config.model.transformer_depth = depth
    config.model.scan_layers = scanned
    config.model.remat = scanned
    return config


def test_scanned_remat_train_step_counts_as_the_unrolled_program():
    direct = flops.xla_flops(flops.lower_train_step(_tiny(scanned=False)))
    scanned = flops.train_step_flops(_tiny(scanned=True))
    assert scanned == pytest.approx(direct, rel=0.01)
    # What the count corrects: XLA alone sees one scanned block of the four.
    naive = flops.xla_flops(flops.lower_train_step(_tiny(scanned=True)))
    assert naive < 0.75 * direct


def test_scanned_forward_counts_as_the_unrolled_program():
    unrolled = _tiny(scanned=False).model
    direct = flops.xla_flops(flops._lower_forward(3, train=False, backward=False)(unrolled))
    assert flops.forward_flops(_tiny(scanned=True).model, 3) == pytest.approx(direct, rel=0.01)


def test_hardware_flops_add_the_remat_recompute():
    config = _tiny(scanned=True)
    remat_unrolled = config.copy_and_resolve_references()
    remat_unrolled.model = flops.unrolled_model_config(config.model, keep_remat=True)
    direct = flops.xla_flops(flops.lower_train_step(remat_unrolled))
    hardware = flops.train_step_flops(config, hardware=True)
    assert hardware == pytest.approx(direct, rel=0.01)
    model = flops.train_step_flops(config)
    # The recomputed forward: between a fifth and a half of fwd+bwd on top.
    assert 1.2 * model < hardware < 1.5 * model
    no_remat = _tiny(scanned=False).model
    assert (flops.forward_backward_flops(no_remat, 2, hardware=True)
            == flops.forward_backward_flops(no_remat, 2))


def test_gradient_accumulation_does_not_change_the_count():
    config = _tiny(scanned=False, depth=1)
    accumulated = config.copy_and_resolve_references()
    accumulated.optimizer.grad_accum_steps = 4
    direct = flops.xla_flops(flops.lower_train_step(config))
    assert flops.train_step_flops(accumulated) == pytest.approx(direct, rel=1e-6)


def test_one_block_is_the_analytic_matmul_count_plus_elementwise():
    batch, model_config = 2, _tiny(scanned=False).model
    one, two = (flops.forward_flops(flops.unrolled_model_config(model_config, depth=d), batch)
                for d in (1, 2))
    tokens = (model_config.image_size // model_config.patch_size // 2) ** 2  # One conv level.
    d, r = model_config.transformer_width, model_config.mlp_ratio
    # qkv + output projections, the MLP, and q k^T plus attention x v, at 2 FLOPs a MAC.
    matmuls = 2 * batch * tokens * (4 * d * d + 2 * r * d * d) + 4 * batch * tokens**2 * d
    assert matmuls <= two - one < 1.15 * matmuls


def test_sampler_flops_match_an_unrolled_guided_sampler_loop():
    config = _tiny(scanned=True, depth=2)
    options = samplers.SamplerOptions(sampler="ddpm", num_steps=3, guidance_scale=2.0)
    batch = 2
    counted = flops.sampler_flops(config, options, batch)
    assert counted["model_evaluations"] == 2 * 3  # A guided evaluation runs 2B images.
    assert counted["flops_per_call"] == pytest.approx(
        counted["model_evaluations"] * flops.forward_flops(config.model, batch))

    unrolled = flops.unrolled_model_config(config.model)
    model = models.create_model(unrolled)
    params, z, _, labels = flops._model_inputs(unrolled, batch)

    def sample(p, lab):
        model_fn = lambda x, logsnr, y: model.apply({"params": p}, x, logsnr, y, train=False)
        return samplers.sample(model_fn, jax.random.key(0), options,
                               logsnr_fn=schedules.from_config(config.schedule), shape=z.shape,
                               labels=lab, null_label=unrolled.num_classes, use_scan=False)

    direct = flops.xla_flops(jax.jit(sample).lower(params, labels))
    # The direct count also has the sampler's own arithmetic (the updates, guidance).
    assert counted["flops_per_call"] == pytest.approx(direct, rel=0.02)


def test_heun_makes_2n_minus_1_evaluations():
    config = _tiny(scanned=False, depth=1)
    options = samplers.SamplerOptions(sampler="heun", num_steps=3)
    assert flops.sampler_flops(config, options, 1)["model_evaluations"] == 2 * 3 - 1
    guided = dataclasses.replace(options, guidance_scale=1.0)
    assert flops.sampler_flops(config, guided, 1)["model_evaluations"] == 2 * (2 * 3 - 1)
