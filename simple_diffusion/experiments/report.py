"""Tables, plots and verdicts of the ablation suites, generated from run records.

Every number in ``docs/results/`` comes from here: ``summarize`` turns a suite's
records into per-arm statistics over seeds, ``write_suite`` writes
``<suite>.json``, the figures (matplotlib PNGs) and ``<suite>.md``, and
``write_index`` rebuilds ``README.md`` from every suite JSON present.

Noise rule: an arm's spread is the range of its per-seed values. Two arms
differ "inside the noise" when their ranges overlap; with two seeds per arm
this is a coarse test, stated as such in the tables.
"""

import json
import os
import re
from typing import Any

import numpy as np

from simple_diffusion.experiments import suites as suites_lib

METRIC = "fd_effnet_lite0"
KID = "kid_effnet_lite0"
ACCURACY = "classifier_accuracy"


def _stats(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, np.float64)
    return dict(values=[float(x) for x in v], mean=float(v.mean()), lo=float(v.min()),
                hi=float(v.max()))


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["lo"] <= b["hi"] and b["lo"] <= a["hi"]


def summarize(suite: suites_lib.Suite, run: dict[str, Any], *, scale: str,
              command: str) -> dict[str, Any]:
    """Per-arm statistics over seeds and the verdict; JSON-serialisable."""
    arms = []
    for arm in suite.arms:
        recs = [run["records"][arm.name][s] for s in sorted(run["records"][arm.name])]
        if not recs:  # Not finished yet (a partial report): listed under "missing".
            continue
        entry = dict(name=arm.name, label=arm.label, seeds=[r["seed"] for r in recs],
                     fd=_stats([r["final"][METRIC] for r in recs]))
        if all(KID in r["final"] for r in recs):
            entry["kid"] = _stats([r["final"][KID] for r in recs])
        if all(ACCURACY in r["final"] for r in recs):
            entry["accuracy"] = _stats([r["final"][ACCURACY] for r in recs])
        if suite.kind == "training":
            entry.update(
                train_seconds=_stats([r["train_seconds"] for r in recs]),
                resumed=any(r["resumed"] for r in recs), params=recs[0]["params"],
                train_flops_per_image=recs[0]["train_flops_per_image"],
                loss=[r["loss"] for r in recs],
                fd_by_step=[{int(k): v[METRIC] for k, v in r["evals"].items()} for r in recs],
                grid=recs[0]["grid"],
                load=sorted({r["load_before"] for r in recs} | {r["load_after"] for r in recs}))
        else:
            entry.update(nfe=recs[0]["nfe"], target_nfe=arm.overrides["target_nfe"],
                         options=recs[0]["options"],
                         seconds_per_image=_stats([r["seconds_per_image"] for r in recs]),
                         grid=recs[0]["grid"])
        arms.append(entry)
    for a in arms:  # Against the first finished arm (the suite's reference arm).
        a["delta_fd"] = a["fd"]["mean"] - arms[0]["fd"]["mean"]
        a["inside_noise_of_reference"] = _overlap(a["fd"], arms[0]["fd"])
    summary = dict(suite=suite.name, title=suite.title, claim=suite.claim, caveat=suite.caveat,
                   kind=suite.kind, scale=scale, command=command,
                   budget=suites_lib.describe_budget(suite.budgets[scale]),
                   protocol=_protocol(suite, scale), seconds=run["seconds"], load=run["load"],
                   seeds=list(suite.seeds), missing=run.get("missing", []), arms=arms)
    summary["verdict"] = verdict(suite, summary)
    return summary


def _protocol(suite: suites_lib.Suite, scale: str) -> str:
    b = suite.budgets[scale]
    sampler = ("the arm's sampler" if suite.kind == "sampling"
               else f"{suite.protocol.sampler} {suite.protocol.num_steps} steps, no guidance")
    return (f"{sampler}, EMA weights, {b.num_samples} samples (labels cycling through the "
            f"classes, the same noise seed for every run) vs {b.num_reference} test images, "
            "EfficientNet-Lite0 features (`fd_effnet_lite0`, not FID)")


