"""Benchmark every runtime on the SAME ResNet-34 weights and inputs (``python -m benchmarks.run --help``).

The parent builds the hostile-weight model once (keras_impl + conversion.hostile), writes its weights,
the seeded images, the Keras float32 reference logits and the ONNX exports to a folder, then runs each
(runtime, mode) in a worker process of its own (``python -m benchmarks.worker``) with pinned threads, and
compares every worker's logits with the reference. Missing runtimes and providers give "skipped: <reason>"
rows. Exit status: 0 when every row that ran is within its tolerance, 1 when a row failed or is out of
tolerance, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from benchmarks import report
from benchmarks.common import PROGRESS_PREFIX, REPO, TOLERANCE, TimingConfig
from benchmarks.environment import cpu_count, environment, machine_folder, nvidia_smi, worker_env
from benchmarks.runtimes import RUNTIMES

DEFAULT_BATCHES = {"cpu": (1, 8, 32), "cuda": (1, 64, 256)}
QUICK_BATCHES = {"cpu": (1, 8), "cuda": (1, 64)}
QUICK_TIMING = TimingConfig(
    min_warmup=2, max_warmup=10, warmup_s=2.0, iters=5, min_time_s=1.0, max_time_s=5.0, e2e_iters=2
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _modes_text() -> str:
    """The modes of each runtime, for --help (the device-only ones marked)."""
    lines = ["runtimes and modes (* = cuda only, ° = cpu only):"]
    for runtime, module_name in RUNTIMES.items():
        module = importlib.import_module(module_name)  # framework-free at import time
        cpu, cuda = set(module.modes("cpu")), set(module.modes("cuda"))
        modes = [m + ("" if m in cpu and m in cuda else "*" if m in cuda else "°") for m in module.MODES]
        lines.append(f"  {runtime}: {', '.join(modes)}")
    return "\n".join(lines)


# Timing flags: (flag, TimingConfig field it overrides, type, help). None means "the default or --quick's".
TIMING_FLAGS = (
    ("--warmup", "min_warmup", _positive, "minimum warm-up calls"),
    ("--max-warmup", "max_warmup", _positive, "maximum warm-up calls"),
    ("--warmup-time", "warmup_s", float, "seconds of warm-up before giving up on stability"),
    ("--iters", "iters", _positive, "minimum timed calls"),
    ("--min-time", "min_time_s", float, "minimum seconds of timed calls"),
    ("--max-time", "max_time_s", float, "stop timing after this many seconds once 5 calls are in"),
    ("--e2e-iters", "e2e_iters", int, "host-to-host calls timed apart"),
)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m benchmarks.run``."""
    defaults = TimingConfig()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split(" (``")[0] + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_modes_text() + "\n\n--quick: batch sizes "
        f"{' '.join(map(str, QUICK_BATCHES['cpu']))} (cpu) / {' '.join(map(str, QUICK_BATCHES['cuda']))} (cuda) "
        f"and the timing budget {dataclasses.asdict(QUICK_TIMING)}; explicit flags still win.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    parser.add_argument(
        "--runtimes",
        type=_names,
        default=list(RUNTIMES),
        help=f"comma-separated runtimes (default: {','.join(RUNTIMES)})",
    )
    parser.add_argument(
        "--modes", type=_names, default=None, help="comma-separated modes to keep, e.g. eager,jit (default: all)"
    )
    parser.add_argument(
        "--batch-sizes",
        type=_positive,
        nargs="+",
        default=None,
        help="batch sizes (default: 1 8 32 on cpu, 1 64 256 on cuda; 1 8 / 1 64 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and a small timing budget")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results.json/.csv/.md and the plot (default: benchmarks/results/<machine>)",
    )
    parser.add_argument("--threads", type=_positive, default=cpu_count(), help="intra-op threads (default: the cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hostile weights and images (default: 0)")
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="keep the prepared weights/reference/ONNX files here and reuse them next time (default: a temp dir)",
    )
    parser.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="torch.compile (inductor/triton) cache folder to keep and reuse; warm caches shrink compile_s "
        "(default: a fresh temp folder per run, so compile_s is a cold compile)",
    )
    parser.add_argument(
        "--merge", action="store_true", help="keep rows of an earlier results.json in --out that this run does not redo"
    )
    parser.add_argument(
        "--worker-timeout", type=_positive, default=1800, help="seconds before a worker is killed (default: 1800)"
    )
    timing = parser.add_argument_group("timing (per runtime, mode and batch size)")
    for flag, field, kind, text in TIMING_FLAGS:
        metavar = flag.lstrip("-").replace("-", "_").upper()
        text = f"{text} (default: {getattr(defaults, field)})"
        timing.add_argument(flag, dest=field, metavar=metavar, type=kind, default=None, help=text)
    return parser


