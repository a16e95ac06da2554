"""An inference-only rewrite of the torch twin for the GPU: fewer, fused kernels, the same function.

``fuse(model)`` is the entry point. This module alone has no Keras twin: it is a rewrite for cuDNN's fused
convolution calls, which Keras has no counterpart of; what it computes is ``ResNet34``'s function, tested against
Keras on a CPU (``tests/test_fusion.py``).

Every BatchNorm is folded into the convolution before it (in float64, then cast), and on CUDA each
``conv + bias [+ residual] + ReLU`` is ONE cuDNN call (``torch.cudnn_convolution_relu`` /
``torch.cudnn_convolution_add_relu``, cuDNN's runtime-fusion engines) instead of a convolution followed
by an element-wise kernel that reads and writes the whole activation again. Off CUDA the same folded
layers run as ``F.conv2d`` + add + ReLU, which is how the tests check the folding on a CPU.

What is left between the convolutions is TF "same" padding and the stem's max-pool. On CUDA these are
rewritten too (each rewrite exact, each an argument, so the tests run it on a CPU and the GPU profile can
time each one against the plain version; the H200 figures are in benchmarks/README.md):

- ``strided="zero-tap"``: a convolution that TF pads one pixel more at the bottom/right, (p, p + 1), gets a
  kernel one row/column larger whose leading row/column is zero, and symmetric padding p + 1. Its windows
  start one pixel earlier and that pixel meets the zero tap, so it sums exactly the pixels TF's does, with
  the same output size, and no padded copy of the input is made. It costs (k+1)^2/k^2 of that conv's MACs.
- ``stem="copy4"``: the stem's input is padded in ONE copy that also appends a zero 4th channel (and the
  stem's weights a zero input channel): cuDNN's 7x7 first-layer kernel wants 4 channels and otherwise pads
  them itself in extra kernels. ``stem="zero-tap"`` (an 8x8 kernel, no copy) is exact too, but on the H200
  it lost that kernel and took 2 ms more at batch 256.
- ``compile_glue``: on CUDA the stem's max-pool and the remaining pad copies run as small ``torch.compile``
  functions, one Triton kernel each; torch's own max-pool writes an int64 index per output (H200, batch
  256: 0.81 ms, against 0.13 ms compiled).
- ``fold_skip_bias``: the projection's folded bias goes into the bias of the cuDNN call that adds the skip
  (``conv2``), so the 1x1 projection is a bias-free convolution; torch adds a convolution's bias in a separate
  kernel on its cuDNN path.

``"auto"`` takes the GPU rewrite on CUDA and the plain copy elsewhere (where a copy is cheap and extra
MACs are not). The benchmark's ``max_rel_err`` column checks every row against the float32 reference.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from torch_impl.padding import Conv2dSame, max_pool_same, same_padding
from torch_impl.residual_unit import ResidualUnit
from torch_impl.resnet34 import ResNet34

STEMS = ("auto", "copy", "copy4", "zero-tap")
STRIDED = ("auto", "copy", "zero-tap")


@torch.no_grad()  # constants, not part of the model's autograd graph (and so a fused model can be deep-copied)
def fold_batch_norm(conv: Conv2dSame, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one convolution that computes ``bn(conv(x))`` in eval mode, in float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    return weight, bias


def pad_copy(x: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
    """``F.pad(x, pad)`` with zeros, in x's memory format (channels_last stays channels_last)."""
    return F.pad(x, pad)


def stem_max_pool(x: torch.Tensor) -> torch.Tensor:
    """The book's 3x3/2 TF "same" max-pool (-inf padding)."""
    return max_pool_same(x, 3, 2)


class CompiledInProcess:
    """A ``torch.compile``d function whose compiles run in this process (inductor's ``compile_threads=1``).

    Left to itself, inductor starts a pool of one compile worker per core at a process's first compile. While
    the pool starts, every multi-threaded CPU op of the process waits for busy cores: on the H200 machine (16
    cores) a one-image host-to-device copy took about 8 ms instead of 0.08 ms for about 5 s after a first compile
    (benchmarks/README.md). These kernels are tiny, so compiling them in-process is also quicker (2.1 s against
    3.5 s there).
    Only a call with arguments not seen before (a compile) runs under the patch; the others call straight through.
    """

    def __init__(self, compiled: Callable) -> None:
        self.compiled = compiled
        self.seen: set[tuple] = set()

    def __call__(self, *args: object) -> torch.Tensor:
        shapes = ((a.shape, a.dtype, a.device, a.stride()) if isinstance(a, torch.Tensor) else a for a in args)
        key = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), *shapes)
        if key in self.seen:
            return self.compiled(*args)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(compile_threads=1):
            outputs = self.compiled(*args)
        self.seen.add(key)
        return outputs


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # One compiled wrapper per function, shared by every model; one graph per input shape (dynamic=False).
    return CompiledInProcess(torch.compile(fn, dynamic=False, fullgraph=True))


def glue(fn: Callable, x: torch.Tensor, compile_glue: bool) -> Callable:
    """``fn`` compiled into one Triton kernel where that pays (CUDA, not already inside a compiled model)."""
    if compile_glue and x.is_cuda and not torch.compiler.is_compiling():
        return _compiled(fn)
    return fn


