"""Gradient shapes of common models, for benchmarks that need a realistic tensor set."""

from __future__ import annotations

__all__ = ["resnet50_gradient_shapes"]


def resnet50_gradient_shapes() -> list[tuple[int, ...]]:
    """Trainable-variable shapes of ResNet-50 v1 (ImageNet head), in model order.

    161 tensors, 25,557,032 parameters, as in tf_cnn_benchmarks and torchvision:
    53 bias-free conv kernels (HWIO), each followed by batch-norm gamma and beta,
    then the dense classifier. Batch-norm moving statistics are not trainable and
    are left out.
    """
    shapes: list[tuple[int, ...]] = []

    def conv_bn(kh: int, kw: int, cin: int, cout: int) -> None:
        shapes.extend([(kh, kw, cin, cout), (cout,), (cout,)])  # kernel, gamma, beta

    conv_bn(7, 7, 3, 64)  # stem
    cin = 64
    for filters, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            conv_bn(1, 1, cin, filters)
            conv_bn(3, 3, filters, filters)
            if block == 0:  # projection shortcut comes first in Keras' ordering of the block
                conv_bn(1, 1, cin, 4 * filters)
            conv_bn(1, 1, filters, 4 * filters)
            cin = 4 * filters
    shapes.extend([(2048, 1000), (1000,)])  # classifier
    return shapes
