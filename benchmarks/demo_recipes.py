r"""Trains and evaluates the Fashion-MNIST demo of every method; writes the README's table.

  .venv/bin/python benchmarks/demo_recipes.py [--demos=sid2_demo,edm_demo,...] \
      [--workdir_root=workdirs] [--output=docs/demo_recipes.md]

For each demo config: `python -m simple_diffusion.main` (wall time measured, with the load
average before and after, because a busy machine slows it), then
`python -m simple_diffusion.evaluate` with the demo's own sampler unless the table below
overrides it. Re-running resumes: a finished training run only re-evaluates. Results go to
`<output>` (Markdown) and `<output>.json`; the numbers in the docs come from here.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent

# name -> (config, extra evaluate flags, note on the evaluation protocol).
DEMOS = {
    "fashion_mnist_demo": ("configs/fashion_mnist_demo.py", [], "ddpm 128 steps"),
    "sid2_demo": ("configs/sid2_demo.py", [], "ddpm 128 steps, guidance 1 in λ ∈ [−2.13, 2.55]"),
    "edm_demo": ("configs/edm_demo.py", [], "heun 32 steps (63 evaluations)"),
    # The full 1000-step chain would take ~10x longer on this CPU for the U-Net.
    "ddpm_unet_demo": ("configs/ddpm_unet_demo.py", ["--num_samples=500", "--steps=100"],
                       "ddpm 100 of the 1000 steps, 500 samples"),
}


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def _run(cmd: list[str], log: pathlib.Path) -> tuple[int, float]:
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.time() - start


def run_demo(name: str, root: pathlib.Path) -> dict:
    """Trains (or resumes) and evaluates one demo; returns its record."""
    config, eval_flags, protocol = DEMOS[name]
    workdir = root / name
    workdir.mkdir(parents=True, exist_ok=True)
    record_path = workdir / "demo_recipe.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if "train_seconds" not in record:
        load_before = _load()
        rc, seconds = _run([sys.executable, "-m", "simple_diffusion.main", f"--config={config}",
                            f"--workdir={workdir}"], workdir / "train.log")
        if rc:
            raise SystemExit(f"{name}: training failed (exit {rc}); see {workdir / 'train.log'}")
        record.update(train_seconds=seconds, train_load_before=load_before,
                      train_load_after=_load())
        record_path.write_text(json.dumps(record, indent=2))
    rc, seconds = _run([sys.executable, "-m", "simple_diffusion.evaluate",
                        f"--workdir={workdir}", *eval_flags], workdir / "evaluate.log")
    if rc:
        raise SystemExit(f"{name}: evaluation failed (exit {rc}); see {workdir / 'evaluate.log'}")
    # The evaluator's record of the latest checkpoint (eval/step_<N>.json).
    result = json.loads(sorted((workdir / "eval").glob("step_*.json"))[-1].read_text())
    result = {k: result[k] for k in ("step", "fd_effnet_lite0", "kid_effnet_lite0",
                                     "kid_effnet_lite0_std")}
    config_json = json.loads((workdir / "config.json").read_text())
    record.update(eval_seconds=seconds, eval_protocol=protocol, config=config,
                  num_train_steps=config_json["num_train_steps"],
                  batch_size=config_json["batch_size"], **result)
    record_path.write_text(json.dumps(record, indent=2))
    return record


def markdown(records: dict) -> str:
    lines = [
        "| demo | config | steps × batch | train wall time | load avg (before → after) | "
        "evaluation | fd_effnet_lite0 | kid_effnet_lite0 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in records.items():
        lines.append(
            f"| {name} | `{r['config']}` | {r['num_train_steps']} × {r['batch_size']} | "
            f"{r['train_seconds'] / 60:.1f} min | {r['train_load_before']} → "
            f"{r['train_load_after']} | {r['eval_protocol']} | {r['fd_effnet_lite0']:.1f} | "
            f"{r['kid_effnet_lite0']:.3f} ± {r['kid_effnet_lite0_std']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demos", default=",".join(DEMOS))
    parser.add_argument("--workdir_root", default="workdirs/demo_recipes")
    parser.add_argument("--output", default="docs/demo_recipes.md")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir_root).absolute()
    output = REPO / args.output
    json_path = output.with_suffix(".json")
    records = json.loads(json_path.read_text()) if json_path.exists() else {}
    for name in args.demos.split(","):
        if name not in DEMOS:
            raise SystemExit(f"unknown demo {name!r}; use some of {sorted(DEMOS)}")
        records[name] = run_demo(name, root)
        json_path.write_text(json.dumps(records, indent=2))
        output.write_text(
            "# Demo recipes on the 2-core CPU\n\n"
            f"Generated by `.venv/bin/python benchmarks/demo_recipes.py` "
            f"(`{os.path.relpath(output, REPO)}`, raw: `{os.path.relpath(json_path, REPO)}`). "
            "Every demo: Fashion-MNIST 32×32, 1,000 samples (unless stated) against 2,000 "
            "test images, EfficientNet-Lite0 features (`fd_effnet_lite0` is **not FID**). "
            "Wall times depend on the machine's load, given beside them.\n\n"
            + markdown(records))
        print(f"{name}: {records[name]}")


if __name__ == "__main__":
    main()
