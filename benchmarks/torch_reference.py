r"""This project's CPU train step against lucidrains' PyTorch U-ViT, timed side by side.

  .venv/bin/python benchmarks/torch_reference.py [--venv=~/.cache/simple_diffusion/torch_ref]
      [--sizes=64,128] [--rounds=2] [--repeats=10] [--output=docs/cpu_reference.md]
      [--variant='bf16=--config.model.dtype=bfloat16']
      [--variant='default malloc=SIMPLE_DIFFUSION_DEFAULT_MALLOC=1']

The reference: ``denoising_diffusion_pytorch.simple_diffusion.UViT(dim=64, dim_mults=(1, 2, 4),
vit_depth=6, attn_heads=4, attn_dim_head=32)`` (patch 1 at 64x64, batch 8; patch 2 at
128x128, batch 4) trained by its ``GaussianDiffusion`` (v objective) with Adam, float32,
``torch.set_num_threads(--threads)``: forward, backward and ``optimizer.step`` per step. It
runs in its own virtual environment, made on first use with ``pip install torch==2.13.0
denoising-diffusion-pytorch==2.3.4`` (never a dependency of this project or its CI); its
module file is loaded on its own, because the package's ``__init__`` imports torchvision.
The reference runs twice per round: in the default environment and with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, which this project's command lines restart with
(``simple_diffusion/host_malloc.py``); "× reference" is against the faster of the two.

This project: ``python -m simple_diffusion.benchmark train`` on ``configs/cpu_reference.py``
(the trainer's own jitted step: forward, backward, Adam, EMA), at the reference's layout
(conv channels 64, 64, 128) and at issue 13's first mapping (64, 128, 256), plus any
``--variant`` (label=extra flags; a ``NAME=value`` token with an upper-case NAME sets that
environment variable, e.g. ``XLA_FLAGS=...``).

Every measurement is its own process, and the processes alternate (reference, ours,
variants; ``--rounds`` times) so that a change in load hits both. The load average before
each is recorded: on a shared 2-core machine numbers are only comparable when it is quiet.
Writes ``--output`` (Markdown) and ``<output>.json``.
"""

import argparse
import json
import os
import pathlib
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

from simple_diffusion import host_malloc

REPO = pathlib.Path(__file__).resolve().parent.parent
REFERENCE_PACKAGES = ("torch==2.13.0", "denoising-diffusion-pytorch==2.3.4")
# size -> (image size, patch size, batch size).
SIZES = {"64": (64, 1, 8), "128": (128, 2, 4)}
# GLIBC_TUNABLES of each reference row -> its label.
REFERENCE_ROWS = {"": "reference", host_malloc.TUNABLE: f"reference, {host_malloc.TUNABLE}"}

# Runs inside the reference's virtual environment; argv[1] is a JSON of its settings.
REFERENCE_SCRIPT = r'''
import importlib.metadata, importlib.util, json, statistics, sys, time
import torch
from torch.utils.flop_counter import FlopCounterMode

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(0)
path = importlib.metadata.distribution("denoising-diffusion-pytorch").locate_file(
    "denoising_diffusion_pytorch/simple_diffusion.py")
spec = importlib.util.spec_from_file_location("lucidrains_simple_diffusion", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
model = module.UViT(dim=64, dim_mults=(1, 2, 4), vit_depth=6, attn_heads=4, attn_dim_head=32,
                    channels=3, patch_size=args["patch_size"])
diffusion = module.GaussianDiffusion(model, image_size=args["image_size"], channels=3,
                                     pred_objective="v")
optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4)
images = torch.rand(args["batch_size"], 3, args["image_size"], args["image_size"])

def step():
    optimizer.zero_grad(set_to_none=True)
    loss = diffusion(images)
    loss.backward()
    optimizer.step()
    return loss

with FlopCounterMode(display=False) as counter:
    step()
for _ in range(args["warmup"]):
    step()
times = []
for _ in range(args["repeats"]):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
a = torch.randn(2048, 2048)
matmul = []
for _ in range(10):
    start = time.perf_counter()
    a @ a
    matmul.append(time.perf_counter() - start)
print("RESULT " + json.dumps({
    "num_params": sum(p.numel() for p in model.parameters()),
    "flops_per_step": counter.get_total_flops(),
    "step_seconds": statistics.median(times), "step_seconds_all": times,
    "matmul_flops_per_sec": 2 * 2048**3 / statistics.median(matmul),
    "torch": torch.__version__}))
'''