def _fmt(s: dict[str, Any], digits: int = 1) -> str:
    values = ", ".join(f"{v:.{digits}f}" for v in s["values"])
    return f"{s['mean']:.{digits}f} ({values})"


def verdict(suite: suites_lib.Suite, summary: dict[str, Any]) -> str:
    """One generated sentence: what the numbers say against the paper's direction."""
    arms = summary["arms"]
    if suite.kind == "sampling":
        return _sampling_verdict(arms)
    if len(arms) < 2:
        return "Fewer than two arms have finished: nothing to compare yet."
    ranked = sorted(arms, key=lambda a: a["fd"]["mean"])
    best, second = ranked[0], ranked[1]
    separated = not _overlap(best["fd"], second["fd"])
    noise = ("and its seed range is clear of the runner-up's" if separated else
             f"but its seed range overlaps the runner-up's ({second['name']}), so the "
             "difference is inside the noise")
    seeds = len(suite.seeds)
    if min(len(best["fd"]["values"]), len(second["fd"]["values"])) < seeds:
        separated = False  # A spread from fewer seeds than the suite's says nothing yet.
        noise = (f"but it or the runner-up ({second['name']}) has fewer than {seeds} "
                 "finished seeds, so the noise is not known yet")
    sentence = f"Best here: `{best['name']}` (fd {best['fd']['mean']:.1f}), {noise}."
    if suite.expected_best is None:
        return (sentence + " The paper states no winner for this comparison."
                + _accuracy_sentence(arms))
    if best["name"] == suite.expected_best:
        agree = ("This agrees with the paper's direction." if separated else
                 "This points the paper's way without settling it.")
    elif suite.expected_best not in {a["name"] for a in arms}:
        agree = f"The paper's choice `{suite.expected_best}` has not finished yet."
    else:
        expected = next(a for a in arms if a["name"] == suite.expected_best)
        agree = (f"The paper's choice `{expected['name']}` scores {expected['fd']['mean']:.1f}: "
                 + ("a disagreement with the paper's direction at this scale."
                    if not _overlap(expected["fd"], best["fd"])
                    else "behind, but inside the noise, so no disagreement is shown."))
    return f"{sentence} {agree}{_accuracy_sentence(arms)}"


def _accuracy_sentence(arms: list[dict[str, Any]]) -> str:
    """The classifier-accuracy ranking, which can disagree with the distance: a model can
    match the data's features and still ignore the label it was asked for."""
    if len(arms) < 2 or not all("accuracy" in a for a in arms):
        return ""
    ranked = sorted(arms, key=lambda a: -a["accuracy"]["mean"])
    best, second = ranked[0], ranked[1]
    if _overlap(best["accuracy"], second["accuracy"]):
        return (f" Class accuracy of the samples: `{best['name']}` is highest "
                f"({best['accuracy']['mean']:.3f}), inside the noise of `{second['name']}` "
                f"({second['accuracy']['mean']:.3f}).")
    return (f" Class accuracy of the samples: `{best['name']}` is highest "
            f"({best['accuracy']['mean']:.3f}), clear of every other arm's seed range "
            f"(next: `{second['name']}`, {second['accuracy']['mean']:.3f}).")


