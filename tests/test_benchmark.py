"""The benchmark on the tiny config: every JSON field present, positive and consistent.

Speed itself is never asserted (the CI machine is shared and noisy).
"""

import json
import statistics

import jax
import pytest

from conftest import load_config
from simple_diffusion import benchmark

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

    device, peak, train, sample = (results["device"], results["peak"], results["train"],
                                   results["sample"])
    assert device["device_count"] == jax.device_count()
    assert peak["size"] == 256 and peak["dtype"] == config.model.dtype
    assert _close(peak["flops_per_sec_per_device"], 2 * 256**3 / peak["seconds"])
    assert peak["seconds"] <= peak["seconds_median"]
    assert _close(peak["flops_per_sec"], peak["flops_per_sec_per_device"] * jax.device_count())

    # Train step.
    for key in ("compile_seconds", "trace_seconds", "first_step_seconds", "step_seconds",
                "loop_step_seconds", "images_per_sec", "flops_per_step", "flops_per_sec", "mfu"):
        assert train[key] > 0, key
    assert train["batch_size"] == config.batch_size
    assert len(train["step_seconds_all"]) == _REPEATS
    assert _close(train["step_seconds"], statistics.median(train["step_seconds_all"]))
    assert _close(train["step_seconds_min"], min(train["step_seconds_all"]))
    assert _close(train["images_per_sec"], config.batch_size / train["step_seconds"])
    assert _close(train["flops_per_sec"], train["flops_per_step"] / train["step_seconds"])
    assert _close(train["mfu"], train["flops_per_sec"] / peak["flops_per_sec"])
    assert train["step_cpu_seconds"] > 0 and train["mfu_cpu_time"] > 0
    # Forward + backward is at least 3 x (2 FLOPs per parameter per image).
    assert train["flops_per_step"] >= 6 * train["num_params"] * config.batch_size
    assert 30_000 < train["num_params"] < 45_000  # The tiny preset (~37k).
    mem = train["memory"]
    assert mem["argument_bytes"] >= train["state_bytes_per_device"] > 0
    assert mem["peak_bytes"] >= mem["temp_bytes"] > 0
    assert train["loss"] > 0

    # Sampling.
    assert sample["num_steps"] == _SAMPLE_STEPS == sample["model_calls"]
    assert sample["batch"] % jax.device_count() == 0
    assert sample["extrapolated_to_256_steps"] is True
    assert sample["bare_output_finite"] is True
    for key in ("compile_seconds", "seconds", "seconds_per_step", "bare_model_seconds",
                "images_per_sec_256_steps", "flops_per_call"):
        assert sample[key] > 0, key
    assert _close(sample["seconds_per_step"] * _SAMPLE_STEPS, sample["seconds"])
    assert _close(sample["images_per_sec_256_steps"],
                  sample["batch"] / (256 * sample["seconds_per_step"]))
    assert _close(sample["overhead_fraction"],
                  1 - sample["bare_model_seconds"] / sample["seconds"])
    assert sample["overhead_fraction"] < 1 and sample["overhead_fraction_paired"] < 1


def test_markdown_table_lists_the_headline_numbers(results):
    table = benchmark.markdown_table(results)
    lines = table.splitlines()
    assert lines[0] == "| metric | value |"
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    text = "\n".join(lines)
    for label in ("train step (median)", "MFU (vs matmul peak)", "sampler compile",
                  "(extrapolated)", "loop overhead"):
        assert label in text, label
    assert f"{results['train']['images_per_sec']:.1f}" in text