def timing_config(args: argparse.Namespace) -> TimingConfig:
    """The defaults (or --quick's), overridden by explicit flags."""
    config = QUICK_TIMING if args.quick else TimingConfig()
    overrides = {field: getattr(args, field) for _, field, _, _ in TIMING_FLAGS}
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(runtime, mode) pairs to run, in order."""
    unknown = [r for r in args.runtimes if r not in RUNTIMES]
    if unknown:
        raise SystemExit(f"run.py: error: unknown runtime(s) {unknown}; expected some of {list(RUNTIMES)}")
    jobs = []
    for runtime in args.runtimes:
        module = importlib.import_module(RUNTIMES[runtime])  # framework-free at import time
        jobs += [(runtime, mode) for mode in module.modes(args.device) if args.modes is None or mode in args.modes]
    return jobs


class Workers:
    """Runs the workers one after another under a progress bar and gathers their rows."""

    def __init__(
        self,
        args: argparse.Namespace,
        config: TimingConfig,
        manifest: dict,
        folder: Path,
        env: dict,
        progress: Progress,
        task: TaskID,
    ) -> None:
        self.args, self.config, self.manifest, self.folder, self.env = args, config, manifest, folder, env
        self.progress, self.task = progress, task
        self.reference = np.load(folder / manifest["reference"])

    def artifacts(self) -> dict:
        """The prepared files, as absolute paths for the worker's spec."""
        m = self.manifest
        return {
            "dir": str(self.folder),
            "images": str(self.folder / m["images"]),
            "keras_weights": str(self.folder / m["keras_weights"]),
            "torch_weights": str(self.folder / m["torch_weights"]),
            "onnx": m.get("onnx", {}),
        }

    def run_job(self, runtime: str, mode: str, work: Path) -> list[dict]:
        """One worker process; its rows with max_rel_err filled in."""
        args = self.args
        out = work / f"{runtime}_{mode}".replace(".", "_")
        out.mkdir(parents=True)
        spec = {
            "runtime": runtime,
            "mode": mode,
            "device": args.device,
            "batches": args.batch_sizes,
            "threads": args.threads,
            "cpus": list(range(args.threads)) if args.threads < cpu_count() else None,
            "timing": dataclasses.asdict(self.config),
            "artifacts": self.artifacts(),
            "gpu_name": self.env["gpu_name"],
            "out": str(out),
        }
        (out / "spec.json").write_text(json.dumps(spec, indent=2))
        log_path = out / "worker.log"
        start = time.perf_counter()
        advanced = 0
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.worker", str(out / "spec.json")],
                cwd=REPO,
                env=worker_env(runtime, args.device, args.threads, args.compile_cache or work / "compile-cache"),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                start_new_session=True,  # its own process group, so a timeout also ends its compile workers
            )
            timer = threading.Timer(args.worker_timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
            timer.start()
            try:
                for line in proc.stdout:
                    if line.startswith(PROGRESS_PREFIX):
                        event = json.loads(line[len(PROGRESS_PREFIX) :])
                        self.progress.update(self.task, advance=1, description=self._label(runtime, mode, event))
                        advanced += 1
                    else:
                        log.write(line)
                returncode = proc.wait()
            finally:
                timer.cancel()
        result_path = out / "result.json"
        elapsed = time.perf_counter() - start
        result = json.loads(result_path.read_text()) if result_path.is_file() else {"rows": [], "info": {}}
        done = {row["batch"] for row in result["rows"]}
        if returncode != 0 or len(done) < len(args.batch_sizes):  # killed or crashed: the rest are errors
            timed_out = elapsed >= args.worker_timeout
            why = f"timed out after {args.worker_timeout} s" if timed_out else f"exited with {returncode}"
            status = f"error: worker {why} ({_tail(log_path)})"
            result["rows"] += [self._row(runtime, mode, b, status) for b in args.batch_sizes if b not in done]
            self.progress.update(self.task, advance=len(args.batch_sizes) - advanced)
        self.env["workers"][f"{runtime}/{mode}"] = {**result.get("info", {}), "wall_s": elapsed}
        rows = [self._check(row, out) for row in result["rows"]]
        if any(row["status"].startswith("error") for row in rows):
            self._keep_log(log_path, runtime, mode)
        return rows

    def _label(self, runtime: str, mode: str, event: dict) -> str:
        return f"{runtime} {mode} batch {event['batch']}: {event['status'][:40]}"

    def _row(self, runtime: str, mode: str, batch: int, status: str) -> dict:
        return {"runtime": runtime, "mode": mode, "device": self.args.device, "batch": batch, "status": status}

    def _check(self, row: dict, out: Path) -> dict:
        """Fill max_rel_err, the tolerance and whether the row is within it."""
        from conversion.arrays import max_rel_err

        if row["status"] != "ok":
            return row
        logits = np.load(out / f"logits_b{row['batch']}.npy")
        reference = self.reference[np.arange(row["batch"]) % len(self.reference)]
        row["max_rel_err"] = max_rel_err(logits, reference)
        row["top1_agreement"] = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
        row["tolerance"] = TOLERANCE[row["dtype"]]
        row["within_tolerance"] = row["max_rel_err"] <= row["tolerance"]
        return row

    def _keep_log(self, log_path: Path, runtime: str, mode: str) -> None:
        logs = self.args.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, logs / f"{runtime}_{mode}.log")