def _pick(mode: str, x: torch.Tensor, on_cuda: str, elsewhere: str) -> str:
    return mode if mode != "auto" else (on_cuda if x.is_cuda else elsewhere)


class FusedConv(nn.Module):
    """A TF-"same" convolution with its BatchNorm folded in, optionally + residual and ReLU, in one call.

    Args:
        uneven: how uneven TF padding (p, p + 1) is applied: "copy" (a padded copy of the input), "zero-tap"
            (a kernel grown by a zero leading row/column, symmetric padding p + 1, no copy) or "auto".
        channels_to: pad the input (in the pad copy, which is then always made) and the weights with zero
            channels up to this many; None leaves them.
        channels_on_cpu: False pads the channels on CUDA only.
        with_bias: False for a convolution whose bias the next fused call adds (``extra_bias`` there).
        extra_bias: a float64 bias added to the folded one (the projection's, see ``fold_skip_bias``).
        compile_glue: on CUDA, make the pad copy one compiled kernel.
    """

    def __init__(
        self,
        conv: Conv2dSame,
        bn: nn.BatchNorm2d,
        relu: bool,
        *,
        uneven: str = "copy",
        channels_to: int | None = None,
        channels_on_cpu: bool = True,
        with_bias: bool = True,
        extra_bias: torch.Tensor | None = None,
        compile_glue: bool = False,
    ) -> None:
        super().__init__()
        weight, bias = fold_batch_norm(conv, bn)
        if extra_bias is not None:
            bias = bias + extra_bias
        dtype = conv.weight.dtype
        self.register_buffer("weight", weight.to(dtype))
        self.register_buffer("bias", bias.to(dtype) if with_bias else None)
        self.kernel_size, self.stride, self.relu = conv.kernel_size[0], conv.stride[0], relu
        self.uneven, self.compile_glue = uneven, compile_glue
        # TF's padding can be uneven only where it depends on the size (Conv2dSame.dynamic_padding).
        dynamic = getattr(conv, "dynamic_padding", False)
        if uneven in ("auto", "zero-tap") and dynamic:  # the even-sized case, both axes grown: precomputed
            self.register_buffer("weight_grown", F.pad(weight, (1, 0, 1, 0)).to(dtype), persistent=False)
        self.channels_to = channels_to if channels_to and channels_to > weight.shape[1] else None
        self.channels_on_cpu = channels_on_cpu
        if self.channels_to:
            extra = (0, 0, 0, 0, 0, self.channels_to - weight.shape[1])
            self.register_buffer("weight_channels", F.pad(weight, extra).to(dtype), persistent=False)

    def _input_weight_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        top, bottom = same_padding(x.shape[-2], self.kernel_size, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel_size, self.stride)
        channels = self.channels_to if (x.is_cuda or self.channels_on_cpu) else None
        if top == bottom and left == right and not channels:
            return x, self.weight, (top, left)
        if not channels and _pick(self.uneven, x, "zero-tap", "copy") == "zero-tap":
            grow_h, grow_w = bottom - top, right - left  # 0 or 1: TF puts the odd pixel after
            if grow_h and grow_w:
                weight = self.weight_grown
            else:
                weight = F.pad(self.weight, (grow_w, 0, grow_h, 0))  # a non-square input: one axis even
            return x, weight, (bottom, right)
        pad = (left, right, top, bottom)
        weight = self.weight
        if channels:
            pad, weight = (*pad, 0, channels - x.shape[1]), self.weight_channels
        return glue(pad_copy, x, self.compile_glue)(x, pad), weight, (0, 0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x, weight, padding = self._input_weight_padding(x)
        stride, dilation = (self.stride, self.stride), (1, 1)
        if self.relu and x.is_cuda:
            if residual is None:
                return torch.cudnn_convolution_relu(x, weight, self.bias, stride, padding, dilation, 1)
            return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, self.bias, stride, padding, dilation, 1)
        y = F.conv2d(x, weight, self.bias, stride, padding)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y


