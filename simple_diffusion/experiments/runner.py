"""Runs the arms of a suite: trains (resuming), evaluates, and records each run.

Layout under the experiment root (``--workdir``)::

  runs/<scale>/<base>__<arm>__seed<k>/     an ordinary training workdir (config.json,
      run.json                               checkpoints, events, samples/, eval/), plus
      record.json                            its identity and, once finished, its record
  sampling/<scale>/<source run>/<arm>.json  sampling-suite results (and <arm>.png)
  reference_cache/                          reference feature statistics, shared by runs

A run with a ``record.json`` is finished and skipped; an interrupted run
resumes from its last checkpoint when the suite is re-run. A run directory
whose ``run.json`` describes a different run (the suite definition changed)
stops the runner with a message instead of mixing the two.
"""

import dataclasses
import glob
import json
import os
import shutil
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from simple_diffusion import flops
from simple_diffusion import samplers
from simple_diffusion import sampling
from simple_diffusion import schedules
from simple_diffusion import train
from simple_diffusion.evaluation import evaluator as evaluator_lib
from simple_diffusion.evaluation import workdir_evaluation
from simple_diffusion.experiments import suites as suites_lib
from simple_diffusion.models import presets


def load_average() -> str:
    """The 1/5/15-minute load averages: wall times on a shared machine need them."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def run_name(suite: suites_lib.Suite, arm: suites_lib.Arm, seed: int) -> str:
    return f"{suite.base}__{arm.name}__seed{seed}"


def run_dir(root: str, suite: suites_lib.Suite, arm: suites_lib.Arm, seed: int,
            scale: str) -> str:
    return os.path.join(root, "runs", scale, run_name(suite, arm, seed))


def _identity(suite, arm, seed, scale) -> dict[str, Any]:
    # The whole config is part of the identity: a run trained before its base model or
    # recipe changed is never reused under the new definition.
    return dict(base=suite.base, arm=arm.name, overrides=arm.overrides, seed=seed, scale=scale,
                budget=dataclasses.asdict(suite.budgets[scale]),
                protocol=dataclasses.asdict(suite.protocol),
                config=suites_lib.run_config(suite, arm, seed, scale).to_dict())


def _claim(path: str, identity: dict[str, Any]) -> None:
    """Writes ``run.json``, or checks that an existing one describes the same run."""
    p = epath.Path(path) / "run.json"
    # Round-trip through JSON so tuples and lists compare equal.
    identity = json.loads(json.dumps(identity))
    if p.exists():
        existing = json.loads(p.read_text())
        if existing != identity:
            raise ValueError(
                f"{path} holds a different run ({existing}) than the suite now defines "
                f"({identity}). Move it aside or delete it to retrain.")
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(identity, indent=2))


def _copy_reference_stats(src_dir: str, dst_dir: str) -> None:
    """Copies cached ``ref_*.npz`` statistics (computing them takes ~30 s per run)."""
    os.makedirs(dst_dir, exist_ok=True)
    for path in glob.glob(os.path.join(src_dir, "ref_*.npz")):
        target = os.path.join(dst_dir, os.path.basename(path))
        if not os.path.exists(target):
            shutil.copyfile(path, target)


def read_scalars(workdir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of scalar ``tag`` from the TensorBoard events in ``workdir``."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # Heavy; only here.
    values = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag == tag:
                    value = (v.simple_value if v.HasField("simple_value")
                             else float(tf.make_ndarray(v.tensor)))
                    values[int(event.step)] = value  # A resumed run rewrites steps: keep the last.
    return sorted(values.items())


def _eval_results(workdir: str) -> dict[int, dict[str, Any]]:
    results = {}
    for path in glob.glob(os.path.join(workdir, "eval", "step_*.json")):
        r = json.loads(open(path).read())
        results[int(r["step"])] = r
    return results


def train_run(suite: suites_lib.Suite, arm: suites_lib.Arm, seed: int, scale: str,
              root: str) -> dict[str, Any]:
    """Trains and evaluates one run (or returns its record if it is finished)."""
    path = run_dir(root, suite, arm, seed, scale)
    record_path = os.path.join(path, "record.json")
    identity = _identity(suite, arm, seed, scale)
    _claim(path, identity)
    if os.path.exists(record_path):
        return json.loads(open(record_path).read())
    config = suites_lib.run_config(suite, arm, seed, scale)
    cache = os.path.join(root, "reference_cache")
    _copy_reference_stats(cache, os.path.join(path, "eval"))
    resumed = os.path.isdir(os.path.join(path, "checkpoints"))
    load_before, start = load_average(), time.time()
    logging.info("Training %s (%s scale).", path, scale)
    train.train_and_evaluate(config, path)
    seconds = time.time() - start
    evals = _eval_results(path)
    if config.num_train_steps not in evals:  # Finished earlier without its final evaluation.
        workdir_evaluation.evaluate_workdir(path, config, config.num_train_steps)
        evals = _eval_results(path)
    _copy_reference_stats(os.path.join(path, "eval"), cache)
    record = dict(
        identity, name=run_name(suite, arm, seed), workdir=path,
        train_seconds=seconds, resumed=resumed, load_before=load_before,
        load_after=load_average(), device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        params=presets.count_params(config.model),
        train_flops_per_image=flops.forward_backward_flops(config.model, 1),
        loss=read_scalars(path, "loss"),
        evals={str(step): {k: v for k, v in r.items() if isinstance(v, (int, float))}
               for step, r in sorted(evals.items())},
        final=evals[config.num_train_steps],
        grid=os.path.join(path, "samples", f"step_{config.num_train_steps:08d}.png"))
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    return record


def sampling_run(suite: suites_lib.Suite, model_record: dict[str, Any], scale: str,
                 root: str, *, finished_only: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluates every arm (sampler setting) of a sampling suite on one trained model.

    The params are restored once; each arm's result is stored and skipped on re-runs.
    """
    out_dir = os.path.join(root, "sampling", scale, model_record["name"])
    os.makedirs(out_dir, exist_ok=True)
    results, pending = {}, []
    for arm in suite.arms:
        path = os.path.join(out_dir, f"{arm.name}.json")
        if os.path.exists(path):
            results[arm.name] = json.loads(open(path).read())
        else:
            pending.append(arm)
    if not pending or finished_only:
        return results
    config = sampling.load_run_config(model_record["workdir"])
    _copy_reference_stats(os.path.join(root, "reference_cache"), os.path.join(out_dir, "eval"))
    step, params, model, mesh = workdir_evaluation.load_ema_params(
        model_record["workdir"], config)
    logsnr_fn = schedules.from_config(config.schedule)
    for i, arm in enumerate(pending):
        options = suites_lib.sampler_options(
            arm, lambda o: samplers.logsnr_grid(o, logsnr_fn))
        c = ml_collections.ConfigDict(config.to_dict())
        c.eval = ml_collections.ConfigDict(dict(c.eval.to_dict(), **dataclasses.asdict(options)))
        evaluator = evaluator_lib.Evaluator(c, mesh, out_dir, model=model)
        e = c.eval
        stamps = []  # (images done, time) after each batch; the first batch compiles.
        images, labels = sampling.generate(
            c, params, mesh, options, num_samples=e.num_samples, labels=None, seed=e.seed,
            batch_size=e.batch_size, sample_fn=evaluator.sample_fn,
            progress=lambda done, total: stamps.append((done, time.time())))
        if len(stamps) > 1:
            seconds_per_image = ((stamps[-1][1] - stamps[0][1])
                                 / (stamps[-1][0] - stamps[0][0]))
        else:  # One batch, which compiled: time one more, compiled call.
            start = time.time()
            sampling.generate(c, params, mesh, options, num_samples=len(images), labels=None,
                              seed=e.seed, batch_size=e.batch_size, sample_fn=evaluator.sample_fn)
            seconds_per_image = (time.time() - start) / len(images)
        metrics = evaluator.score(images, labels, i)
        sampling.save_png(os.path.join(out_dir, f"{arm.name}.png"),
                          sampling.make_grid(images[:40]))
        nfe = samplers.num_model_evaluations(options, samplers.logsnr_grid(options, logsnr_fn))
        record = dict(arm=arm.name, model=model_record["name"], seed=model_record["seed"],
                      checkpoint_step=step, options=dataclasses.asdict(options), nfe=nfe,
                      seconds_per_image=seconds_per_image, load=load_average(),
                      grid=os.path.join(out_dir, f"{arm.name}.png"), final=metrics)
        with open(os.path.join(out_dir, f"{arm.name}.json"), "w") as f:
            json.dump(record, f, indent=2)
        results[arm.name] = record
        logging.info("%s on %s: %s", arm.name, model_record["name"], record)
    _copy_reference_stats(os.path.join(out_dir, "eval"), os.path.join(root, "reference_cache"))
    return results


