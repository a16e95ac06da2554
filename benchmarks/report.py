"""results.json, results.csv, results.md and throughput.png from the rows and the environment (atomic writes).

Also ``merge``: this run's rows with the rows of an earlier results.json that it did not redo.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import sys
from pathlib import Path

from benchmarks.common import TOLERANCE, atomic_write, write_json
from benchmarks.runtimes import RUNTIMES

# Columns of results.csv, in order (the headline figures first, then the rest).
COLUMNS = (
    "runtime",
    "mode",
    "device",
    "dtype",
    "batch",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "std_ms",
    "img_per_s",
    "compile_s",
    "max_rel_err",
    "top1_agreement",
    "tolerance",
    "within_tolerance",
    "first_call_s",
    "e2e_p50_ms",
    "pct_peak",
    "iters",
    "warmup_iters",
    "warmup_stable",
    "threads_intra",
    "threads_inter",
    "flags",
    "status",
)
PLOT = "throughput.png"


def _num(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits ('' for None)."""
    if value is None:
        return ""
    if value == 0:
        return "0"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _top1(row: dict) -> str:
    """Top-1 agreement with the Keras reference over the row's images (a reduced-precision row's real test)."""
    value = row.get("top1_agreement")
    return "" if value is None else f"{value:.0%}"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table; a mode skipped at every batch size takes one line."""
    lines = [
        "| runtime | mode | dtype | batch | p50 ms | p90 ms | p99 ms | mean ± std ms | img/s | e2e p50 ms "
        "| first call s | compile s | % peak | max_rel_err | top-1 |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    done: set[tuple] = set()
    for row in rows:
        key = (row["runtime"], row["mode"], row["device"])
        if row["status"] != "ok":
            same = [r for r in rows if (r["runtime"], r["mode"], r["device"]) == key and r["status"] == row["status"]]
            if (*key, row["status"]) in done:
                continue
            done.add((*key, row["status"]))
            batches = ", ".join(str(r["batch"]) for r in same)
            cells = [row["runtime"], row["mode"], row.get("dtype") or "", batches, row["status"], *[""] * 10]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        error = row.get("max_rel_err")
        error_text = "" if error is None else f"{error:.1e}" + ("" if row.get("within_tolerance") else " ✗")
        lines.append(
            f"| {row['runtime']} | {row['mode']} | {row['dtype']} | {row['batch']} | {_num(row['p50_ms'])} | "
            f"{_num(row['p90_ms'])} | {_num(row['p99_ms'])} | {_num(row['mean_ms'])} ± {_num(row['std_ms'], 2)} | "
            f"{_num(row['img_per_s'])} | {_num(row.get('e2e_p50_ms'))} | {_num(row.get('first_call_s'))} | "
            f"{_num(row.get('compile_s'))} | {_num(row.get('pct_peak'), 2)} | {error_text} | {_top1(row)} |"
        )
    return "\n".join(lines)


def compact_table(rows: list[dict]) -> str:
    """A narrower table for the README: one line per measured row, skipped modes folded into one line."""
    lines = [
        "| runtime | mode | dtype | batch | p50 ms | p99 ms | img/s | compile s | % peak | max_rel_err | top-1 |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    seen: set[tuple] = set()
    for row in rows:
        if row["status"] != "ok":
            key = (row["runtime"], row["mode"], row["status"])
            if key not in seen:
                seen.add(key)
                batches = ", ".join(str(r["batch"]) for r in rows if (r["runtime"], r["mode"], r["status"]) == key)
                lines.append(f"| {row['runtime']} | {row['mode']} | | {batches} | {row['status']} | | | | | | |")
            continue
        lines.append(
            f"| {row['runtime']} | {row['mode']} | {row['dtype']} | {row['batch']} | {_num(row['p50_ms'])} | "
            f"{_num(row['p99_ms'])} | {_num(row['img_per_s'])} | {_num(row.get('compile_s'))} | "
            f"{_num(row.get('pct_peak'), 2)} | {row['max_rel_err']:.1e} | {_top1(row)} |"
        )
    return "\n".join(lines)


def environment_lines(env: dict) -> list[str]:
    """A short human summary of the environment block."""
    gpus = "; ".join(f"{g['name']} (driver {g['driver_version']}, {g['memory.total']})" for g in env.get("gpus", []))
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    load = env.get("load_avg_start"), env.get("load_avg_end")
    return [
        f"- Date (UTC): {env['date_utc']}; wall time {env.get('wall_s', 0):.0f} s; git {env['git']}",
        f"- Command: `{env['command']}`",
        f"- CPU: {env['cpu']} ({env['cores']} cores); GPU: {gpus or 'none'}",
        f"- Python {env['python']} on {env['platform']}; {packages}",
        f"- Threads: intra-op {env['threads']['intra_op']}, inter-op {env['threads']['inter_op']} "
        f"(env: {', '.join(f'{k}={v}' for k, v in env['threads']['env'].items())})",
        f"- Load average (1, 5, 15 min) at start {_load(load[0])}, at end {_load(load[1])}",
        f"- Reference: {env.get('reference_by', 'none')}; tolerances on max_rel_err: "
        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()),
        *(
            f"- Merged with an earlier run ({run['date_utc']}, load {_load(run.get('load_avg_start'))}): "
            f"`{run['command']}`"
            for run in env.get("previous_runs", [])
        ),
    ]


def hardware(env: dict) -> str:
    """The CPU (and core count) or the GPU of a run, in words."""
    if env["device"] == "cpu":
        return f"{env['cpu']}, {env['cores']} cores"
    return env.get("gpu_name") or "no GPU found"


def _load(values: list[float] | None) -> str:
    return "n/a" if not values else "/".join(f"{v:.2f}" for v in values)


def plot(rows: list[dict], env: dict, path: Path) -> Path | None:
    """Throughput against batch size, one line per runtime/mode, one panel per device (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    devices = sorted({r["device"] for r in ok}) or ["cpu"]
    fig, axes = plt.subplots(1, len(devices), figsize=(10 * len(devices), 5.5), squeeze=False)
    markers = {"keras-tf": "o", "keras-jax": "s", "torch": "^", "ort": "D"}
    for ax, device in zip(axes[0], devices, strict=True):
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for r in ok:
            if r["device"] == device:
                key = (r["runtime"], f"{r['runtime']} {r['mode']} ({r['dtype']})")
                series.setdefault(key, []).append((r["batch"], r["img_per_s"]))
        colors = plt.get_cmap("tab20").colors
        for index, ((runtime, label), points) in enumerate(sorted(series.items())):
            points.sort()
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker=markers.get(runtime, "o"),
                color=colors[index % len(colors)],
                label=label,
            )
        batches = sorted({r["batch"] for r in ok if r["device"] == device})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s (batch / median latency)")
        ax.set_title(f"ResNet-34 224x224 on {device}: {hardware({**env, 'device': device})}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def write_all(out: Path, env: dict, rows: list[dict]) -> list[Path]:
    """Write every result file into ``out``; the paths written."""
    # One flat schema for every row: a skipped or failed row has the same keys, with None where nothing ran.
    rows = [{**dict.fromkeys(COLUMNS), **row} for row in rows]
    written = [write_json(out / "results.json", {"environment": env, "rows": rows})]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    written.append(atomic_write(out / "results.csv", buffer.getvalue()))
    picture = plot(rows, env, out / PLOT)
    lines = [
        f"# ResNet-34 benchmark on {env['device']}: {hardware(env)}",
        "",
        *environment_lines(env),
        "",
        markdown_table(rows),
        "",
        "p50/p90/p99/mean/std: per-call latency with the input already on the device; img/s = batch / p50; "
        "e2e: host numpy in, host numpy out; compile s: export/build + ahead-of-time compile + the first "
        "call's excess over p50 (compiled modes only); max_rel_err: max |out - ref| / max |ref| against Keras "
        "float32 on CPU on the same images (✗: over the dtype's tolerance).",
    ]
    if picture is not None:
        lines += ["", f"![throughput]({PLOT})"]
        written.append(picture)
    else:
        print(f"no {PLOT}: matplotlib is not installed (python3 -m pip install matplotlib)", file=sys.stderr)
    written.append(atomic_write(out / "results.md", "\n".join(lines) + "\n"))
    return written


def merge(out: Path, env: dict, rows: list[dict]) -> tuple[dict, list[dict]]:
    """This run's rows plus those of an earlier results.json in ``out`` that it did not redo, in table order."""
    path = out / "results.json"
    if not path.is_file():
        return env, rows
    old = json.loads(path.read_text())
    redone = {(r["runtime"], r["mode"], r["device"], r["batch"]) for r in rows}
    kept = [r for r in old["rows"] if (r["runtime"], r["mode"], r["device"], r["batch"]) not in redone]
    previous = old["environment"].pop("previous_runs", [])
    env["previous_runs"] = [*previous, old["environment"]]
    return env, sorted(rows + kept, key=_row_order)


def _row_order(row: dict) -> tuple[int, int, int]:
    """Runtimes and modes in their declared order, then batch size."""
    runtimes = list(RUNTIMES)
    runtime = runtimes.index(row["runtime"]) if row["runtime"] in runtimes else len(runtimes)
    modes = list(importlib.import_module(RUNTIMES[row["runtime"]]).MODES) if runtime < len(runtimes) else []
    mode = modes.index(row["mode"]) if row["mode"] in modes else len(modes)
    return runtime, mode, row["batch"]


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report DIR``: rewrite the result files (or print --compact) from DIR/results.json."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="a folder holding results.json (e.g. from a GPU machine)")
    parser.add_argument("--compact", action="store_true", help="only print the README's narrower table")
    args = parser.parse_args(argv)
    results = json.loads((args.folder / "results.json").read_text())
    if args.compact:
        print(compact_table(results["rows"]))
        return 0
    for path in write_all(args.folder, results["environment"], results["rows"]):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
