"""Markdown tables of the benchmark results (two columns: metric, value)."""

from typing import Any


def _bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def si(x: float, unit: str) -> str:
    """``x`` with an SI prefix: si(2.5e12, 'FLOP') == '2.500 TFLOP'."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {prefix}{unit}"
    return f"{x:.3f} {unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: list[tuple[str, str]]) -> str:
    """``rows`` of (metric, value) as a Markdown table."""
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def device_rows(device: dict[str, Any], peak: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The device and its measured matmul peak."""
    rows = [("device", f"{device['device_count']} x {device['device_kind']} "
                       f"({device['platform']}), jax {device['jax_version']}")]
    if peak:
        sheet = peak.get("datasheet_flops_per_sec")
        rows.append(("matmul peak", f"{si(peak['flops_per_sec'], 'FLOP/s')} "
                     f"({peak['size']}^2 {peak['dtype']}"
                     + (f"; datasheet {si(sheet, 'FLOP/s')}" if sheet else "") + ")"))
    return rows


def train_rows(t: dict[str, Any], platform: str = "") -> list[tuple[str, str]]:
    """Train-step rows of ``bench.train`` results (with ``add_flops``)."""
    rows = [
        ("train batch / params", f"{t['batch_size']}, {t['num_params']:,} params"),
        ("train compile", f"{t['compile_seconds']:.2f} s (+ trace {t['trace_seconds']:.2f} s)"),
        ("train step (median)", f"{1e3 * t['step_seconds']:.1f} ms "
                                f"(min {1e3 * t['step_seconds_min']:.1f} ms, unsynced loop "
                                f"{1e3 * t['loop_step_seconds']:.1f} ms)"),
        ("train images/s", f"{t['images_per_sec']:.1f}"),
        ("model FLOPs / step", f"{si(t['flops_per_step'], 'FLOP')} "
                               f"({si(t['flops_per_image'], 'FLOP')} / image; with remat "
                               f"recompute {si(t['hardware_flops_per_step'], 'FLOP')})"),
        ("achieved", f"{si(t['flops_per_sec'], 'FLOP/s')} (model FLOPs)"),
        ("MFU (vs matmul peak)", f"{_pct(t['mfu'])} (HFU {_pct(t['hfu'])})"),
    ]
    if t.get("mfu_datasheet") is not None:
        rows.append(("MFU (vs datasheet peak)", _pct(t["mfu_datasheet"])))
    if platform == "cpu" and "mfu_cpu_time" in t:
        rows += [("train step CPU time", f"{1e3 * t['step_cpu_seconds']:.1f} ms"),
                 ("of which kernel", f"{1e3 * t['step_system_seconds']:.1f} ms"),
                 ("minor page faults per step", f"{t['step_minor_faults']:.0f}"),
                 ("MFU by CPU time", _pct(t["mfu_cpu_time"]))]
    mem = t.get("memory", {})
    if mem:
        rows.append(("train peak memory / device", f"{_bytes(mem['peak_bytes'])} "
                     f"(temp {_bytes(mem['temp_bytes'])}, args {_bytes(mem['argument_bytes'])})"))
    dms = t.get("device_memory_stats")
    if dms and "peak_bytes_in_use" in dms:
        rows.append(("device peak_bytes_in_use", _bytes(dms["peak_bytes_in_use"])))
    for name, part in t.get("breakdown", {}).items():
        rows.append((f"model {name.replace('_', '+')}",
                     f"{1e3 * part['seconds']:.1f} ms, {si(part['flops'], 'FLOP')}, "
                     f"{si(part['flops_per_sec'], 'FLOP/s')} ({_pct(part.get('mfu'))})"))
    return rows


def compile_only_table(t: dict[str, Any]) -> str:
    """``train --compile_only`` results (``bench.train.analyze_train_step`` + FLOPs)."""
    mem = t["memory"]
    return table([
        ("train batch / params", f"{t['batch_size']}, {t['num_params']:,} params"),
        ("train compile", f"{t['compile_seconds']:.2f} s (+ trace {t['trace_seconds']:.2f} s)"),
        ("model FLOPs / step", f"{si(t['flops_per_step'], 'FLOP')} "
                               f"({si(t['flops_per_step'] / t['batch_size'], 'FLOP')} / image; "
                               f"with remat recompute {si(t['hardware_flops_per_step'], 'FLOP')})"),
        ("state / device (donated)", _bytes(t["state_bytes_per_device"])),
        ("temporaries / device", _bytes(mem["temp_bytes"])),
        ("peak estimate / device", _bytes(mem["peak_bytes"])),
    ])


