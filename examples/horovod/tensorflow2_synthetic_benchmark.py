"""Horovod's TF2 synthetic benchmark, written for ringtrain: a Horovod script with its import changed.

It makes the same Horovod calls in the same places as Horovod's published
``examples/tensorflow2/tensorflow2_synthetic_benchmark.py`` (same flags, a
``DistributedGradientTape`` inside a ``tf.function``, and ``broadcast_variables``
inside that ``tf.function`` on the first step); only the import line differs.
Run it with any of::

    ringtrain launch -np 2 examples/horovod/tensorflow2_synthetic_benchmark.py --no-cuda
    mpiexec -n 2 python examples/horovod/tensorflow2_synthetic_benchmark.py --no-cuda

Its ``tf.keras.applications`` models and ``opt.variables()`` need tf-keras
(``TF_USE_LEGACY_KERAS=1``, which ringtrain workers set; pass ``-env TF_USE_LEGACY_KERAS 1``
to a plain mpiexec).
"""

import argparse
import os
import timeit

import numpy as np
import tensorflow as tf
from tensorflow.keras import applications

# The only change to the calls: this line was `import horovod.tensorflow as hvd`.
import ringtrain.horovod.tensorflow as hvd

parser = argparse.ArgumentParser(
    description="TensorFlow synthetic benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter
)
parser.add_argument(
    "--fp16-allreduce", action="store_true", default=False, help="fp16 compression in allreduce"
)
parser.add_argument("--model", type=str, default="ResNet50", help="tf.keras.applications model to train")
parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
parser.add_argument("--num-warmup-batches", type=int, default=10, help="untimed batches first")
parser.add_argument("--num-batches-per-iter", type=int, default=10, help="batches per timed iteration")
parser.add_argument("--num-iters", type=int, default=10, help="timed iterations")
parser.add_argument("--no-cuda", action="store_true", default=False, help="train on the CPU")
args = parser.parse_args()
args.cuda = not args.no_cuda

hvd.init()

# One GPU per process, chosen by local rank; or none at all.
if args.cuda:
    gpus = tf.config.experimental.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.experimental.set_visible_devices(gpus[hvd.local_rank()], "GPU")
else:
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"

model = getattr(applications, args.model)(weights=None)
opt = tf.optimizers.SGD(0.01)

data = tf.random.uniform([args.batch_size, 224, 224, 3])
target = tf.random.uniform([args.batch_size, 1], minval=0, maxval=999, dtype=tf.int64)


@tf.function
def benchmark_step(first_batch):
    compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none

    with tf.GradientTape() as tape:
        probs = model(data, training=True)
        loss = tf.losses.sparse_categorical_crossentropy(target, probs)

    # Gradients are averaged over every rank before the update.
    tape = hvd.DistributedGradientTape(tape, compression=compression)
    gradients = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(gradients, model.trainable_variables))  # noqa: B905 (as written for Horovod)

    # After the first step (so the optimizer's slots exist), start every rank from rank 0's state.
    if first_batch:
        hvd.broadcast_variables(model.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables(), root_rank=0)


def log(text, newline=True):
    if hvd.rank() == 0:
        print(text, end="\n" if newline else "", flush=True)


log(f"Model: {args.model}")
log(f"Batch size: {args.batch_size}")
device = "GPU" if args.cuda else "CPU"
log(f"Number of {device}s: {hvd.size()}")

with tf.device(device):
    log("Running warmup...")
    benchmark_step(first_batch=True)
    timeit.timeit(lambda: benchmark_step(first_batch=False), number=args.num_warmup_batches)

    log("Running benchmark...")
    img_secs = []
    for x in range(args.num_iters):
        seconds = timeit.timeit(lambda: benchmark_step(first_batch=False), number=args.num_batches_per_iter)
        img_sec = args.batch_size * args.num_batches_per_iter / seconds
        log(f"Iter #{x}: {img_sec:.1f} img/sec per {device}")
        img_secs.append(img_sec)

    img_sec_mean = np.mean(img_secs)
    img_sec_conf = 1.96 * np.std(img_secs)
    log(f"Img/sec per {device}: {img_sec_mean:.1f} +-{img_sec_conf:.1f}")
    log(
        f"Total img/sec on {hvd.size()} {device}(s): "
        f"{hvd.size() * img_sec_mean:.1f} +-{hvd.size() * img_sec_conf:.1f}"
    )
