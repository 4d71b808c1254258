"""ringtrain's own throughput benchmark in Horovod's API: a custom loop on synthetic images.

This is not one of Horovod's files. It is written for ringtrain against Horovod's names,
so that only its import line would change to run under Horovod
(``import horovod.tensorflow as hvd``). Its training step is one ``tf.function`` that
wraps the tape in ``hvd.DistributedGradientTape`` (optionally fp16 on the wire) and, on
the first step only, calls ``hvd.broadcast_variables`` on the model's and the optimizer's
variables inside that same ``tf.function``: the optimizer's slots exist only once it has
applied one update, so the broadcast cannot happen earlier.

Each rank starts from different random weights on purpose; rank 0 checks that they
differ before the first step and agree at the end. Each rank prints its images/s, and
rank 0 the sum over ranks::

    ringtrain launch -np 2 --backend mpi examples/horovod/tape_benchmark.py --steps 20
    mpiexec -n 2 python examples/horovod/tape_benchmark.py --fp16 --model mlp
    mpiexec -n 2 python examples/horovod/tape_benchmark.py --model ResNet50 --image-size 224

``--model`` is ``convnet`` (default), ``mlp`` or the name of any ``tf.keras.applications``
model (built without pretrained weights).
"""

from __future__ import annotations

import argparse
import os
import time

# tf.keras must mean tf-keras (Keras 2), as in ringtrain's workers; it is read when
# TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ringtrain.horovod.tensorflow as hvd  # noqa: E402  (the one Horovod-specific line)

CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Images/s of a DistributedGradientTape training loop")
    parser.add_argument("--model", default="convnet", help="convnet, mlp or a tf.keras.applications name")
    parser.add_argument("--width", type=int, default=16, help="filters (convnet) or units (mlp)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the square RGB images")
    parser.add_argument("--batch", type=int, default=16, help="images per rank per step")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps after the first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the spread is printed")
    parser.add_argument("--fp16", action="store_true", help="send gradients as float16")
    args = parser.parse_args(argv)
    for name in ("width", "image_size", "batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def build_model(kind: str, width: int, side: int) -> tf.keras.Model:
    shape = (side, side, 3)
    if kind == "convnet":
        layers = [
            tf.keras.layers.Conv2D(width, 3, activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Conv2D(2 * width, 3, activation="relu"),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    elif kind == "mlp":
        layers = [
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(width, activation="relu"),
            tf.keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    else:
        factory = getattr(tf.keras.applications, kind, None)
        if factory is None:
            raise SystemExit(f"--model {kind!r}: not convnet, mlp or a tf.keras.applications model")
        return factory(weights=None, input_shape=shape, classes=CLASSES)
    return tf.keras.Sequential([tf.keras.Input(shape), *layers])


def weights_checksum(model: tf.keras.Model) -> float:
    return float(sum(np.abs(v.numpy()).astype(np.float64).sum() for v in model.variables))


def ranks_agree(value: float) -> bool:
    """True when every rank passed the same value (compared on all ranks, bit for bit)."""
    everyone = hvd.allgather(tf.constant([value], tf.float64)).numpy()
    return bool(np.all(everyone == everyone[0]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hvd.init()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:  # one GPU per process on a GPU host
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")

    tf.random.set_seed(1000 + hvd.rank())  # distinct start per rank, so the broadcast matters
    model = build_model(args.model, args.width, args.image_size)
    optimizer = tf.keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    images = tf.random.uniform([args.batch, args.image_size, args.image_size, 3])
    labels = tf.random.uniform([args.batch], maxval=CLASSES, dtype=tf.int64)
    compression = hvd.Compression.fp16 if args.fp16 else hvd.Compression.none

    @tf.function
    def train_step(sync_from_root: bool) -> tf.Tensor:
        # sync_from_root is a Python bool, so this traces twice: once with the broadcast.
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                tf.keras.losses.sparse_categorical_crossentropy(labels, model(images, training=True))
            )
        tape = hvd.DistributedGradientTape(tape, compression=compression)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        if sync_from_root:
            slots = optimizer.variables() if callable(optimizer.variables) else optimizer.variables
            hvd.broadcast_variables(model.variables, root_rank=0)
            hvd.broadcast_variables(slots, root_rank=0)
        return loss

    differed_at_start = not ranks_agree(weights_checksum(model))
    train_step(True).numpy()
    for _ in range(args.warmup_steps):
        train_step(False)
    train_step(False).numpy()  # wait for the warm-up to finish before timing

    rates = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = train_step(False)
        loss.numpy()  # the steps run asynchronously until a value is read
        rates.append(args.batch * args.steps / (time.perf_counter() - start))

    mine = float(np.mean(rates))
    print(
        f"rank {hvd.rank()}: {mine:.1f} img/s (rounds {min(rates):.1f} to {max(rates):.1f})",
        flush=True,
    )
    total = float(hvd.allreduce(tf.constant(mine, tf.float64), op=hvd.Sum).numpy())
    agree_at_end = ranks_agree(weights_checksum(model))
    if hvd.rank() == 0:
        wire = "fp16" if args.fp16 else "fp32"
        print(
            f"total: {total:.1f} img/s on {hvd.size()} ranks "
            f"({args.model}, batch {args.batch} per rank, {wire} gradients)",
            flush=True,
        )
        print(
            f"weights differed across ranks before the first step: {differed_at_start}; "
            f"identical after training: {agree_at_end}",
            flush=True,
        )


if __name__ == "__main__":
    main()
