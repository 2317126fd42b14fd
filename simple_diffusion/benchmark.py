r"""Benchmarks: train-step throughput and MFU, sampling, FLOPs, the first-GPU run.

  python -m simple_diffusion.benchmark [all] --config=configs/tiny.py --sample_steps=16
  python -m simple_diffusion.benchmark train --config=configs/fashion_mnist_demo.py --breakdown
  python -m simple_diffusion.benchmark train --config=configs/imagenet256.py --compile_only \
      --config.mesh.fsdp=1 --config.batch_size=8
  python -m simple_diffusion.benchmark sample --config=configs/tiny.py --samplers=ddpm,heun \
      --sample_steps=32
  python -m simple_diffusion.benchmark flops --config=configs/imagenet256.py \
      --config.batch_size=1 --presets=all
  python -m simple_diffusion.benchmark gpu --config=configs/imagenet256.py \
      --batch_sizes=96,64,32 --output_dir=/tmp/gpu        # what benchmarks/gpu.sh runs

Subcommands (the first positional argument; default ``all``):

  all     train, then every sampler of ``--samplers`` on the trained EMA params.
  train   matmul peak, the trainer's train step (compile, median step time,
          images/s, model and hardware FLOPs, MFU, memory); ``--breakdown`` adds
          the model forward and forward+backward; ``--compile_only`` only
          compiles on abstract inputs (FLOPs and memory of models too big to run).
  sample  each sampler of ``--samplers`` on freshly initialised params: time per
          step, FLOPs per call, overhead beyond the bare network calls.
  flops   FLOPs only (nothing runs, so it is exact on any machine): forward,
          train step (model and hardware), the run's XLA count, a sampler call;
          ``--presets`` adds the forward FLOPs of model presets.
  gpu     ``bench.gpu.run_gpu``: largest batch that fits, MFU, 256-step
          sampling, FSDP vs data mesh; JSON and Markdown into ``--output_dir``.

FLOPs are counted by ``simple_diffusion.flops`` (correct for scanned and
rematerialised models); MFU uses model FLOPs (no remat recompute) over the
matmul peak measured in the same run. Output: a Markdown table on stdout and,
with ``--output``, everything as JSON. Details: docs/benchmarks.md.
"""

from simple_diffusion import cli_start

if __name__ == "__main__":
    # Before the imports below: it may restart the process (execve), which would
    # otherwise redo them (~2 s of jax, flax and TensorFlow imports per command).
    cli_start.prepare_process()

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import os
from typing import Any

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from simple_diffusion import flops
from simple_diffusion import samplers
from simple_diffusion.bench import gpu as gpu_lib
from simple_diffusion.bench import report
from simple_diffusion.bench import sample as sample_lib
from simple_diffusion.bench import timing
from simple_diffusion.bench import train as train_lib
from simple_diffusion.models import presets as presets_lib

SUBCOMMANDS = ("all", "train", "sample", "flops", "gpu")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py).", lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON to this path.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed train steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps after the first.")
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size", 0, "Side of the square peak matmul (0: 2048 on CPU, 8192 otherwise).")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "train: also time the model forward and forward+backward.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "train: only compile the step on abstract inputs (nothing is "
    "allocated); report FLOPs, compile time and memory.")
_SAMPLE_STEPS = flags.DEFINE_integer(
    "sample_steps", sample_lib.REFERENCE_STEPS,
    "Denoising steps actually run; images/s is extrapolated to 256 steps when fewer. "
    "0 skips sampling in `all`.")
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch", 0, "Images per sampler call (0: config.sample.num_images; gpu: 16), "
    "rounded up to a multiple of the device count.")
_SAMPLE_REPEATS = flags.DEFINE_integer("sample_repeats", 3, "Timed sampler calls (median).")
_SAMPLERS = flags.DEFINE_list(
    "samplers", [], f"Samplers to time, of {samplers.SAMPLERS} (default: config.sample's).")
_PRESETS = flags.DEFINE_list(
    "presets", [], "flops: model presets whose forward FLOPs to list ('all': every one).")
_BATCH_SIZES = flags.DEFINE_list(
    "batch_sizes", ["64", "48", "32", "24", "16", "8"],
    "gpu: global batch sizes to try, largest first.")
_TIME_BUDGET = flags.DEFINE_float(
    "time_budget_s", 540.0, "gpu: start the sampling and mesh phases only within this time.")