def _sampling_verdict(arms: list[dict[str, Any]]) -> str:
    """DDPM vs the better deterministic sampler at the two smallest budgets, and guidance
    in the interval vs everywhere, each at equal model evaluations."""
    by = {a["name"]: a for a in arms}
    nfes = sorted({a["target_nfe"] for a in arms})
    parts = []
    for nfe in nfes[:2]:
        ddpm = by.get(f"ddpm_{nfe}")
        deterministic = [by[n] for n in (f"ddim_{nfe}", f"heun_{nfe}") if n in by]
        if ddpm is None or not deterministic:
            continue
        best = min(deterministic, key=lambda a: a["fd"]["mean"])
        word = ("beats" if best["fd"]["hi"] < ddpm["fd"]["lo"] else
                "is inside the noise of" if _overlap(best["fd"], ddpm["fd"]) else "trails")
        parts.append(f"at {nfe} evaluations the better deterministic sampler "
                     f"(`{best['name']}`, {best['fd']['mean']:.1f}) {word} DDPM "
                     f"({ddpm['fd']['mean']:.1f})")
    interval_words = []
    for nfe in nfes:
        full, band = by.get(f"ddpm_cfg_{nfe}"), by.get(f"ddpm_cfg_interval_{nfe}")
        if full is None or band is None:
            continue
        word = ("better than" if band["fd"]["hi"] < full["fd"]["lo"] else
                "worse than" if band["fd"]["lo"] > full["fd"]["hi"] else "inside the noise of")
        interval_words.append(f"at {nfe} evaluations {word} guidance everywhere "
                              f"({band['fd']['mean']:.1f} vs {full['fd']['mean']:.1f})")
    joined = "; ".join(parts)
    sentences = [joined[:1].upper() + joined[1:] + "."] if parts else []
    if parts:
        sentences.append(
            "So the claim that deterministic samplers need fewer evaluations "
            + ("holds here." if any(" beats DDPM" in p for p in parts) else
               "is not reproduced at this scale."))
    if interval_words:
        sentences.append("Guidance only in the interval is "
                         + "; ".join(interval_words) + ": "
                         + ("at least as good as guidance everywhere, as claimed."
                            if not any("worse than" in w for w in interval_words) else
                            "worse somewhere, against the claim."))
    accuracy = []
    for nfe in nfes:
        trio = [by.get(f"{n}_{nfe}") for n in ("ddpm", "ddpm_cfg", "ddpm_cfg_interval")]
        if all(a is not None and "accuracy" in a for a in trio):
            accuracy.append(f"at {nfe} evaluations {trio[0]['accuracy']['mean']:.3f} "
                            f"unguided, {trio[1]['accuracy']['mean']:.3f} guided everywhere, "
                            f"{trio[2]['accuracy']['mean']:.3f} in the interval")
    if accuracy:
        sentences.append("Class accuracy of DDPM's samples: " + "; ".join(accuracy) + ".")
    return " ".join(sentences) or "No pair of arms here is compared at equal evaluations."


