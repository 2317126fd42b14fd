r"""The seeds' generators side by side on Fashion-MNIST at equal training wall-clock:
pixel diffusion, latent diffusion, VAE, DCGAN (issue 12's comparison). Writes
docs/generators.md, .json and a sample figure.

  .venv/bin/python benchmarks/generators.py [--train_minutes=2] [--num_samples=500] \
      [--methods=pixel_diffusion,dcgan,...] [--workdir_root=workdirs] [--rerender]

Equal wall-clock: every method gets ``--train_minutes`` of training steps on this
machine. Its step rate is calibrated first (a short run of the same config; the
rate of its compiled steps, read from the trainer's own ``examples_per_sec`` or
``iterations_per_sec``), and the method's config is then trained for
``minutes x rate`` steps, so its learning-rate schedule and EMA see a complete run.
Latent diffusion splits the budget: half for its autoencoder, half for the
diffusion model on its latents. Evaluation is off during training; the measured
wall time (start-up, compilation and the final checkpoint included) is reported
beside the budget. Latent diffusion's cache of encoded training images is built
during its calibration and reused by the run. Runs go to
``<workdir_root>/generators_<M>min/``; re-running reuses finished runs.

Then each method's latest checkpoint is scored the same way: EMA weights unless
stated, ``--num_samples`` samples of its own sampler against the test split
(`fd_effnet_lite0`, KID, classifier accuracy), sampling time on a compiled
generator, and sharpness (mean absolute image gradient relative to the test
images': the seeds call VAE samples blurry). Calibrate and train on a quiet machine:
the load average before and after is recorded with each run.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> (config, workdir, prerequisite method or None, EMA index, description).
METHODS = {
    "pixel_diffusion": ("configs/fashion_mnist_demo.py", "pixel_diffusion", None, 0,
                        "pixel diffusion, U-ViT (the default demo's config)"),
    "autoencoder": ("configs/autoencoder_fashion_mnist.py", "autoencoder", None,
                    0, "KL autoencoder (latent diffusion's first stage; not a generator)"),
    "latent_diffusion": ("configs/latent_fashion_mnist.py", "latent_diffusion",
                         "autoencoder", 0, "latent diffusion, U-ViT on the autoencoder's latents"),
    "vae": ("configs/vae_fashion_mnist.py", "vae", None, 0,
            "VAE, prior samples decoded"),
    "dcgan": ("configs/dcgan_fashion_mnist.py", "dcgan", None, 0, "DCGAN 1:1, EMA generator"),
    "dcgan_raw": ("configs/dcgan_fashion_mnist.py", "dcgan", None, None,
                  "DCGAN 1:1, raw generator (no EMA)"),
    "dcgan_1to2": ("configs/dcgan_fashion_mnist.py:1:2", "dcgan_1to2", None, 0,
                   "DCGAN, 1 D : 2 G updates, EMA generator"),
}
GENERATORS = ("pixel_diffusion", "latent_diffusion", "vae", "dcgan", "dcgan_raw", "dcgan_1to2")
# Share of the budget each trained method gets (latent diffusion: its own half plus
# the autoencoder's half).
BUDGET_SHARE = {"autoencoder": 0.5, "latent_diffusion": 0.5}
CALIBRATION_STEPS, CALIBRATION_LOG_EVERY = 60, 20


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def _run_main(name: str, workdir: pathlib.Path, overrides: dict, log_path: pathlib.Path,
              root: pathlib.Path) -> None:
    """``python -m simple_diffusion.main`` on the method's config with ``overrides``."""
    config, _, prereq, _, _ = METHODS[name]
    if prereq:  # Latent diffusion reads this comparison's autoencoder, not the default one.
        overrides = dict(overrides, **{
            "latent.autoencoder_workdir": str(root / METHODS[prereq][1])})
    cmd = [sys.executable, "-m", "simple_diffusion.main", f"--config={config}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"{name}: training failed (exit {rc}); see {log_path}")


def calibrate(name: str, root: pathlib.Path) -> dict:
    """Steps per second of the method's compiled train step on this machine.

    Runs ``CALIBRATION_STEPS`` steps (nothing evaluated or sampled) and takes the
    median rate of the log intervals after the first (which includes compilation).
    """
    from simple_diffusion import sampling  # pylint: disable=g-import-not-at-top
    from simple_diffusion.experiments import runner  # pylint: disable=g-import-not-at-top
    workdir = root / "calibration" / METHODS[name][1]
    if workdir.exists():  # A partial calibration must not be resumed: start over.
        shutil.rmtree(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    _run_main(name, workdir, {
        "num_train_steps": CALIBRATION_STEPS, "log_every_steps": CALIBRATION_LOG_EVERY,
        "eval.every_steps": 0, "sample.every_steps": 0,
        "checkpoint_every_steps": CALIBRATION_STEPS}, workdir.parent / f"{workdir.name}.log",
        root)
    config = sampling.load_run_config(str(workdir))
    rates = runner.read_scalars(str(workdir), "iterations_per_sec")
    per_example = not rates
    if per_example:
        rates = runner.read_scalars(str(workdir), "examples_per_sec")
    values = [v for step, v in rates if step > CALIBRATION_LOG_EVERY]
    if not values:
        raise SystemExit(f"{name}: calibration wrote no step rate; see {workdir}")
    rate = float(np.median(values)) / (config.batch_size if per_example else 1)
    # Latent diffusion's cache of encoded training images (minutes to build here) does
    # not depend on the run: hand it to the real run instead of building it twice.
    for cache in workdir.glob("latent_cache_step_*.npz"):
        target = root / METHODS[name][1]
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(str(cache), str(target / cache.name))
    shutil.rmtree(workdir)
    return dict(steps_per_second=rate, load=_load())


def train(name: str, root: pathlib.Path, minutes: float) -> dict:
    """Trains the method for ``minutes`` (times its share) of calibrated steps, or
    returns the record of the finished run."""
    workdir = root / METHODS[name][1]
    record_path = workdir / "generators_train.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    if workdir.exists():  # An interrupted run: its step budget came from an old calibration.
        shutil.rmtree(workdir)
    budget_seconds = minutes * 60 * BUDGET_SHARE.get(name, 1.0)
    calibration = calibrate(name, root)
    steps = max(1, round(budget_seconds * calibration["steps_per_second"]))
    load_before, start = _load(), time.time()
    _run_main(name, workdir, {
        "num_train_steps": steps, "eval.every_steps": 0, "sample.every_steps": steps,
        "checkpoint_every_steps": steps}, root / f"{workdir.name}.train.log", root)
    record = dict(budget_seconds=budget_seconds, steps=steps, calibration=calibration,
                  wall_seconds=time.time() - start, load_before=load_before,
                  load_after=_load())
    record_path.write_text(json.dumps(record, indent=2))
    return record


def sharpness(images: np.ndarray) -> float:
    """Mean absolute difference of neighbouring pixels (uint8 [N, H, W, C] -> [0, 255])."""
    x = images.astype(np.float64)
    return float((np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()) / 2)


def score(name: str, root: pathlib.Path, num_samples: int | None) -> dict:
    """Scores the method's latest checkpoint (``num_samples`` samples, None: the
    config's); times its compiled generator."""
    import jax  # pylint: disable=g-import-not-at-top
    from simple_diffusion import input_pipeline  # pylint: disable=g-import-not-at-top
    from simple_diffusion import sampling  # pylint: disable=g-import-not-at-top
    from simple_diffusion.evaluation import workdir_evaluation  # pylint: disable=g-import-not-at-top
    _, workdir, _, ema_index, _ = METHODS[name]
    workdir = str(root / workdir)
    config = sampling.load_run_config(workdir)
    step, params, evaluator = workdir_evaluation.load_for_evaluation(
        workdir, config, None, ema_index)
    e = config.eval
    if num_samples:
        e.num_samples = num_samples
    batch = min(250, e.num_samples)
    evaluator.generate_fn(params, batch, e.seed + 1, batch)  # Compiles.
    start = time.time()
    evaluator.generate_fn(params, batch, e.seed + 1, batch)
    seconds_per_image = (time.time() - start) / batch
    images, labels = evaluator.generate_fn(params, e.num_samples, e.seed, e.batch_size)
    metrics = evaluator.score(images, labels, step,
                              tag=workdir_evaluation.results_tag(ema_index) or "generators")
    size = images.shape[1]
    test = input_pipeline.load_images(config.data, image_size=size, num_examples=1000,
                                      split=e.reference_split, channels=images.shape[-1])
    grid_path = str(root / f"generators_{name}.png")
    sampling.save_png(grid_path, sampling.make_grid(images[:40]))
    if "gan" in config:
        sampler = "one generator call"
    elif "autoencoder" in config:
        sampler = "a prior sample, decoded"
    else:
        sampler = f"{e.sampler} {e.num_steps} steps" + (
            f", guidance {e.guidance_scale:g}" if e.guidance_scale else "")
    return dict(step=step, num_samples=len(images), seconds_per_image=seconds_per_image,
                sampler=sampler,
                device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                params=int(sum(x.size for x in jax.tree.leaves(params))),
                relative_sharpness=sharpness(images) / sharpness(test), grid=grid_path,
                **{k: v for k, v in metrics.items() if not k.startswith("classifier_accuracy_")},
                per_class_accuracy=[metrics.get(f"classifier_accuracy_class_{k}")
                                    for k in range(config.model.get("num_classes", 0) or 0)])


def claims(rows: dict) -> list[str]:
    """The seeds' qualitative claims, each with what this table shows (generated)."""
    out = []
    fd = {k: r["fd_effnet_lite0"] for k, r in rows.items() if "fd_effnet_lite0" in r}
    if "vae" in rows:
        sharp = {k: r["relative_sharpness"] for k, r in rows.items()}
        softest = min(sharp, key=sharp.get)
        out.append(f"*VAE samples are blurry*: VAE sharpness is {sharp['vae']:.2f}× the test "
                   f"images'; the softest method here is `{softest}` ({sharp[softest]:.2f}×).")
    if "dcgan" in rows and "dcgan_raw" in rows:
        verb = "helps" if fd["dcgan"] < fd["dcgan_raw"] else "does not help"
        out.append(f"*EMA helps*: for the DCGAN it {verb} (fd_effnet_lite0 {fd['dcgan']:.1f} "
                   f"with EMA vs {fd['dcgan_raw']:.1f} raw).")
    if "dcgan" in rows and "dcgan_1to2" in rows:
        out.append(f"*GAN training is sensitive to the D:G ratio*: 1:1 gives "
                   f"{fd['dcgan']:.1f}, 1:2 gives {fd['dcgan_1to2']:.1f} in the same "
                   "wall-clock (1:2 makes two G updates per iteration, so fewer iterations).")
    if "pixel_diffusion" in rows and "dcgan" in rows:
        ratio = rows["pixel_diffusion"]["seconds_per_image"] / rows["dcgan"]["seconds_per_image"]
        out.append(f"*Diffusion sampling is ~1000× slower than a GAN's*: here "
                   f"{ratio:,.0f}× per image (the U-ViT's "
                   f"{rows['pixel_diffusion']['sampler']} vs one DCGAN generator call).")
    if "pixel_diffusion" in rows and "latent_diffusion" in rows:
        word = "better" if fd["pixel_diffusion"] < fd["latent_diffusion"] else "worse"
        out.append(f"*Pixel-space diffusion matches latent diffusion* (simple diffusion's "
                   f"claim): pixel {fd['pixel_diffusion']:.1f} is {word} than latent "
                   f"{fd['latent_diffusion']:.1f} at these budgets.")
    return out


def figure(rows: dict, out: pathlib.Path) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], rows.items()):
        ax.imshow(np.asarray(Image.open(r["grid"])), cmap="gray")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def markdown(rows: dict, trains: dict) -> str:
    lines = ["| method | fd_effnet_lite0 | KID | classifier accuracy | sharpness vs test | "
             "training budget (steps) | measured training wall time | sampling time / image "
             "| params (sampling) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        parts = [p for p in (METHODS[name][2], name) if p]
        budget = sum(trains[p]["budget_seconds"] for p in parts) / 60
        wall = sum(trains[p]["wall_seconds"] for p in parts) / 60
        steps = " + ".join(f"{trains[p]['steps']:,} {'(autoencoder)' if p != name else ''}"
                           .strip() for p in parts)
        acc = r.get("classifier_accuracy")
        lines.append(
            f"| `{name}`: {METHODS[name][4]} | {r['fd_effnet_lite0']:.1f} | "
            f"{r.get('kid_effnet_lite0', float('nan')):.3f} | "
            f"{'n/a (unconditional)' if acc is None else f'{acc:.3f}'} | "
            f"{r['relative_sharpness']:.2f} | {budget:.1f} min ({steps}) | {wall:.1f} min | "
            f"{r['seconds_per_image'] * 1e3:.2f} ms | {r['params'] / 1e6:.2f}M |")
    return "\n".join(lines) + "\n"


def per_class_table(rows: dict) -> str:
    """Classifier accuracy of each conditional method's samples, per class."""
    conditional = {k: r for k, r in rows.items() if r.get("per_class_accuracy")}
    if not conditional:
        return ""
    from simple_diffusion.evaluation import classifier  # pylint: disable=g-import-not-at-top
    table = classifier.per_class_markdown({
        f"`{k}`": (r["per_class_accuracy"], r["classifier_accuracy"])
        for k, r in conditional.items()})
    return ("\n## Classifier accuracy per class (samples asked for that class)\n\n"
            + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(GENERATORS))
    parser.add_argument("--workdir_root", default="workdirs")
    parser.add_argument("--output", default="docs/generators.md")
    parser.add_argument("--train_minutes", type=float, default=2.0,
                        help="Training wall-clock budget of every method, in minutes.")
    parser.add_argument("--rerender", action="store_true",
                        help="Rewrite the Markdown from the existing JSON (no scoring).")
    parser.add_argument("--num_samples", type=int, default=500,
                        help="Samples per method.")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir_root).absolute() / f"generators_{args.train_minutes:g}min"
    names = args.methods.split(",")
    for name in names:
        if name not in GENERATORS:
            raise SystemExit(f"unknown method {name!r}; use some of {list(GENERATORS)}")
    output = REPO / args.output
    if args.rerender:
        saved = json.loads(output.with_suffix(".json").read_text())
        rows, trains, command = saved["rows"], saved["train"], saved["command"]
        minutes = saved["train_minutes"]
    else:
        trains, rows, minutes = {}, {}, args.train_minutes
        for name in names:
            for part in (METHODS[name][2], name):
                if part and part not in trains:
                    trains[part] = train(part, root, minutes)
                    print(part, json.dumps(trains[part]))
        for name in names:
            rows[name] = score(name, root, args.num_samples)
            print(name, json.dumps(rows[name]))
        command = (f".venv/bin/python benchmarks/generators.py --train_minutes={minutes:g} "
                   f"--num_samples={args.num_samples}")
        figure(rows, REPO / "docs" / "images" / "generators_samples.png")
        output.with_suffix(".json").write_text(json.dumps(
            dict(command=command, train_minutes=minutes, rows=rows, train=trains), indent=2))
    loads = sorted({t["load_before"] for t in trains.values()}
                   | {t["load_after"] for t in trains.values()})
    first = next(iter(rows.values()))
    output.write_text(
        "# Generators side by side: pixel diffusion, latent diffusion, VAE, DCGAN\n\n"
        f"Generated by `{command}` (raw: "
        f"`{os.path.relpath(output.with_suffix('.json'), REPO)}`). Fashion-MNIST 32×32 on "
        f"the 2-core CPU VM, every method trained for the same wall-clock budget, "
        f"**{minutes:g} minutes** of training steps (the step count comes from a "
        "calibrated step rate, so each config's learning-rate schedule and EMA see a "
        "complete run; latent diffusion spends half on its autoencoder). Measured wall "
        "time adds start-up, compilation and the final checkpoint; latent diffusion's "
        "cache of encoded training images is built once, before, and not counted (load "
        "averages seen "
        f"around the runs: {', '.join(loads)}). Every method is scored the same way: EMA "
        f"weights unless stated, its own sampler, {first['num_samples']} samples (labels "
        "cycling through the classes) against 2,000 test images, EfficientNet-Lite0 "
        "features (`fd_effnet_lite0`, not FID) and the Fashion-MNIST classifier's accuracy "
        "on the samples (`docs/evaluation.md`). Sharpness: mean absolute neighbouring-pixel "
        "difference of the samples over that of 1,000 test images. Sampling time: one "
        "compiled call on 250 images.\n\n"
        + markdown(rows, trains)
        + "\n## The seeds' claims, against this table\n\n"
        + "\n".join(f"- {c}" for c in claims(rows)) + "\n"
        + per_class_table(rows)
        + "\n![samples of each method](images/generators_samples.png)\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