_MEMORY_LIMIT = flags.DEFINE_integer(
    "memory_limit_bytes", 0, "gpu: skip a batch whose compiled peak per device exceeds this "
    "(0: the device's bytes_limit where reported).")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "gpu: write gpu_benchmark.json and gpu_benchmark.md here.")


def _config_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"model": config.model.get("name"), "dtype": config.model.dtype,
            "image_size": config.model.image_size, "batch_size": config.batch_size,
            "grad_accum_steps": config.optimizer.grad_accum_steps, "mesh": dict(config.mesh),
            "remat": bool(config.model.get("remat", False)),
            "scan_layers": bool(config.model.get("scan_layers", False))}


def _sampler_options(config: ml_collections.ConfigDict, sampler: str,
                     num_steps: int) -> samplers.SamplerOptions:
    """``config.sample``'s settings with the given sampler and step count."""
    options = samplers.SamplerOptions.from_config(config.sample)
    return dataclasses.replace(options, sampler=sampler, num_steps=num_steps)


def run_train(config: ml_collections.ConfigDict, *, repeats: int = 10, warmup: int = 2,
              matmul_size: int = 0, breakdown: bool = False) -> tuple[dict[str, Any], Any]:
    """The ``train`` subcommand: peak, train step, FLOPs and MFU.

    Returns:
      (results, (state, model, mesh)): the JSON-able results and what the
      sampler benchmark reuses.
    """
    results = {"device": timing.describe_devices(), "config": _config_summary(config)}
    results["peak"] = peak = timing.measure_matmul_peak(config.model.dtype, matmul_size)
    train, state, model, mesh = train_lib.benchmark_train_step(
        config, repeats=repeats, warmup=warmup, breakdown=breakdown)
    results["train"] = train_lib.add_flops(train, peak, *flops.train_step_flop_counts(config))
    return results, (state, model, mesh)


