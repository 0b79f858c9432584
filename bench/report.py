"""Benchmark results -> a markdown table per group (ratios against nn.LSTM) and a PNG plot.

    python -m pytest bench --benchmark-json=out.json
    python -m bench.report out.json [more.json | results.jsonl ...] [--out DIR]

Reads pytest-benchmark JSON files and the JSON-lines files of `--bench-jsonl`; by default writes
bench/results/<date>-<device>-<commit>/{results.md, benchmarks.json, ratios.png}. Only measured numbers
appear: a provider that did not run in a group is absent from its table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/report.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.providers import ALL_APPLIED, BASELINE, EVERY_REGULARIZER, MODES, PROVIDERS_BY_NAME, SHAPES_BY_NAME

RESULTS = Path(__file__).resolve().parent / "results"
DTYPE_ORDER = ("fp32", "fp16", "bf16")
MIB = 2**20


def load(paths: list[Path]) -> tuple[list[dict], str | None]:
    """Benchmark entries from every file (a later file wins for the same test), and the run's date."""
    entries, date = {}, None
    for path in paths:
        text = path.read_text()
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows = data.get("benchmarks", [])
            for row in rows:
                row.setdefault("datetime", data.get("datetime"))
        for row in rows:
            if row.get("stats") and "provider" in row.get("extra_info", {}):
                row["stats"].pop("data", None)
                entries[row["fullname"]] = row
                date = date or row.get("datetime")
    return list(entries.values()), date


def group_key(entry: dict) -> tuple:
    info = entry["extra_info"]
    shapes = list(SHAPES_BY_NAME)
    return (
        info["device_type"] != "cuda",
        shapes.index(info["shape"]) if info["shape"] in shapes else len(shapes),
        info["shape"],
        DTYPE_ORDER.index(info["dtype"]) if info["dtype"] in DTYPE_ORDER else len(DTYPE_ORDER),
        MODES.index(info["mode"]) if info["mode"] in MODES else len(MODES),
    )


def provider_rank(entry: dict) -> int:
    names = list(PROVIDERS_BY_NAME)
    name = entry["extra_info"]["provider"]
    return names.index(name) if name in names else len(names)


def groups(entries: list[dict]) -> dict[str, list[dict]]:
    by_group: dict[str, list[dict]] = {}
    for entry in sorted(entries, key=lambda e: (group_key(e), provider_rank(e))):
        by_group.setdefault(entry["group"], []).append(entry)
    return by_group


def applied(info: dict) -> str:
    names = [name for name in info.get("regularizers", []) if not (name == "dropout" and info["num_layers"] == 1)]
    if not names:
        return "none"
    if set(names) == set(ALL_APPLIED) - ({"dropout"} if info["num_layers"] == 1 else set()):
        return "all"
    return ", ".join(name.replace("_dropout", "") for name in names)


def runs_as(info: dict) -> str:
    if "backend" in info:
        text = info["backend"]
        if "forward_loop" in info:
            loops = [f"{info['forward_loop']} forward"]
            if info.get("mode") == "fwdbwd" and "backward_loop" in info:
                loops.append(f"{info['backward_loop']} backward")
            text += f" ({', '.join(loops)})"
        if "fallback" in info:
            text += " **(auto fell back)**"
        return text
    return info.get("kernel") or info.get("compiled") and "torch.compile" or "PyTorch ops"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def median(group: list[dict], provider: str) -> float | None:
    for entry in group:
        if entry["extra_info"]["provider"] == provider:
            return entry["stats"]["median"]
    return None


def peak(group: list[dict], provider: str) -> float | None:
    for entry in group:
        if entry["extra_info"]["provider"] == provider:
            return entry["extra_info"].get("peak_bytes")
    return None


def entry_of(group: list[dict], provider: str) -> dict | None:
    return next((e for e in group if e["extra_info"]["provider"] == provider), None)


