"""A roofline model of the twin on a GPU: what each way of running it must at least cost.

    python -m benchmarks.roofline [--batch-sizes 1 256] [--dtype-bytes 2] [--tflops 798] [--gb-per-s 3000]

The network's shapes come from running the twin on the ``meta`` device (no arithmetic). Each kernel costs
at least max(FLOPs / peak rate, bytes / bandwidth), and kernels run one after another, so a way of running
the network costs at least the sum over its kernels. Three ways, by what they launch:

- ``eager``: every layer its own kernel: conv, BatchNorm, ReLU, add, the TF pads and the max-pool.
- ``folded``: BatchNorm folded into the conv (inductor freezing); one element-wise kernel after each conv
  applies ReLU or add + ReLU, and the pads ride in the kernel before them (the peer's best mode).
- ``fused``: the element-wise work inside the conv's epilogue (``torch_impl.fuse`` on cuDNN); only
  the convs, the strided convs' pads, the max-pool and the head remain.

The defaults are the ceilings measured on this workplace's H100 (the device library's KINDS.md,
2026-11-13: an 8192^3 bf16 matrix product at 798 TFLOP/s on random data, a device-to-device copy at
3.0 TB/s counting bytes read and written); the data sheet says 989 TFLOP/s and 3.35 TB/s. The result is a
floor, not a prediction. Weights are counted once per kernel that reads them; caches are ignored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.common import IMAGE_SIZE, NUM_CLASSES

WAYS = ("eager", "folded", "fused")


@dataclass(frozen=True)
class Kernel:
    """One launch: what it is, its FLOPs and the bytes it must move."""

    name: str
    flops: float
    bytes: float


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def layer_shapes(batch: int, size: tuple[int, int] = IMAGE_SIZE) -> list[dict]:
    """The twin's convolutions, max-pool and head in order, with the shapes each reads and writes.

    Hooks on a ``meta``-device forward record them; a conv's ``padded`` shape is the copy that
    ``torch_impl.padding.padded_for_conv`` makes (None where the padding goes to the conv itself).
    """
    import torch

    import torch_impl
    from torch_impl.padding import Conv2dSame, MaxPool2dSame, padded_for_conv

    model = torch_impl.ResNet34(num_classes=NUM_CLASSES, classifier_activation=None).to("meta").eval()
    layers: list[dict] = []

    def record(name: str, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        (x,) = inputs
        entry = {"name": name, "input": tuple(x.shape), "output": tuple(output.shape)}
        if isinstance(module, Conv2dSame):
            padded, _ = padded_for_conv(x, module.kernel_size[0], module.stride[0])
            entry.update(
                kind="conv",
                weight=tuple(module.weight.shape),
                padded=None if padded is x else tuple(padded.shape),
            )
        else:
            entry["kind"] = "pool" if isinstance(module, MaxPool2dSame) else "head"
            entry["window"] = module.kernel_size**2 if entry["kind"] == "pool" else 1
        layers.append(entry)

    for name, module in model.named_modules():
        if isinstance(module, Conv2dSame | MaxPool2dSame) or name == "avg_pool":
            module.register_forward_hook(lambda m, i, o, name=name: record(name, m, i, o))
    with torch.no_grad():
        model(torch.empty(batch, 3, *size, device="meta"))
    return layers


def kernels(batch: int, way: str, element_bytes: int = 2, size: tuple[int, int] = IMAGE_SIZE) -> list[Kernel]:
    """The kernels ``way`` launches for one batch, with their FLOPs and minimum bytes."""
    if way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}. Received: {way!r}")
    b = element_bytes
    out: list[Kernel] = []
    for layer in layer_shapes(batch, size):
        name, x, y = layer["name"], layer["input"], layer["output"]
        if layer["kind"] == "pool":
            out.append(Kernel(name, layer["window"] * _numel(y), (_numel(x) + _numel(y)) * b))
            continue
        if layer["kind"] == "head":  # global average pool and the Dense head: read x, write the logits
            channels = y[1]
            flops = _numel(x) + 2.0 * batch * channels * NUM_CLASSES
            out.append(Kernel("avg_pool + classifier", flops, (_numel(x) + (channels + batch) * NUM_CLASSES) * b))
            continue
        w = layer["weight"]
        flops = 2.0 * _numel(y) * _numel(w[1:])
        residual = name.endswith("main_layers.3")  # the second conv of a unit: + skip, then ReLU
        relu = name == "stem_conv" or name.endswith("main_layers.0") or residual
        # Pads ride in the producer's element-wise kernel when folded; the stem's input has no producer.
        if layer["padded"] is not None and (way != "folded" or name == "stem_conv"):
            out.append(Kernel(f"{name} pad", 0.0, (_numel(x) + _numel(layer["padded"])) * b))
        conv_in = _numel(layer["padded"] or x)
        fused_residual = way == "fused" and residual
        out.append(Kernel(name, flops, (conv_in + _numel(w) + _numel(y) * (2 if fused_residual else 1)) * b))
        if way == "eager":
            out.append(Kernel(f"{name} batchnorm", 2.0 * _numel(y), 2 * _numel(y) * b))
            if residual:
                out.append(Kernel(f"{name} add", 1.0 * _numel(y), 3 * _numel(y) * b))
            if relu:
                out.append(Kernel(f"{name} relu", 1.0 * _numel(y), 2 * _numel(y) * b))
        elif way == "folded" and relu:
            label, tensors = (f"{name} add+relu", 3) if residual else (f"{name} relu", 2)
            out.append(Kernel(label, 2.0 * _numel(y), tensors * _numel(y) * b))
    return out


def floor_ms(items: list[Kernel], tflops: float, gb_per_s: float) -> dict:
    """Sum over kernels of max(compute time, memory time), and the totals behind it."""
    compute = [k.flops / (tflops * 1e12) for k in items]
    memory = [k.bytes / (gb_per_s * 1e9) for k in items]
    return {
        "kernels": len(items),
        "gflop": sum(k.flops for k in items) / 1e9,
        "gbytes": sum(k.bytes for k in items) / 1e9,
        "floor_ms": 1e3 * sum(max(c, m) for c, m in zip(compute, memory, strict=True)),
        "compute_ms": 1e3 * sum(compute),
        "memory_ms": 1e3 * sum(memory),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print the floor of each way at each batch size as a Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256], help="default: 1 256")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per element (default: 2, fp16)")
    parser.add_argument("--tflops", type=float, default=798.0, help="matrix rate (default: measured on the H100)")
    parser.add_argument("--gb-per-s", type=float, default=3000.0, help="copy bandwidth (default: measured there)")
    args = parser.parse_args(argv)
    print(f"Roofline floor at {args.tflops:g} TFLOP/s and {args.gb_per_s:g} GB/s, {args.dtype_bytes}-byte elements")
    print("\n| batch | way | kernels | GFLOP | GB moved | compute ms | memory ms | floor ms | img/s at floor |")
    print("|--:|---|--:|--:|--:|--:|--:|--:|--:|")
    for batch in args.batch_sizes:
        for way in WAYS:
            f = floor_ms(kernels(batch, way, args.dtype_bytes), args.tflops, args.gb_per_s)
            print(
                f"| {batch} | {way} | {f['kernels']} | {f['gflop']:.1f} | {f['gbytes']:.2f} | {f['compute_ms']:.3f} | "
                f"{f['memory_ms']:.3f} | {f['floor_ms']:.3f} | {batch / f['floor_ms'] * 1e3:,.0f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