def run_benchmark(config: ml_collections.ConfigDict, *, repeats: int = 10, warmup: int = 2,
                  sample_steps: int = sample_lib.REFERENCE_STEPS, sample_batch: int = 0,
                  sample_repeats: int = 3, matmul_size: int = 0, breakdown: bool = False,
                  sampler_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """The default ``all`` subcommand: ``run_train``, then each sampler of
    ``sampler_names`` (default: config.sample.sampler) on the trained EMA params
    (``results["sample"]`` is a list, one entry per sampler; none if sample_steps is 0)."""
    results, (state, model, mesh) = run_train(config, repeats=repeats, warmup=warmup,
                                              matmul_size=matmul_size, breakdown=breakdown)
    if sample_steps > 0:
        results["sample"] = [
            sample_lib.benchmark_sampling(config, model, state["ema"][0], mesh,
                                          _sampler_options(config, name, sample_steps),
                                          batch=sample_batch, repeats=sample_repeats)
            for name in sampler_names or (config.sample.sampler,)]
    return results


def run_sample(config: ml_collections.ConfigDict, *, sample_steps: int, sample_batch: int = 0,
               sample_repeats: int = 3, sampler_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``sample`` subcommand: each sampler on freshly initialised params."""
    mesh, model, _ = train_lib.setup(config)
    params = sample_lib.init_params(model, config, mesh)
    return {"device": timing.describe_devices(), "config": _config_summary(config), "sample": [
        sample_lib.benchmark_sampling(config, model, params, mesh,
                                      _sampler_options(config, name, sample_steps),
                                      batch=sample_batch, repeats=sample_repeats)
        for name in sampler_names or (config.sample.sampler,)]}


def run_flops(config: ml_collections.ConfigDict | None, *, sample_steps: int,
              sample_batch: int = 0, preset_names: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``flops`` subcommand: counts for ``config`` (if given) and the presets."""
    results: dict[str, Any] = {"device": timing.describe_devices()}
    if config is not None:
        batch = sample_batch or config.sample.num_images
        options = _sampler_options(config, config.sample.sampler, sample_steps)
        model_flops, hardware_flops = flops.train_step_flop_counts(config)
        results["flops"] = {
            "model": config.model.name, "image_size": config.model.image_size,
            "num_params": presets_lib.count_params(config.model),
            "batch_size": config.batch_size,
            "forward_flops": flops.forward_flops(config.model, config.batch_size),
            "train_step_flops": model_flops,
            "train_step_hardware_flops": hardware_flops,
            # What a cost analysis of the run's own (scanned) program says.
            "train_step_xla_flops": flops.xla_flops(flops.lower_train_step(config)),
            "sampler": dict(flops.sampler_flops(config, options, batch),
                            **dataclasses.asdict(options)),
            "sampler_batch": batch,
        }
    if "all" in preset_names:
        preset_names = presets_lib.preset_names()
    results["presets"] = []
    for name in preset_names:
        model_config = presets_lib.get_preset(name)
        results["presets"].append({
            "preset": name, "model": model_config.name, "image_size": model_config.image_size,
            "num_params": presets_lib.count_params(model_config),
            "forward_flops": flops.forward_flops(model_config, 1)})
    return results


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _run_gpu(config: ml_collections.ConfigDict) -> str:
    """The ``gpu`` subcommand; writes its JSON and Markdown after every phase."""
    if not _OUTPUT_DIR.value:
        raise app.UsageError("gpu needs --output_dir.")
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    base = os.path.join(_OUTPUT_DIR.value, "gpu_benchmark")

    def on_update(results):
        _write(base + ".json", json.dumps(results, indent=2))
        _write(base + ".md", report.gpu_table(results) + "\n")

    results = gpu_lib.run_gpu(
        config, batch_sizes=[int(b) for b in _BATCH_SIZES.value],
        sample_steps=_SAMPLE_STEPS.value, sample_batch=_SAMPLE_BATCH.value or 16,
        repeats=_REPEATS.value, warmup=_WARMUP.value, time_budget_s=_TIME_BUDGET.value,
        memory_limit_bytes=_MEMORY_LIMIT.value, matmul_size=_MATMUL_SIZE.value,
        on_update=on_update)
    return report.gpu_table(results) + f"\n\nWrote {base}.json and {base}.md"


def _run(command: str, config: ml_collections.ConfigDict | None) -> tuple[dict[str, Any], str]:
    """Runs a subcommand other than gpu; returns (results, Markdown)."""
    names = tuple(_SAMPLERS.value)
    if command == "flops":
        results = run_flops(config, sample_steps=_SAMPLE_STEPS.value,
                            sample_batch=_SAMPLE_BATCH.value, preset_names=tuple(_PRESETS.value))
        return results, report.flops_table(results)
    if command == "train" and _COMPILE_ONLY.value:
        train = train_lib.analyze_train_step(config)
        train["flops_per_step"], train["hardware_flops_per_step"] = (
            flops.train_step_flop_counts(config))
        return ({"device": timing.describe_devices(), "train_compile_only": train},
                report.compile_only_table(train))
    if command == "train":
        results = run_train(config, repeats=_REPEATS.value, warmup=_WARMUP.value,
                            matmul_size=_MATMUL_SIZE.value, breakdown=_BREAKDOWN.value)[0]
    elif command == "sample":
        results = run_sample(config, sample_steps=_SAMPLE_STEPS.value,
                             sample_batch=_SAMPLE_BATCH.value,
                             sample_repeats=_SAMPLE_REPEATS.value, sampler_names=names)
    else:
        results = run_benchmark(
            config, repeats=_REPEATS.value, warmup=_WARMUP.value,
            sample_steps=_SAMPLE_STEPS.value, sample_batch=_SAMPLE_BATCH.value,
            sample_repeats=_SAMPLE_REPEATS.value, matmul_size=_MATMUL_SIZE.value,
            breakdown=_BREAKDOWN.value, sampler_names=names)
    return results, report.benchmark_table(results)


def main(argv):
    command = argv[1] if len(argv) > 1 else "all"
    if command not in SUBCOMMANDS or len(argv) > 2:
        raise app.UsageError(f"Usage: benchmark [{'|'.join(SUBCOMMANDS)}] --config=...; "
                             f"got {argv[1:]}")
    config = _CONFIG.value
    if config is None and not (command == "flops" and _PRESETS.value):
        raise app.UsageError(f"{command} needs --config=configs/<name>.py.")
    if command == "gpu":
        print(_run_gpu(config))
        return
    results, text = _run(command, config)
    print(text)
    if _OUTPUT.value:
        _write(_OUTPUT.value, json.dumps(results, indent=2))
        print(f"\nWrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
