"""Where the GPU time goes: the torch twin against torchvision's resnet34, interleaved, with a kernel profile.

    python -m benchmarks.gpu_profile --out DIR [--batch-sizes 1 256] [--variants ...] [--eager-batch 64]

Every variant runs fp16, channels_last, captured in a CUDA graph (launch gaps gone, so the time left is
the kernels'), in ONE process, timed in alternating rounds (``benchmarks.common.interleave``) against
torchvision's ``resnet34(num_classes=10)`` as the baseline. Then ``torch.profiler`` lists, per variant,
the GPU time by kernel category (convolution, pointwise, pad, pool, ...) and the top kernels, which is
what explains a gap. The machine's two ceilings are measured first (an fp16 matrix product and a
device-to-device copy), so each figure can be read against what the card actually delivers.

The variants: the book twin (``twin``) eager, under inductor, and fused (``torch_impl.fuse``) in the
versions of ``FUSED``; the twin in torchvision's convention (``twin-tvconv``: symmetric padding, no pad
copies); torchvision's resnet34 eager and under inductor. With ``--eager-batch N`` the twin and torchvision
also run plain eager (no CUDA graph) at batch N, TF32 and fp16, interleaved: what a user gets without work.

Writes ``gpu_profile.json`` and ``gpu_profile.md`` into ``--out`` (atomically); the Markdown is printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import (
    GFLOP_PER_IMAGE_224,
    IMAGE_SIZE,
    NUM_CLASSES,
    atomic_write,
    interleave,
    median,
    write_json,
)
from benchmarks.runtimes.pytorch import capture_cuda_graph

# torch_impl.fuse's options per fused variant: v1 is the first version (pad copies, torch's max-pool, the
# projection's bias added by its own kernel), v2 the defaults; the v2-* rows swap one v2 choice back.
FUSED = {
    "twin-fused-v1": {"stem": "copy", "strided": "copy", "compile_glue": False, "fold_skip_bias": False},
    "twin-fused-v2": {},
    "twin-fused-v2-padcopies": {"strided": "copy"},  # compiled pad copies instead of zero-tap kernels
    "twin-fused-v2-stem8": {"stem": "zero-tap"},  # the stem as an 8x8 zero-tap kernel, no copy
}
VARIANTS = (
    "twin",
    *FUSED,
    "twin-inductor",
    "twin-tvconv",
    "torchvision-inductor",
    "torchvision",  # last: the baseline
)
EAGER_VARIANTS = (  # last: the baseline
    "twin-tf32",
    "twin-tvconv-tf32",
    "torchvision-tf32",
    "twin-fp16",
    "twin-tvconv-fp16",
    "torchvision-fp16",
)

# Kernel name fragments -> category, first match wins (cuDNN's BN kernels also say "cudnn", so BN first).
CATEGORIES = (
    ("pad", ("constant_pad", "_pad_")),
    ("batchnorm", ("bn_fw", "batch_norm", "batchnorm")),
    ("pool", ("pool",)),
    ("convolution", ("conv", "fprop", "implicit", "cudnn", "winograd", "nhwckrsc")),
    ("matmul", ("gemm", "gemv", "nvjet", "cublas", "matmul")),
    ("convolution", ("xmma", "sm90", "sm80", "cutlass")),
    ("reduction", ("reduce", "triton_red", "triton_per", "mean")),
    ("layout/copy", ("nchwtonhwc", "nhwctonchw", "copy", "memcpy", "transpose")),
)


def category(kernel: str) -> str:
    """The category of a CUDA kernel name; element-wise kernels (ReLU, add, BN-apply) are "pointwise"."""
    name = kernel.lower()
    for label, fragments in CATEGORIES:
        if any(fragment in name for fragment in fragments):
            return label
    return "pointwise"


def ceilings(torch) -> dict:
    """Measured fp16 matmul rate (TFLOP/s) and device-to-device copy bandwidth (GB/s, read + write)."""

    def device_ms(call: Callable[[], object], repeat: int = 20) -> float:
        times = []
        for _ in range(repeat + 3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return median(times[3:])

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    matmul_ms = device_ms(lambda: a @ b)
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    copy_ms = device_ms(lambda: dst.copy_(src))
    return {
        "fp16_matmul_tflops": 2 * n**3 / (matmul_ms * 1e-3) / 1e12,
        "copy_gb_per_s": 2 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9,
        "how": f"median device time of 20 calls: {n}^3 fp16 torch.matmul; 1 GiB float32 Tensor.copy_",
    }


def truth_of(variant: str) -> str:
    """The float32 model whose output a variant is checked against: twin, twin-tvconv or torchvision."""
    for base in ("torchvision", "twin-tvconv"):
        if variant.startswith(base):
            return base
    return "twin"


def build_models(torch, weights: str | None) -> dict:
    """The twin (prepared weights if given), its fused versions, the torchvision-convention twin and torchvision's
    resnet34, all 10 classes, logits out."""
    import torchvision

    import torch_impl

    torch.manual_seed(0)
    twin = torch_impl.ResNet34(num_classes=NUM_CLASSES, classifier_activation=None).eval()
    if weights:
        twin.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    tvconv = torch_impl.ResNet34(num_classes=NUM_CLASSES, classifier_activation=None, convention="torchvision").eval()
    reference = torchvision.models.resnet34(num_classes=NUM_CLASSES).eval()
    for model in (twin, tvconv, reference):  # running statistics that are not the init's 0 and 1
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not weights:
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    fused = {name: torch_impl.fuse(twin, **kwargs) for name, kwargs in FUSED.items()}
    return {"twin": twin, **fused, "twin-tvconv": tvconv, "torchvision": reference}


def captured(torch, forward: Callable, x) -> tuple[Callable[[], object], object]:
    """(replay-and-wait, output) of ``forward(x)`` captured in a CUDA graph."""
    graph, out = capture_cuda_graph(forward, x)

    def replay() -> object:
        graph.replay()
        torch.cuda.synchronize()
        return out

    return replay, out


def kernel_profile(torch, forward: Callable, x, batch: int, calls: int = 5) -> dict:
    """GPU time per call by kernel category and the top kernels, from ``torch.profiler`` (no graph)."""
    from torch.profiler import ProfilerActivity, profile

    forward(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            forward(x)
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us()
    by_category: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "kernels": 0})
    for name, (count, us) in kernels.items():
        slot = by_category[category(name)]
        slot["ms"] += us / 1e3 / calls
        slot["kernels"] += count / calls
    total_ms = sum(slot["ms"] for slot in by_category.values())
    conv_ms = by_category.get("convolution", {}).get("ms", 0.0)
    ranked = sorted(kernels.items(), key=lambda item: -item[1][1])
    return {
        "kernel_ms_per_call": total_ms,
        "kernels_per_call": sum(count for count, _ in kernels.values()) / calls,
        "by_category": {k: v for k, v in sorted(by_category.items(), key=lambda item: -item[1]["ms"])},
        "conv_tflops": batch * GFLOP_PER_IMAGE_224 / (conv_ms * 1e-3) / 1e3 if conv_ms else None,
        "kernels": [  # every kernel, so the categories can be re-derived from the JSON
            {"name": name, "per_call": count / calls, "us_per_call": us / calls, "category": category(name)}
            for name, (count, us) in ranked
        ],
    }


def run(args: argparse.Namespace) -> dict:
    """Ceilings, then per batch size: interleaved timing of every variant and a kernel profile of each."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # BN folded into the convolutions, as in the peer's published figure
    results: dict = {
        "comparison": "fp16 channels_last, CUDA graph replays; baseline torchvision resnet34(num_classes=10)",
        "gpu": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m benchmarks.gpu_profile " + " ".join(sys.argv[1:]),
        "ceilings": ceilings(torch),
        "batches": {},
    }
    results["fused_configs"] = {name: FUSED[name] for name in args.variants if name in FUSED}
    print(f"ceilings: {results['ceilings']}", flush=True)
    models = {name: model.cuda() for name, model in build_models(torch, args.weights).items()}
    fast = {name: copy.deepcopy(model).half().to(memory_format=torch.channels_last) for name, model in models.items()}
    with torch.inference_mode():
        for batch in args.batch_sizes:
            x32 = torch.randn(batch, 3, *IMAGE_SIZE, device="cuda")
            x = x32.half().contiguous(memory_format=torch.channels_last)
            expected = {name: models[name](x32).float() for name in {truth_of(v) for v in args.variants}}
            forwards: dict[str, Callable] = {}
            for name in args.variants:
                model = fast[name.removesuffix("-inductor")]
                forwards[name] = torch.compile(model, dynamic=False) if name.endswith("-inductor") else model
            calls, errors, compile_s, failed = {}, {}, {}, {}
            for name, forward in list(forwards.items()):
                start = time.perf_counter()
                try:
                    calls[name], out = captured(torch, forward, x)
                    calls[name]()  # a capture records the kernels without running them: replay once before reading
                except Exception as error:  # one variant that fails (a compile, a capture) leaves the others' rows
                    if name == args.variants[-1]:
                        raise
                    failed[name] = f"{type(error).__name__}: {error}"[:500]
                    print(f"batch {batch}: {name} FAILED: {failed[name]}", flush=True)
                    calls.pop(name, None)
                    del forwards[name]
                    torch.cuda.synchronize()
                    continue
                compile_s[name] = time.perf_counter() - start
                truth = expected[truth_of(name)]
                errors[name] = float((out.float() - truth).abs().max() / truth.abs().max())
                print(f"batch {batch}: {name} ready in {compile_s[name]:.1f} s, rel err {errors[name]:.1e}", flush=True)
            timing = interleave(calls, args.rounds, args.per_round, args.warmup)
            timing["img_per_s"] = {name: batch / (ms / 1e3) for name, ms in timing["median_ms"].items()}
            profiles = {}
            for name, forward in forwards.items():
                try:
                    profiles[name] = kernel_profile(torch, forward, x, batch)
                except Exception as error:  # keep the timings if the profiler fails
                    profiles[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
            results["batches"][str(batch)] = {
                "timing": timing,
                "max_rel_err_vs_fp32": errors,
                "capture_s": compile_s,
                "profile": profiles,
                "failed": failed,
            }
            torch._dynamo.reset()
        if args.eager_batch:
            try:
                results["eager"] = eager_rows(torch, models, args)
            except Exception as error:  # keep the batches' results
                results["eager_error"] = f"{type(error).__name__}: {error}"[:500]
                print(f"eager rows FAILED: {results['eager_error']}", flush=True)
    results["load_avg"] = list(os.getloadavg())
    return results


def eager_rows(torch, models: dict, args: argparse.Namespace) -> dict:
    """Plain eager calls (no graph, no compiling) of the twins and torchvision at ``--eager-batch``, TF32 and fp16,
    channels_last, interleaved; torchvision fp16 is the baseline. TF32 is switched on for cuDNN and matmuls here
    only, and switched off again after."""
    batch = args.eager_batch
    x32 = torch.randn(batch, 3, *IMAGE_SIZE, device="cuda")
    expected = {name: models[name](x32).float() for name in ("twin", "twin-tvconv", "torchvision")}  # TF32 off
    inputs = {
        "tf32": x32.contiguous(memory_format=torch.channels_last),
        "fp16": x32.half().contiguous(memory_format=torch.channels_last),
    }
    calls, errors = {}, {}
    for name in EAGER_VARIANTS:
        base, _, precision = name.rpartition("-")
        model = copy.deepcopy(models[base]).to(memory_format=torch.channels_last)
        model = model.half() if precision == "fp16" else model

        def call(model=model, x=inputs[precision]) -> object:
            out = model(x)
            torch.cuda.synchronize()
            return out

        calls[name] = call
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for name, call in calls.items():
            truth = expected[truth_of(name)]
            errors[name] = float((call().float() - truth).abs().max() / truth.abs().max())
        timing = interleave(calls, args.rounds, args.per_round, args.warmup)
    finally:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    timing["img_per_s"] = {name: batch / (ms / 1e3) for name, ms in timing["median_ms"].items()}
    print(f"eager batch {batch}: {timing['median_ms']}", flush=True)
    return {"batch": batch, "timing": timing, "max_rel_err_vs_fp32": errors}


def _ratio_text(ratio: dict | None) -> str:
    """A row's median ratio to the baseline over the rounds, with their range."""
    if ratio is None:
        return "1 (baseline)"
    low, high = ratio["round_ratio_range"]
    return f"{ratio['round_ratio_median']:.3f} ({low:.3f}-{high:.3f})"


def markdown(results: dict) -> str:
    """The results as Markdown tables."""
    ceil = results["ceilings"]
    lines = [
        f"# Where the GPU time goes: {results['gpu']}",
        "",
        f"- {results['date_utc']}; torch {results['versions']['torch']}, CUDA {results['versions']['cuda']}, "
        f"cuDNN {results['versions']['cudnn']}; `{results['command']}`",
        f"- {results['comparison']}",
        f"- Ceilings measured here: fp16 matmul {ceil['fp16_matmul_tflops']:.0f} TFLOP/s, "
        f"copy {ceil['copy_gb_per_s']:.0f} GB/s ({ceil['how']})",
    ]
    for name, kwargs in results.get("fused_configs", {}).items():
        arguments = "".join(f", {key}={value!r}" for key, value in kwargs.items())
        lines.append(f"- `{name}`: `torch_impl.fuse(twin{arguments})`" + ("" if kwargs else " (the defaults)"))
    for batch, entry in results["batches"].items():
        timing = entry["timing"]
        lines += [
            "",
            f"## Batch {batch}",
            "",
            *(f"- FAILED, no row: {name}: `{message}`" for name, message in entry.get("failed", {}).items()),
            *([""] if entry.get("failed") else []),
            "| variant | p50 ms | img/s | ratio to torchvision (per-round range) | GPU kernel ms | kernels "
            "| conv ms | conv TFLOP/s | rel err vs fp32 |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for name, ms in timing["median_ms"].items():
            ratio_text = _ratio_text(timing["ratios"].get(name))
            prof = entry["profile"][name]
            if "error" in prof:
                prof = {"by_category": {}, "conv_tflops": None, "kernel_ms_per_call": float("nan")}
                prof["kernels_per_call"] = 0
            conv = prof["by_category"].get("convolution", {"ms": 0.0})
            tflops = f"{prof['conv_tflops']:.0f}" if prof["conv_tflops"] else ""
            lines.append(
                f"| {name} | {ms:.3f} | {timing['img_per_s'][name]:,.0f} | {ratio_text} | "
                f"{prof['kernel_ms_per_call']:.3f} | {prof['kernels_per_call']:.0f} | {conv['ms']:.3f} | {tflops} | "
                f"{entry['max_rel_err_vs_fp32'][name]:.1e} |"
            )
        lines += ["", "GPU time per call by kernel category (ms, kernels):", ""]
        names = [name for name, prof in entry["profile"].items() if "error" not in prof]
        lines += [f"- profile of {n}: {p['error']}" for n, p in entry["profile"].items() if "error" in p]
        lines.append("")
        cats = sorted({c for name in names for c in entry["profile"][name]["by_category"]})
        lines += ["| category | " + " | ".join(names) + " |", "|---|" + "--:|" * len(names)]
        for cat in cats:
            cells = []
            for name in names:
                slot = entry["profile"][name]["by_category"].get(cat)
                cells.append(f"{slot['ms']:.3f} ({slot['kernels']:.0f})" if slot else "")
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        for name in names:
            lines += ["", f"Top kernels, {name} (us per call, launches per call):", ""]
            for kernel in entry["profile"][name]["kernels"][:8]:
                lines.append(
                    f"- {kernel['us_per_call']:.1f} us, x{kernel['per_call']:.0f}, {kernel['category']}: "
                    f"`{kernel['name'][:110]}`"
                )
    if "eager_error" in results:
        lines += ["", f"Plain eager rows FAILED: `{results['eager_error']}`"]
    if "eager" in results:
        eager, timing = results["eager"], results["eager"]["timing"]
        lines += [
            "",
            f"## Plain eager, batch {eager['batch']} (no CUDA graph, no compiling; channels_last; TF32 on for the "
            "tf32 rows)",
            "",
            "| variant | p50 ms | img/s | ratio to torchvision-fp16 (per-round range) | rel err vs fp32 |",
            "|---|--:|--:|--:|--:|",
        ]
        for name, ms in timing["median_ms"].items():
            ratio_text = _ratio_text(timing["ratios"].get(name))
            lines.append(
                f"| {name} | {ms:.3f} | {timing['img_per_s'][name]:,.0f} | {ratio_text} | "
                f"{eager['max_rel_err_vs_fp32'][name]:.1e} |"
            )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m benchmarks.gpu_profile``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_profile.json and gpu_profile.md")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256], help="default: 1 256")
    parser.add_argument(
        "--variants",
        type=lambda text: [v for v in text.split(",") if v],
        default=list(VARIANTS),
        help=f"comma-separated, the baseline last (default: {','.join(VARIANTS)})",
    )
    parser.add_argument("--weights", help="the twin's .pt weights (default: torch's init with random BN statistics)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default: 10)")
    parser.add_argument("--per-round", type=int, default=20, help="timed calls per variant and round (default: 20)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per variant first (default: 10)")
    parser.add_argument(
        "--eager-batch",
        type=int,
        default=0,
        help="also time plain eager TF32/fp16 rows at this batch (default: 0, off)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, write the JSON and Markdown, print the Markdown."""
    args = build_parser().parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants or args.variants[-1] != "torchvision":
        raise SystemExit(f"--variants: expected names from {VARIANTS} ending in torchvision. Received: {args.variants}")
    results = run(args)
    write_json(args.out / "gpu_profile.json", results)
    text = markdown(results)
    atomic_write(args.out / "gpu_profile.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