def sample_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """Sampler rows of ``bench.sample`` results."""
    label = " (extrapolated)" if s["extrapolated_to_256_steps"] else ""
    rows = [
        (f"{s['sampler']} sampler", f"{s['num_steps']} steps, batch {s['batch']}, guidance "
                                    f"{s['guidance_scale']}, {s['model_evaluations']} "
                                    "network evaluations / sample"),
        (f"{s['sampler']} compile", f"{s['compile_seconds']:.2f} s"),
        (f"{s['sampler']} time / step", f"{1e3 * s['seconds_per_step']:.2f} ms"),
        (f"{s['sampler']} FLOPs / call", f"{si(s['flops_per_call'], 'FLOP')}, "
                                         f"{si(s['flops_per_sec'], 'FLOP/s')}"
                                         + (f" ({_pct(s['mfu'])} MFU)" if "mfu" in s else "")),
        (f"{s['sampler']} images/s @256 steps{label}", f"{s['images_per_sec_256_steps']:.3f}"),
    ]
    if "overhead_fraction" in s:
        rows.append((f"{s['sampler']} overhead vs bare network scan",
                     f"{_pct(s['overhead_fraction'])} (median), "
                     f"{_pct(s['overhead_fraction_paired'])} (median of pairs)"))
    return rows


def benchmark_table(results: dict[str, Any]) -> str:
    """The ``train`` / ``sample`` / default subcommand's results."""
    rows = device_rows(results["device"], results.get("peak"))
    c = results.get("config")
    if c:
        rows.append(("model", f"{c['model']} {c['image_size']}px, {c['dtype']}, "
                              f"remat {c['remat']}, scan_layers {c['scan_layers']}"))
    if "train" in results:
        rows += train_rows(results["train"], results["device"]["platform"])
    for s in results.get("sample", []):
        rows += sample_rows(s)
    return table(rows)


def _config_flops_rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the ``flops`` subcommand's counts for one config."""
    def per(key):
        return f"{si(f[key], 'FLOP')} ({si(f[key] / f['batch_size'], 'FLOP')} / image)"

    s = f["sampler"]
    return [
        ("model", f"{f['model']} {f['image_size']}px, {f['num_params']:,} params, "
                  f"batch {f['batch_size']}"),
        ("forward (model FLOPs)", per("forward_flops")),
        ("train step (model FLOPs)", per("train_step_flops")),
        ("train step (hardware FLOPs, with remat)", per("train_step_hardware_flops")),
        ("train step as XLA counts the run's program",
         per("train_step_xla_flops") + "; each loop body once"),
        ("sampler call (model FLOPs)",
         f"{si(s['flops_per_call'], 'FLOP')}: {s['sampler']}, {s['num_steps']} steps, "
         f"guidance {s['guidance_scale']}, {f['sampler_batch']} images, "
         f"{s['model_evaluations']} network evaluations / image"),
    ]


def flops_table(results: dict[str, Any]) -> str:
    """The ``flops`` subcommand's results: the config's counts, then the presets."""
    lines = [table(_config_flops_rows(results["flops"]))] if results.get("flops") else []
    if results.get("presets"):
        lines += ["", "| preset | model | resolution | params | FLOPs / forward (batch 1) |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {p['preset']} | {p['model']} | {p['image_size']} | "
                  f"{p['num_params'] / 1e6:,.2f}M | {si(p['forward_flops'], 'FLOP')} |"
                  for p in results["presets"]]
    return "\n".join(lines)


def gpu_table(results: dict[str, Any]) -> str:
    """The ``gpu`` subcommand's results."""
    c = results["config"]
    rows = device_rows(results["device"], results["peak"])
    rows.append(("model", f"{c['model']} {c['image_size']}px, {c['dtype']}, remat {c['remat']}, "
                          f"scan_layers {c['scan_layers']}"))
    rows.append(("batch search", ", ".join(
        f"{a['batch_size']} {'fits' if a['fits'] else 'OOM'}" for a in results["batch_search"])))
    if "train" in results:
        rows += train_rows(results["train"], results["device"]["platform"])
    sample = results.get("sample")
    if sample:
        rows += [("sampler", sample["error"])] if "error" in sample else sample_rows(sample)
    mesh = results.get("mesh_comparison")
    if mesh:
        t, d = results["train"], mesh["data"]
        fsdp = f"{1e3 * t['step_seconds']:.1f} ms, MFU {_pct(t['mfu'])}, state " \
               f"{_bytes(t['state_bytes_per_device'])} / device"
        if "error" in d:
            data = d["error"]
        else:
            data = f"{1e3 * d['step_seconds']:.1f} ms, MFU {_pct(d['mfu'])}, state " \
                   f"{_bytes(d['state_bytes_per_device'])} / device, peak " \
                   f"{_bytes(d['memory'].get('peak_bytes', 0))}"
        rows += [(f"mesh fsdp (batch {mesh['batch_size']})", fsdp),
                 (f"mesh data (batch {mesh['batch_size']})", data)]
    if results.get("skipped"):
        rows.append(("skipped (time budget)", ", ".join(results["skipped"])))
    return table(rows)
