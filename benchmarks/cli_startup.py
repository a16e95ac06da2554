"""How long ``resnet34-parity --help``, each subcommand's ``--help`` and two refused commands take, each in a fresh
process, interleaved with a bare interpreter (``python -m benchmarks.cli_startup``).

They answer before TensorFlow or torch loads; ``tests/test_environment.py`` checks that, and this tool measures what
it buys. Each command runs once untimed with ``python -X importtime`` to list what it imported, then the commands run
in rounds, the order reversed every other round, so that drift on a shared machine hits every one alike. The figures
to quote are the medians and each command's ratio to ``python -c pass``, with the machine's ``lscpu`` flags.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import REPO, interleave, round_ratio_text, write_json
from benchmarks.environment import cpu_count, cpu_flags

BASELINE = "python -c pass"
# name: (arguments after the interpreter, the exit status the command must give).
COMMANDS: dict[str, tuple[tuple[str, ...], int]] = {
    "--help": (("-m", "conversion", "--help"), 0),
    "verify --help": (("-m", "conversion", "verify", "--help"), 0),
    "convert --help": (("-m", "conversion", "convert", "--help"), 0),
    "export-onnx --help": (("-m", "conversion", "export-onnx", "--help"), 0),
    "verify --train --steps 0 (refused)": (("-m", "conversion", "verify", "--train", "--steps", "0"), 2),
    "convert missing.pt out.keras (refused)": (("-m", "conversion", "convert", "missing.pt", "out.keras"), 2),
    BASELINE: (("-c", "pass"), 0),  # last: the baseline of the ratios
}
FRAMEWORKS = ("tensorflow", "torch", "keras", "jax")


def _run(arguments: tuple[str, ...], expected: int, *flags: str) -> str:
    """Run one command from the repository root; its stderr. A wrong exit status stops the benchmark."""
    run = subprocess.run([sys.executable, *flags, *arguments], cwd=REPO, capture_output=True, text=True, timeout=120)
    if run.returncode != expected:
        raise SystemExit(f"{' '.join(arguments)}: exit status {run.returncode}, expected {expected}")
    return run.stderr


def imports(arguments: tuple[str, ...], expected: int) -> dict[str, object]:
    """What the command imported (``-X importtime``): how many modules, and which of the frameworks."""
    modules = [
        line.split("|")[-1].strip()
        for line in _run(arguments, expected, "-X", "importtime").splitlines()
        if line.startswith("import time:") and not line.rstrip().endswith("| imported package")
    ]
    roots = {name.split(".")[0] for name in modules}
    return {"modules": len(modules), "frameworks": sorted(roots.intersection(FRAMEWORKS))}


def measure(rounds: int, per_round: int, warmup: int, command: str) -> dict:
    """Imports and interleaved timings of every command (JSON-ready); ``command`` is how this run was started."""
    calls = {name: lambda spec=spec: _run(*spec) for name, spec in COMMANDS.items()}
    return {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "cpu": cpu_flags(),
        "cores": cpu_count(),
        "load_avg_start": list(os.getloadavg()),
        "imports": {name: imports(*spec) for name, spec in COMMANDS.items()},
        "timings": interleave(calls, rounds, per_round, warmup),
        "load_avg_end": list(os.getloadavg()),
    }


def _print(results: dict) -> None:
    timings = results["timings"]
    cpu = results["cpu"]
    print(f"{cpu.get('model', cpu)} ({', '.join(cpu.get('flags', []))}), {results['cores']} cores")
    print(f"medians of {timings['calls'][BASELINE]} interleaved calls each, every call a fresh process\n")
    print(f"| command | p50 ms | min ms | ratio to `{BASELINE}`: per-round median (range) | modules | frameworks |")
    print("|---|--:|--:|--:|--:|---|")
    for name, ms in timings["median_ms"].items():
        ratio = timings["ratios"].get(name)
        text = "1 (baseline)" if ratio is None else round_ratio_text(ratio, 2)
        imported = results["imports"][name]
        frameworks = ", ".join(imported["frameworks"]) or "none"
        row = [f"`{name}`", f"{ms:.0f}", f"{timings['min_ms'][name]:.0f}", text, str(imported["modules"]), frameworks]
        print("| " + " | ".join(row) + " |")
    print(f"\nload average (1/5/15 min): start {results['load_avg_start']}, end {results['load_avg_end']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Print a Markdown table (and optionally write JSON); exit 1 where a command imported a framework."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_startup", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default: 10)")
    parser.add_argument("--per-round", type=int, default=3, help="timed calls per command and round (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per command first (default: 1)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    if min(args.rounds, args.per_round) < 1 or args.warmup < 0:
        parser.error("--rounds and --per-round must be at least 1, --warmup at least 0")
    arguments = list(sys.argv[1:] if argv is None else argv)
    results = measure(args.rounds, args.per_round, args.warmup, " ".join([parser.prog, *arguments]))
    _print(results)
    if args.json:
        write_json(Path(args.json), results)
    loaded = {name: found["frameworks"] for name, found in results["imports"].items() if found["frameworks"]}
    if loaded:
        print(f"error: these commands imported a framework: {loaded}", file=sys.stderr)
    return 1 if loaded else 0


if __name__ == "__main__":
    sys.exit(main())
