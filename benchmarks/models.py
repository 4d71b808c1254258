"""CNN builders for the throughput benchmarks: GoogLeNet (Inception v1), VGG-16 and VGG-19.

Written from the papers (Szegedy et al. 2014, "Going deeper with convolutions", Table 1;
Simonyan & Zisserman 2014, "Very deep convolutional networks", configurations D and E).
Every builder takes ``(image_size, classes, keras)``, where ``keras`` is the Keras module
to build with (``tf.keras`` from tf-keras, or Keras 3), and returns an uncompiled model.

Deviations from the papers, all parameter-free: no local response normalisation in
GoogLeNet (later work showed it does not help), and "same" padding on every pooling
layer so small synthetic images (e.g. 32x32) still flow through.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BUILDERS", "build", "inception_v1", "vgg"]

# GoogLeNet Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) per module.
_INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}

# VGG: 3x3 convs per block (each block ends in a 2x2/2 max pool); filters per block below.
_VGG = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_VGG_FILTERS = (64, 128, 256, 512, 512)


def _conv(keras: Any, x: Any, filters: int, size: int, name: str, strides: int = 1) -> Any:
    conv = keras.layers.Conv2D(filters, size, strides=strides, padding="same", activation="relu", name=name)
    return conv(x)


def _inception(keras: Any, x: Any, name: str) -> Any:
    c1, r3, c3, r5, c5, pp = _INCEPTION[name]
    b1 = _conv(keras, x, c1, 1, f"inc{name}_1x1")
    b3 = _conv(keras, _conv(keras, x, r3, 1, f"inc{name}_3x3r"), c3, 3, f"inc{name}_3x3")
    b5 = _conv(keras, _conv(keras, x, r5, 1, f"inc{name}_5x5r"), c5, 5, f"inc{name}_5x5")
    pool = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"inc{name}_pool")(x)
    bp = _conv(keras, pool, pp, 1, f"inc{name}_poolproj")
    return keras.layers.Concatenate(axis=-1, name=f"inc{name}")([b1, b3, b5, bp])


def _aux_head(keras: Any, x: Any, classes: int, name: str) -> Any:
    """Auxiliary classifier of section 5: 5x5/3 avg pool, 1x1 conv 128, fc 1024, 70% dropout."""
    if x.shape[1] < 5:
        raise ValueError(
            f"the auxiliary head {name} needs a feature map of at least 5x5, got {x.shape[1]}x{x.shape[2]}; "
            "use image_size >= 224 or aux=False"
        )
    x = keras.layers.AveragePooling2D(5, strides=3, name=f"{name}_pool")(x)
    x = _conv(keras, x, 128, 1, f"{name}_conv")
    x = keras.layers.Flatten(name=f"{name}_flat")(x)
    x = keras.layers.Dense(1024, activation="relu", name=f"{name}_fc")(x)
    x = keras.layers.Dropout(0.7, name=f"{name}_drop")(x)
    return keras.layers.Dense(classes, activation="softmax", name=name)(x)


def inception_v1(image_size: int, classes: int, keras: Any, aux: bool = False) -> Any:
    """GoogLeNet. With ``aux=True`` the model has three outputs: main, aux1 (after 4a), aux2 (after 4d).

    About 6.99M parameters with the 1000-class head and no auxiliary heads, at any image size.
    """
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = _conv(keras, inputs, 64, 7, "conv1", strides=2)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    x = _conv(keras, x, 64, 1, "conv2r")
    x = _conv(keras, x, 192, 3, "conv2")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)
    x = _inception(keras, _inception(keras, x, "3a"), "3b")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool3")(x)
    aux_outputs = []
    for block in ("4a", "4b", "4c", "4d", "4e"):
        x = _inception(keras, x, block)
        if aux and block in ("4a", "4d"):
            aux_outputs.append(_aux_head(keras, x, classes, f"aux{len(aux_outputs) + 1}"))
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool4")(x)
    x = _inception(keras, _inception(keras, x, "5a"), "5b")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    x = keras.layers.Dropout(0.4, name="dropout")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, [outputs, *aux_outputs] if aux else outputs, name="inception_v1")


def vgg(image_size: int, classes: int, keras: Any, depth: int = 16, fixed_head: bool = False) -> Any:
    """VGG-16 (configuration D) or VGG-19 (E): 138,357,544 / 143,667,240 parameters at 224 px, 1000 classes.

    The classifier (fc 4096, fc 4096, fc classes) flattens whatever the last pool gives,
    (image_size // 32)^2 x 512 features, so smaller images mean a smaller first fc layer:
    the canonical counts hold at 224 only. ``fixed_head=True`` resizes the last feature map
    to 7x7 first (parameter-free), keeping the canonical count, and so the full gradient
    volume, at any image size.
    """
    if depth not in _VGG:
        raise ValueError(f"VGG depth must be 16 or 19, got {depth}")
    if image_size < 32:
        raise ValueError(f"VGG needs image_size >= 32 (five 2x2 pools), got {image_size}")
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = inputs
    for block, (convs, filters) in enumerate(zip(_VGG[depth], _VGG_FILTERS, strict=True), start=1):
        for conv in range(1, convs + 1):
            x = _conv(keras, x, filters, 3, f"block{block}_conv{conv}")
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    if fixed_head and x.shape[1] != 7:
        x = keras.layers.Resizing(7, 7, interpolation="nearest", name="to7x7")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(4096, activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(0.5, name="drop1")(x)
    x = keras.layers.Dense(4096, activation="relu", name="fc2")(x)
    x = keras.layers.Dropout(0.5, name="drop2")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"vgg{depth}")


def _vgg16(image_size: int, classes: int, keras: Any, **kw: Any) -> Any:
    return vgg(image_size, classes, keras, depth=16, **kw)


def _vgg19(image_size: int, classes: int, keras: Any, **kw: Any) -> Any:
    return vgg(image_size, classes, keras, depth=19, **kw)


BUILDERS = {"inception1": inception_v1, "vgg16": _vgg16, "vgg19": _vgg19}


def build(name: str, image_size: int, classes: int, keras: Any, **kw: Any) -> Any:
    """Build model ``name`` (a key of :data:`BUILDERS`) with the given Keras module."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name](image_size, classes, keras, **kw)
