"""torch_impl.fuse (torch_impl/fusion.py): the fused inference rewrite computes the same function as the Keras model.

On a CPU the fused layers run as conv (folded BN) + add + ReLU, so these tests check the folding and the
wiring; the one cuDNN call per layer that replaces them on a GPU is checked by the benchmark's max_rel_err
column on that GPU. Measured here against Keras (seed-0 hostile weights, logits):

    case                         float32    float64    (the twin itself: float32, float64)
    batch 2, 224x224             7.3e-07    1.5e-15    5.1e-07, 1.0e-15
    batch 1, 225x225 (odd)       4.3e-07    5.8e-16    1.7e-07, 9.6e-16
    batch 3, 97x131              6.4e-07    8.0e-16    4.3e-07, 1.1e-15

so the bounds are the twins' own (conversion.arrays.TOLERANCE: 1e-5 and 1e-10). Folding in float32 instead
of float64 would still pass float32; float64 at ~1e-15 shows nothing was rounded on the way (a head copied
through float32 gave 2.6e-8 here and failed).

The GPU rewrites of the padding (a zero-tap kernel instead of a pad copy, a 4th zero input channel in the
stem's copy) are explicit arguments, so they run here on the CPU against Keras too, on even, odd and
non-square sizes (where the padding is even on one axis and uneven on the other). The compiled glue
(``compile_glue``) runs on CUDA only; it compiles the same functions that run here eagerly. The README's snippet
runs here as written.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import keras_impl  # noqa: F401  (first: TensorFlow then loads locally and quietly, see docs/pitfalls.md)

# isort: split
import keras
import numpy as np
import pytest
import torch

import torch_impl
from conversion.arrays import TOLERANCE, max_rel_err, nhwc_to_nchw, seeded_images
from torch_impl import FusedResNet34
from torch_impl.fusion import CompiledInProcess, FusedConv, fold_batch_norm
from torch_impl.padding import Conv2dSame

README = Path(__file__).resolve().parents[1] / "README.md"

CASES = [(2, 224, 224), (1, 225, 225), (3, 97, 131)]
CASE_IDS = ["batch2-224x224", "batch1-odd-225x225", "batch3-non-square-97x131"]
# The defaults (on a CPU: copies, the projection's bias folded into the add), the first fused version, and what the
# defaults do on CUDA (a 4-channel stem copy, zero-tap strided convs). The stem as an 8x8 zero-tap kernel (slower on
# the GPU, not a default) is checked at the layer, in test_a_fused_strided_conv_pads_as_tf_on_every_size.
CONFIGS = {
    "default": {},
    "first": {"stem": "copy", "strided": "copy", "compile_glue": False, "fold_skip_bias": False},
    "cuda-rewrites": {"stem": "copy4", "strided": "zero-tap"},
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("batch", "height", "width"), CASES, ids=CASE_IDS)
def test_fused_model_matches_keras(twins_f32, twins_f64, batch, height, width, dtype):
    keras_model, torch_model = {"float32": twins_f32, "float64": twins_f64}[dtype]
    images = seeded_images(batch, height, width, seed=height * 1000 + width, dtype=dtype)
    expected = keras.ops.convert_to_numpy(keras_model(images, training=False))
    for name, kwargs in CONFIGS.items():
        actual = torch_impl.fuse(torch_model, **kwargs)(torch.from_numpy(nhwc_to_nchw(images))).numpy()
        assert actual.dtype == np.dtype(dtype) and actual.shape == expected.shape == (batch, 10), name
        assert max_rel_err(actual, expected) <= TOLERANCE[dtype], name


def test_fused_model_keeps_the_original_unchanged(twins_f64):
    _, torch_model = twins_f64
    before = {name: tensor.clone() for name, tensor in torch_model.state_dict().items()}
    FusedResNet34(torch_model)
    after = torch_model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_folded_batch_norm_equals_conv_then_batch_norm():
    # A strided 3x3 with a tiny-variance channel, in float64: folding is exact up to rounding.
    torch.manual_seed(0)
    unit = torch_impl.ResidualUnit(4, 6, strides=2).double().eval()
    conv, bn = unit.main_layers[0], unit.main_layers[1]
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 1.0)
        bn.running_var.uniform_(0.05, 20.0)
        bn.running_var[0] = 1e-6
        bn.weight.normal_(1.0, 0.3)
        bn.bias.normal_(0.0, 0.5)
    weight, bias = fold_batch_norm(conv, bn)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = bn(conv(x))
        folded = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 1, 1)), weight, bias, stride=2)
    assert max_rel_err(folded.numpy(), expected.numpy()) <= 1e-13


@pytest.mark.parametrize(
    ("kwargs", "fused_kwargs", "message"),
    [
        ({"activation": "elu"}, {}, "fuses ReLU only"),
        ({"classifier_activation": "softmax"}, {}, "returns logits"),
        ({"convention": "torchvision"}, {}, "convention is not supported"),
        ({}, {"stem": "pad"}, "stem must be one of"),
        ({}, {"strided": "copy4"}, "strided must be one of"),
        ({"num_classes": 0}, {}, "has no head"),
    ],
    ids=["elu", "softmax-head", "torchvision-convention", "unknown-stem", "unknown-strided", "headless"],
)
def test_fused_model_refuses_what_it_cannot_fuse(kwargs, fused_kwargs, message):
    model = torch_impl.ResNet34(**{"classifier_activation": None, **kwargs})
    with pytest.raises(ValueError, match=message) as caught:
        torch_impl.fuse(model, **fused_kwargs)
    assert "\n" not in str(caught.value)


def test_fuse_refuses_a_model_that_is_not_the_twin():
    with pytest.raises(TypeError, match=r"torch_impl\.ResNet34.*Received: Sequential"):
        torch_impl.fuse(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))


@pytest.mark.parametrize(("kernel_size", "in_channels"), [(3, 4), (7, 3)], ids=["3x3-stride2", "7x7-stride2-stem"])
@pytest.mark.parametrize("mode", ["zero-tap", "copy", "copy-4-channels"])
def test_a_fused_strided_conv_pads_as_tf_on_every_size(kernel_size, in_channels, mode):
    """Even (TF pads one more after), odd (symmetric) and mixed sizes: each way gives conv + BN of the twin."""
    torch.manual_seed(0)
    conv = Conv2dSame(in_channels, 5, kernel_size, stride=2).double()
    bn = torch.nn.BatchNorm2d(5, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    channels_to = in_channels + 1 if mode == "copy-4-channels" else None
    fused = FusedConv(conv, bn, relu=False, uneven=mode.removesuffix("-4-channels"), channels_to=channels_to)
    for height, width in [(12, 12), (13, 13), (12, 13), (13, 12), (9, 16)]:
        x = torch.randn(2, in_channels, height, width, dtype=torch.float64)
        with torch.no_grad():
            expected = bn(conv(x))
        actual = fused(x)
        assert actual.shape == expected.shape == (2, 5, -(-height // 2), -(-width // 2))
        assert max_rel_err(actual.numpy(), expected.numpy()) <= 1e-13, (height, width)


def test_folded_skip_bias_leaves_the_projection_bias_free(twins_f64):
    _, torch_model = twins_f64
    first, folded = FusedResNet34(torch_model, fold_skip_bias=False), FusedResNet34(torch_model)
    projections = [index for index, unit in enumerate(folded.units) if unit.skip is not None]
    assert projections == [3, 7, 13]
    for index in projections:
        assert folded.units[index].skip.bias is None and first.units[index].skip.bias is not None
        moved = first.units[index].skip.bias + first.units[index].conv2.bias
        assert torch.allclose(folded.units[index].conv2.bias, moved, rtol=1e-14, atol=0)


def test_a_fused_model_copies_like_any_module():
    """What the GPU profile does with it: deepcopy, then half precision (folded constants hold no autograd graph)."""
    fused = FusedResNet34(torch_impl.ResNet34(num_classes=10, classifier_activation=None).eval())
    assert not any(buffer.requires_grad for buffer in fused.buffers())
    half = copy.deepcopy(fused).half()
    assert half.stem.weight.dtype == torch.float16 and fused.stem.weight.dtype == torch.float32


def test_the_glue_compiles_in_process_so_no_compile_pool_takes_the_cores():
    # On CUDA the glue is torch.compiled; inductor's pool of one compile worker per core would hold every core for
    # seconds after the first compile (docstring of CompiledInProcess). Each new shape compiles with one thread, and
    # a call already seen goes straight through, under the user's own setting.
    import torch._inductor.config as inductor_config

    threads_seen: list = []

    def compiled(x: torch.Tensor, pad: tuple) -> torch.Tensor:  # stands in for the torch.compile'd function
        threads_seen.append(inductor_config.compile_threads)
        return x

    glue = CompiledInProcess(compiled)
    small, large = torch.ones(1, 3, 4, 4), torch.ones(2, 3, 4, 4)
    with inductor_config.patch(compile_threads=4):  # the user's setting (a 4-core machine's default)
        for x, pad in ((small, (0, 1)), (small, (0, 1)), (large, (0, 1)), (small, (1, 1))):
            assert glue(x, pad) is x
    assert threads_seen == [1, 4, 1, 1]


def test_fuse_gives_an_eval_mode_fused_model_and_leaves_the_twin_in_its_mode():
    model = torch_impl.ResNet34(num_classes=10, classifier_activation=None)  # train mode: BN folds its running stats
    fused = torch_impl.fuse(model)
    assert isinstance(fused, FusedResNet34) and not fused.training and model.training
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        expected = model.eval()(x)
    assert max_rel_err(fused(x).numpy(), expected.numpy()) <= TOLERANCE["float32"]


def test_readme_snippet_runs_as_written():
    """The README's fast-inference snippet, on this machine (a CPU: plain convolutions), gives the twin's logits."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (snippet,) = [block for block in blocks if "torch_impl.fuse(" in block]
    namespace: dict = {}
    exec(snippet, namespace)  # the README's own code, nothing else
    assert tuple(namespace["logits"].shape) == (2, 10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = namespace["model"](x)
    assert max_rel_err(namespace["fused"](x).numpy(), expected.numpy()) <= TOLERANCE["float32"]