def _finished_record(suite, arm, seed, scale, root) -> dict[str, Any] | None:
    path = os.path.join(run_dir(root, suite, arm, seed, scale), "record.json")
    return json.loads(open(path).read()) if os.path.exists(path) else None


def run_suite(suite: suites_lib.Suite, scale: str, root: str, *,
              finished_only: bool = False) -> dict[str, Any]:
    """Runs (or resumes) every run of ``suite``; returns {"records", "seconds", "load",
    "missing"}.

    Training suites: records[arm][seed] is the run record. Sampling suite:
    records[arm][seed] is the arm's result on the source model of that seed.
    ``finished_only``: train and sample nothing; collect the finished runs and list
    the others in "missing" (a partial report while a suite is still running).
    """
    start = time.time()
    records: dict[str, dict[int, Any]] = {arm.name: {} for arm in suite.arms}
    missing = []
    if suite.kind == "training":
        for arm in suite.arms:
            for seed in suite.seeds:
                record = (_finished_record(suite, arm, seed, scale, root) if finished_only
                          else train_run(suite, arm, seed, scale, root))
                if record is None:
                    missing.append(f"{arm.name} seed {seed}")
                else:
                    records[arm.name][seed] = record
    else:
        source_suite = suites_lib.get_suite(suite.source[0])
        source_arm = next(a for a in source_suite.arms if a.name == suite.source[1])
        for seed in suite.seeds:
            model = (_finished_record(source_suite, source_arm, seed, scale, root)
                     if finished_only else train_run(source_suite, source_arm, seed, scale, root))
            results = {} if model is None else sampling_run(
                suite, model, scale, root, finished_only=finished_only)
            for arm in suite.arms:
                if arm.name in results:
                    records[arm.name][seed] = results[arm.name]
                else:
                    missing.append(f"{arm.name} on model seed {seed}")
    return {"records": records, "seconds": time.time() - start, "load": load_average(),
            "missing": missing}
