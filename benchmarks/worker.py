"""One runtime in one mode, in a process of its own: ``python -m benchmarks.worker SPEC.json``.

The parent writes the spec (runtime, mode, device, batch sizes, threads, timing budget, prepared files)
and reads back ``result.json`` and one ``logits_b<N>.npy`` per batch from the spec's ``out`` folder.
Progress goes to stdout as ``@@bench-progress`` lines; everything else a framework prints goes to stderr.
Only this runtime's framework is imported, so no other thread pool competes with it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks.common import (
    PROGRESS_PREFIX,
    SkipError,
    TimingConfig,
    batch_images,
    measure,
    pct_of_peak,
    peak_tflops,
    summarize,
    timed,
    warm_up,
    write_json,
)
from benchmarks.runtimes import RUNTIMES


def base_row(spec: dict, batch: int, dtype: str | None = None) -> dict:
    """The identifying columns of one row."""
    return {
        "runtime": spec["runtime"],
        "mode": spec["mode"],
        "device": spec["device"],
        "dtype": dtype or spec.get("dtype"),
        "batch": batch,
        "threads_intra": spec["threads"],
        "threads_inter": 1,
    }


def bench_batch(runner, spec: dict, images: np.ndarray, batch: int, config: TimingConfig, out: Path) -> dict:
    """Time one batch size: first call, warm-up, timed calls, host-to-host calls; save the logits."""
    host = batch_images(images, batch)
    inputs = runner.load(host)
    aot_s = runner.compile(inputs) if hasattr(runner, "compile") else None
    first_s, _ = timed(lambda: runner(inputs))
    warmup_iters, stable = warm_up(lambda: runner(inputs), config)
    stats = summarize(measure(lambda: runner(inputs), config), batch)
    e2e = [timed(lambda: runner.fetch(runner(runner.load(host))))[0] for _ in range(config.e2e_iters)]
    logits = np.asarray(runner.fetch(runner(runner.load(host))), dtype=np.float32)
    np.save(out / f"logits_b{batch}.npy", logits)
    compile_s = None
    if runner.compiled:  # explicit build + AOT compile + what the first call spent beyond a steady call
        compile_s = (runner.build_s or 0.0) + (aot_s or 0.0) + max(first_s - stats["p50_ms"] / 1e3, 0.0)
    peak = peak_tflops(spec.get("gpu_name"), runner.dtype) if spec["device"] == "cuda" else None
    return {
        **base_row(spec, batch, runner.dtype),
        **stats,
        "compile_s": compile_s,
        "first_call_s": first_s,
        "e2e_p50_ms": 1e3 * float(np.median(e2e)) if e2e else None,
        "pct_peak": pct_of_peak(stats["img_per_s"], peak),
        "warmup_iters": warmup_iters,
        "warmup_stable": stable,
        "flags": runner.flags,
        "status": "ok",
    }


def run(spec: dict) -> dict:
    """Every batch size of one (runtime, mode); rows are skipped or errors, never exceptions."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    if spec.get("cpus"):  # fewer threads than cores: keep them on their own cores
        os.sched_setaffinity(0, spec["cpus"])
    config = TimingConfig(**spec["timing"])
    info: dict = {}
    rows = []
    runner = None
    try:
        module = importlib.import_module(RUNTIMES[spec["runtime"]])
        info = module.setup(spec["threads"], spec["device"])
        start = time.perf_counter()
        runner = module.make_runner(spec["mode"], spec["device"], spec)
        info["load_s"] = time.perf_counter() - start
        info["flags"] = runner.flags
    except SkipError as reason:
        status = f"skipped: {reason}"
    except ImportError as error:
        status = f"skipped: {error.name or error} not installed"
    except Exception as error:
        traceback.print_exc()
        status = f"error: {type(error).__name__}: {str(error).strip()[:300]}"
    images = np.load(spec["artifacts"]["images"]) if runner is not None else None
    for batch in spec["batches"]:
        if runner is None:
            rows.append({**base_row(spec, batch), "status": status})
        else:
            try:
                rows.append(bench_batch(runner, spec, images, batch, config, out))
            except SkipError as reason:
                rows.append({**base_row(spec, batch, runner.dtype), "status": f"skipped: {reason}"})
            except Exception as error:  # e.g. out of memory at a large batch: the next batch may still run
                traceback.print_exc()
                message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
                rows.append(
                    {**base_row(spec, batch, runner.dtype), "status": f"error: {type(error).__name__}: {message}"}
                )
                if hasattr(runner, "recover"):
                    runner.recover()
        # Written after every batch, so a worker killed at its time limit still leaves the finished rows.
        write_json(out / "result.json", {"rows": rows, "info": info})
        print(PROGRESS_PREFIX + json.dumps({"batch": batch, "status": rows[-1]["status"]}), flush=True)
    return {"rows": rows, "info": info}


def main(argv: list[str] | None = None) -> int:
    """Read the spec, run, write result.json (always, even when every row failed)."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    write_json(Path(spec["out"]) / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
