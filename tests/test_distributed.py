"""Tests for simple_diffusion.distributed.

The multi-process tests are real: two Python processes on localhost, four
simulated CPU devices each, joined through `jax.distributed` into one
eight-device job that runs a cross-process reduction.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from simple_diffusion import distributed

# Variables through which a process could believe it is part of a cluster; the
# tests clear them so the machine running the suite cannot change the outcome.
_CLUSTER_VARS = (
    distributed.COORDINATOR_ENV, distributed.NUM_PROCESSES_ENV,
    distributed.PROCESS_ID_ENV, "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT",
    "JAX_LOCAL_DEVICE_IDS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
    "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri",
    "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
)

# Each process contributes rows 100 * process_id + [0, 12) as a (4, 3) block, so
# the global (8, 3) array sums to 2 * 66 + 100 * 12 only if both blocks meet.
_EXPECTED_SUM = 2 * 66 + 100 * 12

_WORKER = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from simple_diffusion import distributed

    mode, pid = sys.argv[1], int(sys.argv[2])
    if mode == "flags":
        first = distributed.initialize(sys.argv[3], 2, pid)
    else:
        first = distributed.initialize()
    again = distributed.initialize()
    try:
        distributed.initialize(process_id=1 - pid)
        mismatch = None
    except ValueError as e:
        mismatch = str(e)
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    local = np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * jax.process_index()
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps({
        "first": first, "again": again, "mismatch": mismatch, "process_index": jax.process_index(),
        "process_count": jax.process_count(), "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(), "global_shape": list(x.shape),
        "sum": float(total), "describe": distributed.describe()}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARS}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return env


def _run_two(args_and_envs) -> list[dict]:
    """Runs the worker in two processes at once and returns their reports."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args, env in args_and_envs
    ]
    reports = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return reports


def _assert_joined(reports):
    assert [r["process_index"] for r in reports] == [0, 1]
    for r in reports:
        assert r["first"] is True and r["again"] is True
        assert r["mismatch"].startswith(
            f"Already initialised with process_id={r['process_index']}")
        assert r["process_count"] == 2
        assert r["device_count"] == 8 and r["local_device_count"] == 4
        assert r["global_shape"] == [8, 3]
        assert r["sum"] == _EXPECTED_SUM
        assert r["describe"].startswith(f"process {r['process_index']}/2 on ")
        assert "4 local of 8 global devices, platform cpu" in r["describe"]


def test_two_processes_from_explicit_arguments():
    address = f"127.0.0.1:{_free_port()}"
    env = _base_env()
    _assert_joined(_run_two([(("flags", "0", address), env), (("flags", "1", address), env)]))


def test_two_processes_from_environment_variables():
    # Process 0 uses this project's variables, process 1 JAX's own coordinator
    # variable: both spellings must land in the same job.
    port = _free_port()
    envs = []
    for pid in range(2):
        env = _base_env()
        env[distributed.NUM_PROCESSES_ENV] = "2"
        env[distributed.PROCESS_ID_ENV] = str(pid)
        key = distributed.COORDINATOR_ENV if pid == 0 else "JAX_COORDINATOR_ADDRESS"
        env[key] = f"127.0.0.1:{port}"
        envs.append((("env", str(pid)), env))
    _assert_joined(_run_two(envs))


def test_two_processes_auto_detected_from_slurm_environment():
    # What `srun --ntasks=2` exports on a one-node allocation. Process 0 relies on
    # detection alone (JAX takes the coordinator host from the node list, the port
    # from JAX_COORDINATOR_PORT); process 1 gets the coordinator and count the way
    # launch/slurm_gpu.sbatch exports them, and its id from SLURM_PROCID.
    port = _free_port()
    envs = []
    for pid in range(2):
        env = _base_env()
        env.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                   SLURM_PROCID=str(pid), SLURM_LOCALID=str(pid))
        if pid == 0:
            env["JAX_COORDINATOR_PORT"] = str(port)
        else:
            env[distributed.COORDINATOR_ENV] = f"127.0.0.1:{port}"
            env[distributed.NUM_PROCESSES_ENV] = "2"
        envs.append((("env", str(pid)), env))
    _assert_joined(_run_two(envs))


@pytest.fixture(name="clean_env")
def fixture_clean_env(monkeypatch):
    for name in _CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_fallback_returns_false(clean_env):
    del clean_env
    assert distributed.initialize() is False


def test_one_task_slurm_step_is_single_process(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "7")
    clean_env.setenv("SLURM_STEP_NODELIST", "node001")
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_LOCALID", "0")
    assert distributed.initialize() is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2), "Incomplete multi-process settings: got num_processes=2 but not "
                            "coordinator_address, process_id"),
    (dict(coordinator_address="10.0.0.1:1234", process_id=0), "but not num_processes"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), "out of range"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=0, process_id=0), ">= 1"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=-1), ">= 0"),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="10.0.0.1:99999", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(local_device_ids=[0]), "only applies to a multi-process run"),
])
def test_inconsistent_arguments_raise(clean_env, kwargs, message):
    del clean_env
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        distributed.initialize(**kwargs)


def test_partial_environment_raises(clean_env):
    clean_env.setenv(distributed.PROCESS_ID_ENV, "1")
    with pytest.raises(ValueError, match="got process_id=1 but not coordinator_address"):
        distributed.initialize()


def test_non_integer_environment_raises(clean_env):
    clean_env.setenv(distributed.NUM_PROCESSES_ENV, "two")
    with pytest.raises(ValueError, match=f"{distributed.NUM_PROCESSES_ENV}='two'"):
        distributed.initialize()


def test_setting_contradicting_the_cluster_raises(clean_env):
    for name, value in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[001-002]",
                            SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0").items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match="process_id=0 contradicts the slurm cluster"):
        distributed.initialize(process_id=0)


def test_describe_in_single_process():
    line = distributed.describe()
    assert line.startswith("process 0/1 on ")
    assert f"{jax.local_device_count()} local of {jax.device_count()} global devices" in line
