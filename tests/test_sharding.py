"""Mesh construction, logical-to-mesh mapping and sharded train-state placement."""

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from simple_diffusion import models
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import sharding
from simple_diffusion import train_step as train_step_lib


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape(8, -1, 1) == (8, 1)
    assert sharding.mesh_shape(8, -1, 4) == (2, 4)
    assert sharding.mesh_shape(8, 2, -1) == (2, 4)
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        sharding.mesh_shape(8, -1, 3)
    with pytest.raises(ValueError, match="JAX sees 8"):
        sharding.mesh_shape(8, 2, 2)


def test_logical_to_spec_priority_divisibility_and_single_use():
    mesh = sharding.create_mesh(2, 4)
    # 'embed' has priority over 'mlp'; each mesh axis used once.
    assert sharding.logical_to_spec(("embed", "mlp"), (16, 64), mesh) == P("fsdp", None)
    # 'embed' dim 6 is not divisible by 4: falls to the next rule ('mlp').
    assert sharding.logical_to_spec(("embed", "mlp"), (6, 64), mesh) == P(None, "fsdp")
    # Nothing divides: replicated.
    assert sharding.logical_to_spec((None, None, "conv_in", "conv_out"), (3, 3, 6, 3),
                                    mesh) == P(None, None, None, None)
    # fsdp of size 1 never shards.
    mesh_dp = sharding.create_mesh(8, 1)
    assert sharding.logical_to_spec(("embed",), (64,), mesh_dp) == P(None)


def _state_specs(config, mesh):
    model = models.create_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
    abstract, shardings = train_step_lib.state_shardings(model, tx, config, mesh)
    return abstract, jax.tree.map(lambda s: s.spec, shardings)


def test_fsdp_state_specs_params_opt_state_and_ema_agree(tiny_config):
    config = tiny_config
    config.mesh.data, config.mesh.fsdp = 2, 4
    mesh = sharding.create_mesh(2, 4)
    abstract, specs = _state_specs(config, mesh)
    param_specs = jax.tree.leaves(specs["params"], is_leaf=lambda x: isinstance(x, P))
    param_shapes = jax.tree.leaves(abstract["params"])
    # A real FSDP layout: a good part of the parameter bytes is sharded over fsdp.
    sharded = sum(np.prod(a.shape) for a, s in zip(param_shapes, param_specs) if "fsdp" in s)
    total = sum(np.prod(a.shape) for a in param_shapes)
    assert sharded / total > 0.5, (sharded, total)
    for a, s in zip(param_shapes, param_specs):
        for dim, axis in zip(a.shape, s):
            if axis is not None:
                assert dim % mesh.shape[axis] == 0
    # EMA copies are placed like the params.
    for ema_specs in specs["ema"]:
        assert jax.tree.leaves(ema_specs, is_leaf=lambda x: isinstance(x, P)) == param_specs
    # Adam moments are placed like the params; counters are replicated.
    adam = specs["opt_state"][1][0]
    assert jax.tree.leaves(adam.mu, is_leaf=lambda x: isinstance(x, P)) == param_specs
    assert jax.tree.leaves(adam.nu, is_leaf=lambda x: isinstance(x, P)) == param_specs
    assert adam.count == P()
    assert specs["step"] == P()


def test_data_parallel_state_is_replicated(tiny_config):
    config = tiny_config
    mesh = sharding.create_mesh(8, 1)
    _, specs = _state_specs(config, mesh)
    for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
        assert all(axis is None for axis in s)