def group_table(name: str, group: list[dict]) -> list[str]:
    info = group[0]["extra_info"]
    dtype = info["dtype"] + (" (TF32 matmuls)" if info.get("tf32") else "")
    threads = f", {info['threads']} threads" if info.get("threads") else ""
    mode = "forward + backward" if info["mode"] == "fwdbwd" else "forward (training mode, autograd recording)"
    lines = [
        f"### {name}",
        "",
        f"{info['device']}{threads}; {info['shape_dims']}; {dtype}; {mode}",
        "",
        "| provider | runs as | regularizers | median ms | IQR ms | rounds | time vs nn.LSTM | peak MiB "
        "| peak vs nn.LSTM |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base_time, base_peak = median(group, BASELINE), peak(group, BASELINE)
    for entry in group:
        e, stats = entry["extra_info"], entry["stats"]
        ratio = stats["median"] / base_time if base_time else None
        peak_bytes = e.get("peak_bytes")
        peak_ratio = peak_bytes / base_peak if peak_bytes is not None and base_peak else None
        lines.append(
            f"| {e['label']} | {runs_as(e)} | {applied(e)} | {fmt_ms(stats['median'])} | {fmt_ms(stats['iqr'])} | "
            f"{stats['rounds']} | {fmt_ratio(ratio)} | {'-' if peak_bytes is None else f'{peak_bytes / MIB:.0f}'} | "
            f"{fmt_ratio(peak_ratio)} |"
        )
    present = {e["extra_info"]["provider"] for e in group}
    missing = [
        p.label for p in PROVIDERS_BY_NAME.values() if info["device_type"] in p.devices and p.name not in present
    ]
    if missing:
        lines += ["", f"No result (failed, skipped, deselected or not reached): {', '.join(missing)}."]
    fallbacks = {e["extra_info"]["fallback"] for e in group if "fallback" in e["extra_info"]}
    for reason in sorted(fallbacks):
        lines += ["", f"fused_rnn's auto backend fell back to the reference here: {reason}."]
    return lines + [""]


def target_rows(by_group: dict[str, list[dict]]) -> list[str]:
    """The issues' targets, each checked against the measured groups it is stated on."""
    checks = []  # (target, group name, value text, met or None)

    def ratio_check(target, group_name, group, numerator, denominator, limit, at_most, use_peak=False):
        get = peak if use_peak else median
        a, b = get(group, numerator), get(group, denominator)
        if a is None or b is None or b == 0:
            checks.append((target, group_name, "-", None))
            return
        value = a / b
        met = value <= limit if at_most else value >= limit
        fused = entry_of(group, "fused_rnn")
        if fused and "fallback" in fused["extra_info"]:
            met = "not evaluated: fused_rnn ran the reference fallback"
        checks.append((target, group_name, f"{value:.2f}x", met))

    for name, group in by_group.items():
        info = group[0]["extra_info"]
        if info["mode"] != "fwdbwd":
            continue
        if info["device_type"] == "cuda" and info["shape"] in ("ptb_awd", "h512"):
            ratio_check(
                "fused_rnn (all regularizers) <= 1.0x nn.LSTM (none)", name, group, "fused_rnn", BASELINE, 1.0, True
            )
            ratio_check("LSTM cell loop >= 10x fused_rnn", name, group, "cell_loop", "fused_rnn", 10.0, False)
            ratio_check("fused_rnn < 1.0x AWD cuDNN wrapper", name, group, "fused_rnn", "awd_lstm", 1.0, True)
            ratio_check(
                "fused_rnn peak <= 1.1x nn.LSTM peak", name, group, "fused_rnn", BASELINE, 1.1, True, use_peak=True
            )
        if info["device_type"] == "cuda" and info["dtype"] == "fp16" and info["batch"] <= 64 and info["hidden_size"] <= 1024:
            ratio_check(
                "fused_rnn (all regularizers) <= 0.8x nn.LSTM (none), fp16, B <= 64, H <= 1024", name, group,
                "fused_rnn", BASELINE, 0.8, True,
            )
        if info["device_type"] == "cpu" and info["shape"] == "cpu_h256x2":
            ratio_check(
                "fused_rnn (all regularizers) <= 1.2x nn.LSTM (none)", name, group, "fused_rnn", BASELINE, 1.2, True
            )
            ratio_check(
                "reference >= 3x fused_rnn (same regularizers)", name, group, "reference", "fused_rnn", 3.0, False
            )
    if not checks:
        return []
    lines = [
        "## Targets",
        "",
        "Forward + backward, measured ratios against the issues' targets. Where fused_rnn's auto backend fell",
        "back to the reference, the ratio measures the reference, not a kernel, and the target is not evaluated.",
        "",
        "| target | group | measured | status |",
        "|---|---|---:|---|",
    ]
    for target, group_name, value, met in checks:
        if isinstance(met, str) or met is None:
            status = met or "not measured"
        else:
            status = "met" if met else "**not met**"
        lines.append(f"| {target} | {group_name} | {value} | {status} |")
    return lines + [""]


def header(entries: list[dict], date: str | None, notes: list[str]) -> list[str]:
    info = entries[0]["extra_info"]
    state = {True: " (with uncommitted changes)", None: " (working tree state not recorded)"}.get(
        info.get("commit_dirty"), ""
    )
    commit = (info.get("commit") or "unknown")[:10] + state
    devices = sorted({e["extra_info"]["device"] for e in entries})
    versions = f"torch {info['torch']}, Triton {info.get('triton') or '-'}, Python {info['python']}"
    if info.get("cuda"):
        versions += f", CUDA {info['cuda']}, cuDNN {info['cudnn']}"
    regularizers = ", ".join(f"{k}={v}" for k, v in EVERY_REGULARIZER.items())
    return [
        f"# fused_rnn benchmarks: {', '.join(devices)}",
        "",
        f"- date: {(date or 'unknown')[:19].replace('T', ' ')} UTC; commit {commit}; fused_rnn {info['fused_rnn']}",
        f"- {versions}",
        "- time: median over rounds of one training step (pytest-benchmark), the GPU synchronised inside the timed",
        "  call, after warm-up calls that absorb compilation; a [T, B, I] time-major input that requires grad;",
        "  fwdbwd: forward, backward of a fixed output gradient, gradients set to None (as zero_grad does)",
        "- time vs nn.LSTM: median / median of nn.LSTM with no regularizer in the same table (cuDNN on CUDA)",
        "- peak: bytes one step allocates on the GPU above what was resident before it (activations, masks,",
        "  workspace, gradients); not measured on CPU",
        f'- "all" regularizers: {regularizers} (between-layer dropout only with 2+ layers);',
        "  the AWD wrapper applies only what cuDNN allows around it: weight drop, locked input/between/output dropout",
        "- fp32 on CUDA runs with TF32 matmuls, as cuDNN does by default",
        *(f"- note: {note}" for note in notes),
        "",
    ]


def plot(by_group: dict[str, list[dict]], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    shown = {name: group for name, group in by_group.items() if median(group, BASELINE)}
    if not shown:
        return "no group has an nn.LSTM baseline: no plot"
    columns = min(3, len(shown))
    rows = -(-len(shown) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 2.6 * rows), squeeze=False)
    for axis, (name, group) in zip(axes.flat, shown.items()):
        base = median(group, BASELINE)
        labels = [e["extra_info"]["provider"] for e in group]
        ratios = [e["stats"]["median"] / base for e in group]
        axis.barh(labels, ratios, color=["tab:gray" if label == BASELINE else "tab:blue" for label in labels])
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.invert_yaxis()
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=8)
        for y, ratio in enumerate(ratios):
            axis.text(ratio, y, f" {ratio:.2f}x", va="center", fontsize=7)
    for axis in list(axes.flat)[len(shown) :]:
        axis.set_visible(False)
    figure.supxlabel("time / nn.LSTM time (log scale, lower is faster)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return f"wrote {path}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out(entries: list[dict], date: str | None) -> Path:
    info = entries[0]["extra_info"]
    gpu = next((e["extra_info"]["device"] for e in entries if e["extra_info"]["device_type"] == "cuda"), None)
    device = gpu or f"cpu-{info.get('cpu', 'unknown')}"
    commit = (info.get("commit") or "unknown")[:7] + ("-dirty" if info.get("commit_dirty") else "")
    return RESULTS / f"{(date or 'unknown')[:10]}-{slug(device)}-{commit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="pytest-benchmark JSON or --bench-jsonl files")
    parser.add_argument("--out", type=Path, help="output directory (default: bench/results/<date>-<device>-<commit>)")
    parser.add_argument("--note", action="append", default=[], help="a line for the header (repeatable)")
    args = parser.parse_args(argv)
    found = [path for path in args.inputs if path.exists()]
    if not found:
        print(f"no input file exists: {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return 1
    entries, date = load(found)
    if not entries:
        print("no benchmark results in the input", file=sys.stderr)
        return 1
    out = args.out or default_out(entries, date)
    out.mkdir(parents=True, exist_ok=True)
    by_group = groups(entries)
    lines = header(entries, date, args.note) + target_rows(by_group) + ["## Results", ""]
    for name, group in by_group.items():
        lines += group_table(name, group)
    (out / "results.md").write_text("\n".join(lines))
    (out / "benchmarks.json").write_text(
        json.dumps({"date": date, "benchmarks": entries}, indent=1, default=str) + "\n"
    )
    print(f"wrote {out / 'results.md'} ({len(entries)} results in {len(by_group)} groups)")
    print(plot(by_group, out / "ratios.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