def _load() -> float:
    return os.getloadavg()[0]


def ensure_reference_venv(venv: pathlib.Path) -> pathlib.Path:
    """The reference's python, making its virtual environment first if it is missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"Making the reference's virtual environment in {venv} ...", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
        subprocess.check_call([str(python), "-m", "pip", "install", "-q", *REFERENCE_PACKAGES])
    return python


def _environ_without_tunables() -> dict[str, str]:
    """This environment less GLIBC_TUNABLES: each process gets only the tunables its row
    names (this project's command lines then add theirs themselves)."""
    return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


def run_reference(python: pathlib.Path, size: str, tunables: str, args) -> dict:
    image_size, patch_size, batch_size = SIZES[size]
    settings = dict(image_size=image_size, patch_size=patch_size, batch_size=batch_size,
                    threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    env = _environ_without_tunables()
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    load = _load()
    out = subprocess.run([str(python), "-c", REFERENCE_SCRIPT, json.dumps(settings)],
                         env=env, capture_output=True, text=True, check=False)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"the reference failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(line[-1][len("RESULT "):])
    result.update(load_before=load, batch_size=batch_size,
                  images_per_sec=batch_size / result["step_seconds"],
                  flops_per_sec=result["flops_per_step"] / result["step_seconds"])
    return result


def run_ours(size: str, layout: str, extra: str, args) -> dict:
    """One `simple_diffusion.benchmark train` process; NAME=value tokens in `extra` set
    environment variables, the rest are flags."""
    env = dict(_environ_without_tunables(), JAX_PLATFORMS="cpu")
    flags = []
    for token in shlex.split(extra):
        name, sep, value = token.partition("=")
        if sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            env[name] = value
        else:
            flags.append(token)
    arg = size + (",issue" if layout == "issue" else "")
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "train.json")
        load = _load()
        out = subprocess.run(
            [sys.executable, "-m", "simple_diffusion.benchmark", "train",
             f"--config=configs/cpu_reference.py:{arg}", f"--repeats={args.repeats}",
             f"--warmup={args.warmup}", f"--output={output}", *flags],
            cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"the benchmark failed (rc {out.returncode}):\n"
                               f"{out.stderr[-3000:]}")
        with open(output) as f:
            results = json.load(f)
    train = results["train"]
    return {"load_before": load, "batch_size": train["batch_size"],
            "num_params": train["num_params"], "flops_per_step": train["flops_per_step"],
            "step_seconds": train["step_seconds"], "step_seconds_all": train["step_seconds_all"],
            "compile_seconds": train["compile_seconds"],
            "images_per_sec": train["images_per_sec"], "flops_per_sec": train["flops_per_sec"],
            "matmul_flops_per_sec": results["peak"]["flops_per_sec"],
            "dtype": results["config"]["dtype"], "extra": extra}


def markdown(record: dict) -> str:
    lines = [
        "<!-- generated by benchmarks/torch_reference.py; do not edit -->",
        "# This project's CPU train step against lucidrains' PyTorch U-ViT", "",
        f"Command: `{record['command']}` ({record['rounds']} alternating rounds, median of "
        f"{record['repeats']} steps each; {record['threads']} threads; the reference is "
        f"torch {record['torch']}, float32). Load average before each process: "
        f"{min(record['loads']):.2f}–{max(record['loads']):.2f}.", "",
        "| size | model | params | GFLOP / step | images/s (per round) | images/s | "
        "achieved GFLOP/s | × reference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, rows in record["sizes"].items():
        ref = max(statistics.median(r["images_per_sec"] for r in runs)
                  for name, runs in rows.items() if name in REFERENCE_ROWS.values())
        for name, runs in rows.items():
            ips = [r["images_per_sec"] for r in runs]
            gflops = statistics.median(r["flops_per_sec"] for r in runs) / 1e9
            first = runs[0]
            lines.append(
                f"| {size}×{size}, batch {first['batch_size']} | {name} | "
                f"{first['num_params'] / 1e6:.2f}M | {first['flops_per_step'] / 1e9:.1f} | "
                f"{', '.join(f'{x:.2f}' for x in ips)} | {statistics.median(ips):.2f} | "
                f"{gflops:.0f} | {statistics.median(ips) / ref:.2f}× |")
    matmul_ref = [r["matmul_flops_per_sec"] for s in record["sizes"].values()
                  for n, runs in s.items() if n in REFERENCE_ROWS.values() for r in runs]
    matmul_ours = [r["matmul_flops_per_sec"] for s in record["sizes"].values()
                   for n, runs in s.items() if n not in REFERENCE_ROWS.values() for r in runs]
    lines += ["", f"2048² float32 matmul, median of 10, in the same processes: torch "
              f"{statistics.median(matmul_ref) / 1e9:.0f} GFLOP/s, JAX "
              f"{statistics.median(matmul_ours) / 1e9:.0f} GFLOP/s.", "",
              "FLOPs: torch's `FlopCounterMode` for the reference (matmuls and convolutions), "
              "`simple_diffusion.flops` for this project (XLA's count of the lowered, unrolled "
              "step: every operation). \"× reference\" is against the faster reference row; "
              f"the second runs with GLIBC_TUNABLES={host_malloc.TUNABLE}, which this "
              "project's command lines restart with (simple_diffusion/host_malloc.py).", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default="~/.cache/simple_diffusion/torch_ref")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--layouts", default="matched,issue",
                        help="this project's layouts to time: matched, issue")
    parser.add_argument("--variant", action="append", default=[],
                        help="label=extra flags for another row of this project's model "
                             "(reference layout), e.g. 'bf16=--config.model.dtype=bfloat16'")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="docs/cpu_reference.md")
    args = parser.parse_args()
    python = ensure_reference_venv(pathlib.Path(os.path.expanduser(args.venv)))

    mine = [(f"this project, {layout} layout", layout, "") for layout in args.layouts.split(",")]
    for variant in args.variant:
        label, _, extra = variant.partition("=")
        mine.append((f"this project, {label}", "matched", extra))
    record = {"command": " ".join(["benchmarks/torch_reference.py", *sys.argv[1:]]),
              "rounds": args.rounds, "repeats": args.repeats, "threads": args.threads,
              "sizes": {}}
    for size in args.sizes.split(","):
        rows = record["sizes"][size] = {**{name: [] for name in REFERENCE_ROWS.values()},
                                        **{m[0]: [] for m in mine}}
        for round_ in range(args.rounds):
            for tunables, name in REFERENCE_ROWS.items():
                rows[name].append(run_reference(python, size, tunables, args))
                print(f"{size} round {round_}: {name} "
                      f"{rows[name][-1]['images_per_sec']:.2f} images/s", flush=True)
            for name, layout, extra in mine:
                rows[name].append(run_ours(size, layout, extra, args))
                print(f"{size} round {round_}: {name} "
                      f"{rows[name][-1]['images_per_sec']:.2f} images/s", flush=True)
    record["torch"] = next(iter(record["sizes"].values()))["reference"][0]["torch"]
    record["loads"] = [r["load_before"] for s in record["sizes"].values()
                       for runs in s.values() for r in runs]
    output = REPO / args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown(record))
    output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    print(f"Wrote {output} and {output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