def _markdown_training(summary: dict[str, Any], figures: dict[str, str]) -> list[str]:
    has_acc = all("accuracy" in a for a in summary["arms"])
    head = ["arm", "fd_effnet_lite0: mean (per seed)", "Δ vs first arm", "inside noise?",
            "kid_effnet_lite0"]
    head += ["classifier accuracy"] if has_acc else []
    head += ["train MFLOP / image", "params", "train wall time / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, a in enumerate(summary["arms"]):
        row = [f"`{a['name']}`: {a['label']}", _fmt(a["fd"]),
               "—" if i == 0 else f"{a['delta_fd']:+.1f}",
               "—" if i == 0 else ("yes" if a["inside_noise_of_reference"] else "no"),
               _fmt(a["kid"], 3) if "kid" in a else "n/a"]
        row += [_fmt(a["accuracy"], 3)] if has_acc else []
        row += [f"{a['train_flops_per_image'] / 1e6:.0f}", f"{a['params'] / 1e6:.2f}M",
                f"{a['train_seconds']['mean'] / 60:.1f} min"
                + (" (resumed)" if a["resumed"] else "")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _markdown_sampling(summary: dict[str, Any]) -> list[str]:
    arms = summary["arms"]
    families = []
    for a in arms:
        family = a["name"].rsplit("_", 1)[0]
        if family not in families:
            families.append(family)
    nfes = sorted({a["target_nfe"] for a in arms})
    lines = ["| sampler | " + " | ".join(f"{n} NFE" for n in nfes) + " | s / image at 64 NFE |",
             "|" + " --- |" * (len(nfes) + 2)]
    by = {a["name"]: a for a in arms}
    for family in families:
        cells = []
        for n in nfes:
            a = by.get(f"{family}_{n}")
            cells.append("—" if a is None else
                         f"{_fmt(a['fd'])}" + ("" if a["nfe"] == n else f" [{a['nfe']} NFE, "
                                               f"{a['options']['num_steps']} steps]"))
        last = by.get(f"{family}_64")
        speed = "—" if last is None else f"{last['seconds_per_image']['mean'] * 1e3:.1f} ms"
        label = by[f"{family}_{nfes[-1]}"]["label"] if f"{family}_{nfes[-1]}" in by else family
        label = re.sub(r", \d+ steps$", "", label)  # The family, not one step count.
        lines.append(f"| `{family}`: {label} | " + " | ".join(cells)
                     + f" | {speed} |")
    if all("accuracy" in a for a in arms):
        lines += ["", "Classifier accuracy of the samples (mean over models):", "",
                  "| sampler | " + " | ".join(f"{n} NFE" for n in nfes) + " |",
                  "|" + " --- |" * (len(nfes) + 1)]
        for family in families:
            cells = [("—" if f"{family}_{n}" not in by else
                      f"{by[f'{family}_{n}']['accuracy']['mean']:.3f}") for n in nfes]
            lines.append(f"| `{family}` | " + " | ".join(cells) + " |")
    return lines


def plot_suite(summary: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Writes the suite's figures; returns {kind: file name}."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    name, arms, figures = summary["suite"], summary["arms"], {}
    if summary["kind"] == "training":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for a in arms:
            curves = [np.asarray(c, np.float64) for c in a["loss"] if c]
            if curves:
                n = min(len(c) for c in curves)
                steps = curves[0][:n, 0]
                mean = np.mean([c[:n, 1] for c in curves], axis=0)
                axes[0].plot(steps, mean, label=a["name"])
            evals = a["fd_by_step"]
            steps = sorted(set.intersection(*[set(e) for e in evals]))
            values = np.array([[e[s] for s in steps] for e in evals])
            axes[1].plot(steps, values.mean(0), marker="o", label=a["name"])
            axes[1].fill_between(steps, values.min(0), values.max(0), alpha=0.2)
        axes[0].set(xlabel="training step", ylabel="training loss (mean over seeds)",
                    yscale="log", title="loss")
        axes[1].set(xlabel="training step", ylabel="fd_effnet_lite0 (band: seed range)",
                    title="sample quality during training")
        for ax in axes:
            ax.legend(fontsize=8)
        fig.tight_layout()
        figures["curves"] = f"{name}_curves.png"
        fig.savefig(os.path.join(out_dir, figures["curves"]), dpi=90)
        plt.close(fig)
    else:
        from matplotlib import ticker  # pylint: disable=g-import-not-at-top
        has_acc = all("accuracy" in a for a in arms)
        fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4),
                                 squeeze=False)
        families = {}
        for a in arms:
            families.setdefault(a["name"].rsplit("_", 1)[0], []).append(a)
        panels = [("fd", "fd_effnet_lite0 (band: model seeds)")]
        panels += [("accuracy", "classifier accuracy (band: model seeds)")] if has_acc else []
        for ax, (key, ylabel) in zip(axes[0], panels):
            for family, members in families.items():
                members = sorted(members, key=lambda a: a["nfe"])
                x = [a["nfe"] for a in members]
                ax.plot(x, [a[key]["mean"] for a in members], marker="o", label=family)
                ax.fill_between(x, [a[key]["lo"] for a in members],
                                [a[key]["hi"] for a in members], alpha=0.15)
            ax.set(xscale="log", xlabel="model evaluations per sample", ylabel=ylabel)
            ax.set_xticks([8, 16, 32, 64], ["8", "16", "32", "64"])
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.legend(fontsize=8)
        fig.suptitle(summary["title"], fontsize=10)
        fig.tight_layout()
        figures["curves"] = f"{name}_fd_vs_nfe.png"
        fig.savefig(os.path.join(out_dir, figures["curves"]), dpi=90)
        plt.close(fig)
    shown = [a for a in arms if os.path.exists(a["grid"])]
    if summary["kind"] == "sampling":
        shown = [a for a in shown if a["target_nfe"] == 16]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False)
        for ax, a in zip(axes[0], shown):
            ax.imshow(np.asarray(Image.open(a["grid"])), cmap="gray")
            ax.set_title(a["name"], fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        figures["grids"] = f"{name}_samples.png"
        fig.savefig(os.path.join(out_dir, figures["grids"]), dpi=90)
        plt.close(fig)
    return figures


def _wall_time(s: dict[str, Any]) -> str:
    """The suite's measured cost: its runs' training wall times (with their periodic
    evaluations), summed."""
    if s["kind"] == "sampling":
        return "sampling time per image in the table"
    runs = [t for a in s["arms"] for t in a["train_seconds"]["values"]]
    if not runs:
        return "no run has finished yet"
    return (f"its {len(runs)} finished runs took {sum(runs) / 60:.1f} min of training and "
            "evaluation in all; per run in the table")


def suite_markdown(summary: dict[str, Any], figures: dict[str, str]) -> str:
    s = summary
    lines = [f"## {s['title']} (`{s['suite']}`)", "",
             f"**Paper.** {s['claim']}", "",
             f"**Command.** `{s['command']}` ({_wall_time(s)}; the invocation that wrote "
             f"this took {s['seconds'] / 60:.1f} min, load average {s['load']} at its end, "
             "counting only work not already done).", "",
             f"**Budget.** {s['budget']} per run, seeds {s['seeds']}. "
             f"**Evaluation.** {s['protocol']}.", ""]
    if s.get("missing"):
        lines += [f"**Partial report**: {len(s['missing'])} runs had not finished when it was "
                  f"written ({', '.join(s['missing'])}); re-running the command completes them "
                  "and rewrites this section.", ""]
    lines += (_markdown_training(s, figures) if s["kind"] == "training"
              else _markdown_sampling(s))
    lines += ["", f"**Result.** {s['verdict']} **Why this scale may differ:** {s['caveat']}", ""]
    for kind in ("curves", "grids"):
        if kind in figures:
            lines += [f"![{s['suite']} {kind}]({figures[kind]})", ""]
    return "\n".join(lines)


def write_suite(summary: dict[str, Any], out_dir: str) -> str:
    """Writes ``<suite>.json``, the figures and ``<suite>.md``; returns the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    figures = plot_suite(summary, out_dir)
    summary = dict(summary, figures=figures)
    with open(os.path.join(out_dir, f"{summary['suite']}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = suite_markdown(summary, figures)
    with open(os.path.join(out_dir, f"{summary['suite']}.md"), "w") as f:
        f.write(f"# {summary['title']}\n" + text.split("\n", 1)[1])
    return text


def write_index(out_dir: str) -> None:
    """Rebuilds ``README.md`` from every ``<suite>.json`` in ``out_dir``."""
    sections, missing = [], []
    for name, suite in suites_lib.SUITES.items():
        path = os.path.join(out_dir, f"{name}.json")
        if os.path.exists(path):
            summary = json.loads(open(path).read())
            sections.append(suite_markdown(summary, summary["figures"]))
        else:
            missing.append(f"- `{name}`, {suite.title}: "
                           f"`python -m simple_diffusion.experiments --suite={name}`")
    header = [
        "# Results: the papers' ablations at small scale", "",
        "Generated by `python -m simple_diffusion.experiments --suite=<name> "
        "--workdir=experiments/` (`simple_diffusion/experiments/`); never edited by hand. "
        "Each suite trains every arm for the same budget with the same seeds and evaluates "
        "every run with one protocol. Re-running resumes interrupted runs and skips finished "
        "ones; `--scale=full` runs the same suites ~100× longer for an accelerator. "
        "One run of a suite on its own is `python -m simple_diffusion.main "
        "--config=configs/experiment.py:<suite>,<arm>,<scale> --config.seed=<k> "
        "--workdir=...`.", "",
        "Spread: every number is the mean over seeds (two per arm) with the per-seed values "
        "in brackets. \"Inside noise\" means the arms' seed ranges overlap, a coarse test with "
        "two seeds. Wall times were measured on a 2-core CPU VM, often shared with other "
        "jobs; the load average is given beside them.", ""]
    if os.path.exists(os.path.join(out_dir, "distillation_demo.md")):
        header += ["Also here: [`distillation_demo.md`](distillation_demo.md), progressive "
                   "distillation of the demo (`python -m simple_diffusion.distill --report`, "
                   "see `docs/distillation.md`).", ""]
    if missing:
        header += ["Not run yet:", "", *missing, ""]
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(header + sections))
