r"""The seeds' generators side by side on Fashion-MNIST: pixel diffusion, latent diffusion,
VAE, DCGAN (issue 12's comparison). Writes docs/generators.md, .json and a sample figure.

  .venv/bin/python benchmarks/generators.py [--methods=pixel_diffusion,dcgan,...] \
      [--workdir_root=workdirs] [--output=docs/generators.md]

For each method: trains its config in ``<workdir_root>/<workdir>`` unless a final
checkpoint is there (wall time measured with the load average; for a run this
script did not train, the run's own ReportProgress ``uptime`` is used and marked),
then restores the EMA weights, scores ``config.eval.num_samples`` samples against
the test split with the method's own sampler (`fd_effnet_lite0`, KID, classifier
accuracy), times sampling on a compiled generator, and measures sharpness (mean
absolute image gradient, relative to the test images: the seeds call VAE samples
blurry). Re-running reuses trained runs and re-scores them.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> (config, workdir, prerequisite method or None, EMA index, description).
METHODS = {
    "pixel_diffusion": ("configs/fashion_mnist_demo.py", "demo", None, 0,
                        "pixel diffusion, U-ViT (the default demo), DDPM 128 steps"),
    "autoencoder": ("configs/autoencoder_fashion_mnist.py", "autoencoder_fashion_mnist", None,
                    0, "KL autoencoder (latent diffusion's first stage; not a generator)"),
    "latent_diffusion": ("configs/latent_fashion_mnist.py", "latent_fashion_mnist",
                         "autoencoder", 0, "latent diffusion, U-ViT on the autoencoder's latents"),
    "vae": ("configs/vae_fashion_mnist.py", "vae_fashion_mnist", None, 0,
            "VAE, prior samples decoded"),
    "dcgan": ("configs/dcgan_fashion_mnist.py", "dcgan", None, 0, "DCGAN 1:1, EMA generator"),
    "dcgan_raw": ("configs/dcgan_fashion_mnist.py", "dcgan", None, None,
                  "DCGAN 1:1, raw generator (no EMA)"),
    "dcgan_1to2": ("configs/dcgan_fashion_mnist.py:1:2", "dcgan_1to2", None, 0,
                   "DCGAN, 1 D : 2 G updates, EMA generator"),
}
GENERATORS = ("pixel_diffusion", "latent_diffusion", "vae", "dcgan", "dcgan_raw", "dcgan_1to2")


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def train(name: str, root: pathlib.Path) -> dict:
    """Trains (or finds) the method's run; returns {train_seconds, source, load...}."""
    config, workdir, _, _, _ = METHODS[name]
    workdir = root / workdir
    record_path = workdir / "generators_train.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    from simple_diffusion import sampling  # pylint: disable=g-import-not-at-top
    from simple_diffusion.experiments import runner  # pylint: disable=g-import-not-at-top
    if (workdir / "config.json").exists():
        run_config = sampling.load_run_config(str(workdir))
        steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                       if p.name.isdigit())
        if steps and steps[-1] >= run_config.num_train_steps:
            uptime = runner.read_scalars(str(workdir), "uptime")
            if uptime:
                seconds, how = uptime[-1][1], "ReportProgress uptime"
            else:  # Trainers without ReportProgress: the span of their event timestamps.
                seconds, how = _event_span(workdir), "first-to-last event time"
            record = dict(train_seconds=seconds,
                          source=f"the run's {how} (includes its periodic evaluation; "
                                 "trained outside this script)")
            record_path.write_text(json.dumps(record, indent=2))
            return record
    load_before, start = _load(), time.time()
    with open(workdir.parent / f"{workdir.name}.train.log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "simple_diffusion.main",
                              f"--config={config}", f"--workdir={workdir}"],
                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"{name}: training failed (exit {rc}); see {log.name}")
    record = dict(train_seconds=time.time() - start, source="measured by this script",
                  load_before=load_before, load_after=_load())
    record_path.write_text(json.dumps(record, indent=2))
    return record


