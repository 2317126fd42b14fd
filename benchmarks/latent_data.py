r"""Latent-diffusion data paths compared: encoding each batch on the fly vs a cached latent dataset.

  .venv/bin/python benchmarks/latent_data.py [configs/latent_fashion_mnist.py] [steps=50]

Needs the config's trained autoencoder (latent.autoencoder_workdir). For each of
``config.latent.data`` = 'on_the_fly' and 'cached', in one process: the set-up time
(the cache: one encoder pass over the training split), the seconds per step of the
data path alone (iterator + ``LatentSpace.encode_batch``) and of data + train step.
Prints one JSON object with the load average before and after (wall times on a
shared CPU depend on it). docs/latent.md has a measured result.
"""

import importlib.util
import json
import sys
import time

import jax

from simple_diffusion import latent
from simple_diffusion import models
from simple_diffusion import optimizer as optimizer_lib
from simple_diffusion import sharding
from simple_diffusion import train_step as train_step_lib


def _load_config(path):
    spec = importlib.util.spec_from_file_location("latent_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(path: str = "configs/latent_fashion_mnist.py", steps: int = 50) -> dict:
    config = _load_config(path)
    config.latent.scale_factor = 1.0  # Irrelevant to the speed; skips computing it.
    mesh = sharding.create_mesh(-1, 1)
    batch_sh = sharding.batch_sharding(mesh)
    space = latent.LatentSpace(config, mesh)
    to_global = lambda b: {k: jax.make_array_from_process_local_data(batch_sh, v)
                           for k, v in b.items()}
    model = models.create_model(config.model)
    tx = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
    _, state_sh = train_step_lib.state_shardings(model, tx, config, mesh)
    state = train_step_lib.create_sharded_state(model, tx, config, state_sh)
    step_fn = train_step_lib.jit_train_step(model, tx, config, mesh, state_sh)
    out = {"config": path, "steps": steps, "batch_size": config.batch_size,
           "load_before": open("/proc/loadavg").read().split()[:3]}
    for mode in ("on_the_fly", "cached"):
        config.latent.data = mode
        start = time.time()
        it = space.input_iterator(0)
        setup = time.time() - start
        batch = space.encode_batch(to_global(next(it)), 0)
        state, metrics = step_fn(state, batch)  # Compiles.
        jax.block_until_ready(metrics)
        start = time.time()
        for i in range(1, steps + 1):
            jax.block_until_ready(space.encode_batch(to_global(next(it)), i))
        data_s = (time.time() - start) / steps
        start = time.time()
        for i in range(steps + 1, 2 * steps + 1):
            state, metrics = step_fn(state, space.encode_batch(to_global(next(it)), i))
        jax.block_until_ready(metrics)
        step_s = (time.time() - start) / steps
        it.close()
        out[mode] = dict(setup_s=setup, data_s_per_step=data_s, data_and_train_s_per_step=step_s,
                         examples_per_s=config.batch_size / step_s)
    out["load_after"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(*(sys.argv[1:2] or []), *([int(sys.argv[2])] if len(sys.argv) > 2 else []))
