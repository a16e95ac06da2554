"""Helpers for torch ResNets written by code nobody here wrote (torchvision, timm, transformers)."""

from __future__ import annotations

import numpy as np
import torch

from conversion.arrays import nhwc_to_nchw


def hostile_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded hostile BatchNorm statistics (and a non-trivial head) for a torch ResNet, in place.

    As conversion.hostile does for Keras: a quarter of the variances in [5e-4, 2e-3], where Keras's epsilon
    (1e-3) instead of torch's (1e-5) would change the scale by 20-40%.
    """
    generator = np.random.default_rng(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                variance = np.exp(generator.uniform(np.log(0.05), np.log(20.0), n))
                low = generator.permutation(n)[: n // 4]
                variance[low] = generator.uniform(5e-4, 2e-3, low.size)
                mean = generator.choice([-1.0, 1.0], n) * generator.uniform(0.5, 2.0, n)
                for tensor, value in (
                    (module.running_var, variance),
                    (module.running_mean, mean),
                    (module.weight, generator.uniform(0.3, 1.2, n) * np.sqrt(variance + 1e-5)),
                    (module.bias, generator.normal(0.0, 0.5, n)),
                ):
                    tensor.copy_(torch.from_numpy(value))
            elif isinstance(module, torch.nn.Linear):
                module.bias.copy_(torch.from_numpy(generator.normal(0.0, 0.1, module.bias.shape)))
    return model.eval()


def own_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The model's own forward on NHWC images (transformers' output object unwrapped)."""
    with torch.no_grad():
        out = model(torch.from_numpy(nhwc_to_nchw(images)))
    return getattr(out, "logits", out).numpy()
