"""keras-hub's own ResNet-34, built offline: ``ResNetImageClassifier`` over a ``ResNetBackbone`` of basic blocks.

keras-hub computes the torchvision convention (a ZeroPadding2D before each strided "valid" conv and the max-pool,
BatchNorm epsilon 1e-5): ``conversion.keras_reader`` reads its graph by structure like any other, so weights copy
into it slot by slot. Its ``Input`` is float32 whatever the model's dtype, so a float64 model rounds its images
to float32 first.
"""

from __future__ import annotations

import keras

# keras-hub's ResNetBackbone of a ResNet-34 (what its timm converter builds for timm's resnet34).
KERAS_HUB_RESNET34 = {
    "input_conv_filters": [64], "input_conv_kernel_sizes": [7], "stackwise_num_filters": [64, 128, 256, 512],
    "stackwise_num_blocks": [3, 4, 6, 3], "stackwise_num_strides": [1, 2, 2, 2], "block_type": "basic_block",
    "use_pre_activation": False,
}  # fmt: skip


def build_keras_hub_resnet34(
    num_classes: int, input_shape: tuple, classifier_activation: str | None, dtype: str
) -> keras.Model:
    """keras-hub's ResNetImageClassifier of a ResNet-34 (no preprocessor, no dropout), untrained, offline."""
    try:
        import keras_hub
    except ImportError:
        raise ImportError("writing keras-hub's model needs keras-hub: pip install --no-deps keras-hub") from None
    backbone = keras_hub.models.ResNetBackbone(**KERAS_HUB_RESNET34, image_shape=tuple(input_shape), dtype=dtype)
    head = None if classifier_activation in (None, "linear") else classifier_activation
    return keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=num_classes, activation=head, dropout=0.0, dtype=dtype
    )
