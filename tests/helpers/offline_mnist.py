"""A local stand-in for keras' MNIST download, and a runner that uses it.

``write_npz(path)`` writes an ``mnist.npz`` in the format of
``keras.datasets.mnist`` (uint8 images of 28x28, uint8 labels, keys x_train,
y_train, x_test, y_test), made from scikit-learn's 8x8 digits: each pixel becomes a
3x3 block, the 24x24 digit is centred in 28x28 and 0..16 is scaled to 0..255.

``python offline_mnist.py SCRIPT ARGS...`` runs SCRIPT as ``__main__`` with
``tf.keras.datasets.mnist.load_data`` reading the file named by ``$MNIST_NPZ``
(Keras checks the real file's hash and would download it otherwise).
"""

from __future__ import annotations

import os
import runpy
import sys

import numpy as np


def write_npz(path: str, test_size: int = 297) -> str:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images, np.ones((3, 3)))  # (n, 24, 24)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    images = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    cut = len(images) - test_size
    np.savez_compressed(
        path, x_train=images[:cut], y_train=labels[:cut], x_test=images[cut:], y_test=labels[cut:]
    )
    return path


def _load_data(path: str = "mnist.npz"):
    with np.load(os.environ["MNIST_NPZ"], allow_pickle=True) as f:
        return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])


if __name__ == "__main__":
    import tensorflow as tf

    tf.keras.datasets.mnist.load_data = _load_data
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