def _event_span(workdir: pathlib.Path) -> float:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    times = [event.wall_time for path in workdir.glob("events.out.tfevents.*")
             for event in tf.compat.v1.train.summary_iterator(str(path))]
    return max(times) - min(times) if times else float("nan")


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
    return dict(step=step, num_samples=len(images), seconds_per_image=seconds_per_image,
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
                   f"{fd['dcgan']:.1f}, 1:2 gives {fd['dcgan_1to2']:.1f} (1:2 makes twice the "
                   "G updates per iteration, so it is not an equal-compute comparison).")
    if "pixel_diffusion" in rows and "dcgan" in rows:
        ratio = rows["pixel_diffusion"]["seconds_per_image"] / rows["dcgan"]["seconds_per_image"]
        out.append(f"*Diffusion sampling is ~1000× slower than a GAN's*: here "
                   f"{ratio:,.0f}× per image (DDPM 128 steps of the demo U-ViT vs one DCGAN "
                   "generator call).")
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
             "training wall time | sampling time / image | params (sampling) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        t = trains[name]
        prereq = METHODS[name][2]
        train_min = t["train_seconds"] / 60
        note = "" if t["source"].startswith("measured") else " †"
        if prereq:
            train_min += trains[prereq]["train_seconds"] / 60
            note += f" (incl. {prereq} {trains[prereq]['train_seconds'] / 60:.1f} min)"
        acc = r.get("classifier_accuracy")
        lines.append(
            f"| `{name}`: {METHODS[name][4]} | {r['fd_effnet_lite0']:.1f} | "
            f"{r.get('kid_effnet_lite0', float('nan')):.3f} | "
            f"{'n/a (unconditional)' if acc is None else f'{acc:.3f}'} | "
            f"{r['relative_sharpness']:.2f} | {train_min:.1f} min{note} | "
            f"{r['seconds_per_image'] * 1e3:.2f} ms | {r['params'] / 1e6:.2f}M |")
    return "\n".join(lines) + "\n"


def per_class_table(rows: dict) -> str:
    """Classifier accuracy of each conditional method's samples, per class."""
    conditional = {k: r for k, r in rows.items() if r.get("per_class_accuracy")}
    if not conditional:
        return ""
    names = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
             "bag", "ankle boot")
    lines = ["| method | " + " | ".join(names) + " | all |",
             "| --- |" + " ---: |" * (len(names) + 1)]
    for k, r in conditional.items():
        cells = [f"{a:.2f}" for a in r["per_class_accuracy"]]
        lines.append(f"| `{k}` | " + " | ".join(cells) + f" | {r['classifier_accuracy']:.3f} |")
    return ("\n## Classifier accuracy per class (samples asked for that class)\n\n"
            + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(GENERATORS))
    parser.add_argument("--workdir_root", default="workdirs")
    parser.add_argument("--output", default="docs/generators.md")
    parser.add_argument("--rerender", action="store_true",
                        help="Rewrite the Markdown from the existing JSON (no scoring).")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="Samples per method (default: each config's eval.num_samples).")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir_root).absolute()
    names = args.methods.split(",")
    for name in names:
        if name not in GENERATORS:
            raise SystemExit(f"unknown method {name!r}; use some of {list(GENERATORS)}")
    output = REPO / args.output
    if args.rerender:
        saved = json.loads(output.with_suffix(".json").read_text())
        rows, trains = saved["rows"], saved["train"]
        names = list(rows)
        command = saved.get("command", ".venv/bin/python benchmarks/generators.py "
                            f"--num_samples={rows[names[0]]['num_samples']}")
    else:
        trains, rows = {}, {}
        for name in names:
            prereq = METHODS[name][2]
            if prereq:
                trains[prereq] = train(prereq, root)
            trains[name] = train(name, root)
        for name in names:
            rows[name] = score(name, root, args.num_samples)
            print(name, json.dumps(rows[name]))
        command = ".venv/bin/python benchmarks/generators.py" + (
            f" --num_samples={args.num_samples}" if args.num_samples else "")
        figure(rows, REPO / "docs" / "images" / "generators_samples.png")
        output.with_suffix(".json").write_text(
            json.dumps(dict(command=command, rows=rows, train=trains), indent=2))
    output.write_text(
        "# Generators side by side: pixel diffusion, latent diffusion, VAE, DCGAN\n\n"
        f"Generated by `{command}` (raw: "
        f"`{os.path.relpath(output.with_suffix('.json'), REPO)}`). Fashion-MNIST 32×32, each "
        "method's demo config on the 2-core CPU VM; every method is scored the same way: "
        f"EMA weights unless stated, its own sampler, {rows[names[0]]['num_samples']} samples "
        "(labels "
        "cycling through the classes) against 2,000 test images, EfficientNet-Lite0 features "
        "(`fd_effnet_lite0`, not FID) and the Fashion-MNIST classifier's accuracy on the "
        "samples (`docs/evaluation.md`). Sharpness: mean absolute neighbouring-pixel "
        "difference of the samples over that of 1,000 test images. Sampling time: one "
        "compiled call on 250 images. † training time read from the run's own log (it was "
        "trained outside this script; includes its periodic evaluation). The machine was "
        "shared with other jobs, so wall times are inflated and only roughly comparable.\n\n"
        + markdown(rows, trains)
        + "\n## The seeds' claims, against this table\n\n"
        + "\n".join(f"- {c}" for c in claims(rows)) + "\n"
        + per_class_table(rows)
        + "\n![samples of each method](images/generators_samples.png)\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
