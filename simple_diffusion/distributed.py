"""Multi-process start-up: one guarded call to `jax.distributed.initialize`.

A training job is one process per host (TPU pod worker, GPU node) or per GPU.
Every process runs the same command; `initialize` is the first thing the entry
point calls, before anything touches a JAX backend. Where the settings come
from, in order:

1. Explicit arguments (the `--coordinator_address`, `--num_processes` and
   `--process_id` flags of `simple_diffusion.main`).
2. Environment variables `SIMPLE_DIFFUSION_COORDINATOR`,
   `SIMPLE_DIFFUSION_NUM_PROCESSES`, `SIMPLE_DIFFUSION_PROCESS_ID` (what
   `launch/gpu_nodes.sh` sets); JAX's own `JAX_COORDINATOR_ADDRESS` also counts
   as the coordinator.
3. A cluster that JAX itself knows how to read (Cloud TPU multi-worker slices,
   SLURM under `srun`, Open MPI's `mpirun`, Kubernetes indexed jobs) and that
   holds more than one process.
4. Otherwise a single process: nothing is initialised.
"""

from __future__ import annotations

import logging
import os
import socket

import jax
# JAX keeps its cluster detection private; reusing it keeps our notion of "in a
# cluster" identical to what `jax.distributed.initialize()` will then read.
from jax._src import clusters

COORDINATOR_ENV = "SIMPLE_DIFFUSION_COORDINATOR"
NUM_PROCESSES_ENV = "SIMPLE_DIFFUSION_NUM_PROCESSES"
PROCESS_ID_ENV = "SIMPLE_DIFFUSION_PROCESS_ID"
_JAX_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"

_HOW_TO_SET = (
    "Set all three of coordinator address, process count and process id (flags "
    "--coordinator_address/--num_processes/--process_id, or environment "
    f"variables {COORDINATOR_ENV}/{NUM_PROCESSES_ENV}/{PROCESS_ID_ENV}), or "
    "none of them to auto-detect a cluster or run as a single process."
)


def _env_int(name: str) -> int | None:
    """Reads an integer environment variable; unset or empty means None."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer.") from None


def _validate(coordinator_address: str | None, num_processes: int | None,
              process_id: int | None) -> None:
    """Rejects values that can never work, whatever fills in the rest."""
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
    if process_id is not None and process_id < 0:
        raise ValueError(f"process_id must be >= 0, got {process_id}.")
    if (num_processes is not None and process_id is not None and
            process_id >= num_processes):
        raise ValueError(
            f"process_id={process_id} is out of range for "
            f"num_processes={num_processes} (ids run 0..{num_processes - 1}).")
    if coordinator_address is not None:
        host, sep, port = coordinator_address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"coordinator_address={coordinator_address!r} must be HOST:PORT "
                "(the address of process 0 and a free port on it), e.g. "
                "10.0.0.1:12345.")


def _detect_cluster() -> type[clusters.ClusterEnv] | None:
    """Returns the multi-process cluster JAX would bootstrap from, if any.

    Follows JAX's own order and skips its opt-in methods (mpi4py: an installed
    package is no evidence of an MPI launch). A cluster of one process (e.g.
    `srun -n1`, a single-host TPU VM) counts as none: there is nobody to talk to.
    """
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
        if env.opt_in_only_method or not env.is_env_present():
            continue
        return env if env.get_process_count() > 1 else None
    return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: list[int] | None = None) -> bool:
    """Starts JAX's multi-process runtime when this run has more than one process.

    Call before any other JAX use (JAX refuses once a backend exists). Explicit
    arguments win over environment variables, which win over a detected cluster;
    see the module docstring. Calling it again is harmless.

    Args:
      coordinator_address: HOST:PORT of process 0, reachable from every process.
      num_processes: Total number of processes in the job.
      process_id: This process's index, in [0, num_processes).
      local_device_ids: Restricts this process to these local devices (e.g. one
        GPU per process). Only meaningful for a multi-process run.

    Returns:
      True if the multi-process runtime is running (now or from an earlier
      call), False for a single-process run.

    Raises:
      ValueError: Settings that are partial without a cluster to complete them,
        out of range, malformed, or that disagree with the detected cluster or
        an earlier initialisation.
    """
    coordinator_address = (coordinator_address or os.environ.get(COORDINATOR_ENV) or
                           os.environ.get(_JAX_COORDINATOR_ENV) or None)
    if num_processes is None:
        num_processes = _env_int(NUM_PROCESSES_ENV)
    if process_id is None:
        process_id = _env_int(PROCESS_ID_ENV)
    _validate(coordinator_address, num_processes, process_id)

    if jax.distributed.is_initialized():
        running = {"num_processes": jax.process_count(), "process_id": jax.process_index()}
        wanted = {"num_processes": num_processes, "process_id": process_id}
        for key, value in wanted.items():
            if value is not None and value != running[key]:
                raise ValueError(f"Already initialised with {key}={running[key]}, "
                                 f"asked again with {key}={value}.")
        return True

    given = {"coordinator_address": coordinator_address,
             "num_processes": num_processes, "process_id": process_id}
    missing = [key for key, value in given.items() if value is None]
    if not missing:
        source = "explicit settings"
    else:
        cluster = _detect_cluster()
        if cluster is None:
            if len(missing) < len(given):
                present = ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
                raise ValueError(
                    f"Incomplete multi-process settings: got {present} but not "
                    f"{', '.join(missing)}, and no multi-process cluster was "
                    f"detected to supply them. {_HOW_TO_SET}")
            if local_device_ids is not None:
                raise ValueError(
                    f"local_device_ids={local_device_ids} only applies to a "
                    f"multi-process run, and none is configured. {_HOW_TO_SET}")
            logging.info("No multi-process settings or cluster found: single process.")
            return False
        # A partial setting on a cluster may only restate what the cluster says
        # (a coordinator address is an override JAX supports, e.g. another port).
        detected = {"num_processes": cluster.get_process_count(),
                    "process_id": cluster.get_process_id()}
        for key, value in detected.items():
            if given[key] is not None and given[key] != value:
                raise ValueError(
                    f"{key}={given[key]} contradicts the {cluster.name} cluster, "
                    f"which says {key}={value}. {_HOW_TO_SET}")
        source = f"the {cluster.name} cluster environment"

    logging.info("Initialising jax.distributed from %s: %s", source, given)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
    return True


def describe() -> str:
    """One log line about this process and the devices it sees.

    Initialises the JAX backend, so call it after `initialize`.
    """
    local = jax.local_devices()
    return (f"process {jax.process_index()}/{jax.process_count()} on "
            f"{socket.gethostname()}: {len(local)} local of {jax.device_count()} "
            f"global devices, platform {local[0].platform} ({local[0].device_kind}), "
            f"local device ids {[d.id for d in local]}")