class FusedResidualUnit(nn.Module):
    """``ResidualUnit`` as two or three fused convolutions: relu(conv_bn2(relu(conv_bn1(x))) + skip(x))."""

    def __init__(
        self, unit: ResidualUnit, *, strided: str = "copy", fold_skip_bias: bool = False, compile_glue: bool = False
    ) -> None:
        super().__init__()
        conv1, bn1, _, conv2, bn2 = unit.main_layers
        self.conv1 = FusedConv(conv1, bn1, relu=True, uneven=strided, compile_glue=compile_glue)
        skip_bias = None
        self.skip = None
        if len(unit.skip_layers):
            if fold_skip_bias:  # the projection's bias is added by conv2's cuDNN call, not by its own kernel
                skip_bias = fold_batch_norm(*unit.skip_layers)[1]
            self.skip = FusedConv(*unit.skip_layers, relu=False, with_bias=skip_bias is None)
        # conv2 + the skip, then ReLU: cudnn_convolution_add_relu
        self.conv2 = FusedConv(conv2, bn2, relu=True, extra_bias=skip_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.skip is None else self.skip(x)
        return self.conv2(self.conv1(x), residual=skip)


class FusedResNet34(nn.Module):
    """Inference-only ResNet-34 built from a (trained or converted) ``torch_impl.ResNet34``; logits out.

    Only the book's ReLU network in the book's convention is supported (cuDNN fuses ReLU, not the other
    activations; the padding rewrites are TF "same"'s), and the classifier must produce logits
    (``classifier_activation=None``; a headless trunk, ``num_classes=0``, is refused too).

    Args:
        stem: "copy" (pad the input in a copy), "copy4" (the same copy with a 4th zero channel), "zero-tap"
            (an 8x8 kernel, no copy) or "auto" (copy4 on CUDA, copy elsewhere). See the module docstring.
        strided: "copy", "zero-tap" or "auto" (zero-tap on CUDA, copy elsewhere), for the units' 3x3/2 convs.
        compile_glue: on CUDA, the stem's max-pool and the pad copies as compiled Triton kernels.
        fold_skip_bias: the projections' biases added inside the cuDNN call that adds the skip.
        All off (stem="copy", strided="copy", False, False) is the first fused version, kept for comparison.
    """

    def __init__(
        self,
        model: ResNet34,
        *,
        stem: str = "auto",
        strided: str = "auto",
        compile_glue: bool = True,
        fold_skip_bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, ResNet34):
            raise TypeError(
                "FusedResNet34 rewrites a torch_impl.ResNet34 (conversion.keras_to_torch gives one for a Keras model). "
                f"Received: {type(model).__name__}"
            )
        if not model.num_classes:
            raise ValueError("FusedResNet34 returns logits; this ResNet34 has no head. Received: num_classes=0")
        if model.activation_name != "relu":
            raise ValueError(f"FusedResNet34 fuses ReLU only. Received: activation={model.activation_name!r}")
        if model.convention != "book":
            raise ValueError(
                "FusedResNet34 rewrites the book's TF 'same' padding; the torchvision convention is not supported. "
                f"Received: convention={model.convention!r}"
            )
        if model.classifier_activation not in (None, "linear"):
            raise ValueError(
                "FusedResNet34 returns logits; build the model with classifier_activation=None. "
                f"Received: classifier_activation={model.classifier_activation!r}"
            )
        for name, value, allowed in (("stem", stem, STEMS), ("strided", strided, STRIDED)):
            if value not in allowed:
                raise ValueError(f"FusedResNet34: {name} must be one of {allowed}. Received: {name}={value!r}")
        self.compile_glue = compile_glue
        self.stem = FusedConv(
            model.stem_conv,
            model.stem_bn,
            relu=True,
            uneven="zero-tap" if stem == "zero-tap" else "copy",
            channels_to=4 if stem in ("auto", "copy4") else None,
            channels_on_cpu=stem == "copy4",
            compile_glue=compile_glue,
        )
        self.units = nn.Sequential(
            *(
                FusedResidualUnit(unit, strided=strided, fold_skip_bias=fold_skip_bias, compile_glue=compile_glue)
                for unit in model
                if isinstance(unit, ResidualUnit)
            )
        )
        self.avg_pool = model.avg_pool  # the global average pool holds no weights
        self.classifier = copy.deepcopy(model.classifier)  # its own copy, in its own dtype

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.units(glue(stem_max_pool, x, self.compile_glue)(x))
        return self.classifier(self.avg_pool(x))


def fuse(model: ResNet34, **options: str | bool) -> FusedResNet34:
    """The fastest correct way to run a trained or converted twin for inference: a ``FusedResNet34``, in eval mode.

    Inference only: every BatchNorm is folded with its running statistics (the model's train/eval mode does not
    matter, and no gradient flows), into copies; ``model`` itself is left unchanged. The result takes NCHW images
    in the model's dtype and returns logits. On CUDA each conv + bias (+ residual) + ReLU is one cuDNN call and the
    padding around it is rewritten exactly; elsewhere the same folded layers run as ``F.conv2d`` + add + ReLU. For
    the GPU's speed, move the fused model and its images alike: ``.cuda().half().to(memory_format=torch.channels_last)``
    (the H200's figures: benchmarks/README.md).
    ``torch.compile`` is touched only when a fused model runs on CUDA (the pad copies and the stem's max-pool).

    Refused (``ValueError``, one line): an activation other than ReLU (cuDNN fuses ReLU only), the torchvision
    convention (the rewrites are exact for the book's TF "same" padding only), a head activation (build the model
    with ``classifier_activation=None``: the result returns logits), a headless model (``num_classes=0``) and an
    unknown ``stem`` or ``strided``; a model that is not a ``torch_impl.ResNet34`` is a ``TypeError``.

    Args:
        model: the book's ``torch_impl.ResNet34`` (``conversion.keras_to_torch`` makes one of a Keras model).
        **options: ``FusedResNet34``'s keyword arguments, ``stem``, ``strided``, ``compile_glue`` and
            ``fold_skip_bias``; the defaults are the fastest on an H200 and need not be changed.
    """
    return FusedResNet34(model, **options).eval()