def _tail(path: Path) -> str:
    """The last non-empty line of a worker's log, for the row's status."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare once, run every worker, compare, write the result files, print the table."""
    args = build_parser().parse_args(argv)
    args.batch_sizes = args.batch_sizes or list((QUICK_BATCHES if args.quick else DEFAULT_BATCHES)[args.device])
    config = timing_config(args)
    jobs = plan(args)
    gpus = nvidia_smi()
    args.out = args.out or REPO / "benchmarks" / "results" / machine_folder(args.device, gpus)
    env = environment(
        command=" ".join(["python", "-m", "benchmarks.run", *sys.argv[1:]]),
        device=args.device,
        threads=args.threads,
        batch_sizes=args.batch_sizes,
        seed=args.seed,
        gpus=gpus,
        config=config,
    )
    console = Console(stderr=True)
    start = time.perf_counter()
    rows: list[dict] = []
    if args.device == "cuda" and not gpus:
        reason = "skipped: no CUDA device (nvidia-smi reports no GPU)"
        rows = [
            {"runtime": r, "mode": m, "device": "cuda", "batch": b, "status": reason}
            for r, m in jobs
            for b in args.batch_sizes
        ]
    else:
        rows = run_all(args, config, jobs, env, console)
    env["load_avg_end"] = list(os.getloadavg())
    env["wall_s"] = time.perf_counter() - start
    if args.merge:
        env, rows = report.merge(args.out, env, rows)
    for path in report.write_all(args.out, env, rows):
        console.print(f"wrote {path}")
    print(report.markdown_table(rows))
    failed = [r for r in rows if r["status"].startswith("error") or r.get("within_tolerance") is False]
    for row in failed:
        console.print(
            f"[red]{row['runtime']} {row['mode']} batch {row['batch']}: {row['status']} "
            f"max_rel_err={row.get('max_rel_err')}[/red]"
        )
    return 1 if failed else 0


def _ort_can_run(device: str) -> bool:
    """Whether onnxruntime has a provider for ``device`` (else the exports would be wasted time)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    wanted = {"CPUExecutionProvider"} if device == "cpu" else {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    return bool(wanted & set(ort.get_available_providers()))


def run_all(
    args: argparse.Namespace, config: TimingConfig, jobs: list[tuple[str, str]], env: dict, console: Console
) -> list[dict]:
    """Prepare the shared files, then run the workers under a progress bar."""
    from benchmarks.prepare import choose_keras_backend, load_manifest, prepare

    choose_keras_backend()  # the parent imports keras (conversion.arrays) even when it reuses the files
    need_onnx = "ort" in args.runtimes and _ort_can_run(args.device)
    with tempfile.TemporaryDirectory(prefix="resnet34-bench-") as tmp:
        folder = args.artifacts or Path(tmp) / "artifacts"
        manifest = load_manifest(folder, args.seed)
        if manifest is None or (need_onnx and not manifest.get("onnx")):
            with console.status("preparing: hostile weights, reference logits, ONNX exports"):
                manifest = prepare(folder, seed=args.seed, onnx=need_onnx, log=console.log)
        else:
            console.log(f"reusing the prepared files in {folder}")
        env["reference_by"] = manifest["reference_by"]
        env["onnx_exports"] = manifest.get("onnx", {})
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        rows: list[dict] = []
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("starting", total=len(jobs) * len(args.batch_sizes))
            workers = Workers(args, config, manifest, folder, env, progress, task)
            for runtime, mode in jobs:
                progress.update(task, description=f"{runtime} {mode}: starting")
                rows += workers.run_job(runtime, mode, Path(tmp) / "work")
    return rows


if __name__ == "__main__":
    sys.exit(main())
