"""Horovod's TF2 Keras MNIST example, written for ringtrain: a Horovod script with its import changed.

It makes the same Horovod calls as Horovod's published
``examples/tensorflow2/tensorflow2_keras_mnist.py``: ``DistributedOptimizer`` with
``backward_passes_per_step`` and ``average_aggregated_gradients``, the broadcast,
metric-average and learning-rate warm-up callbacks, and a checkpoint on rank 0.
Differences: the import line, and ``--epochs``/``--steps-per-epoch`` flags whose
defaults (24 epochs of 500 steps) are the original's fixed values, so tests can run
it briefly. The original's ``horovod.run`` entry point is left out; use
``ringtrain.horovod.spark.run(main, num_proc=N)`` from Python instead. Run it with::

    ringtrain launch -np 2 examples/horovod/tensorflow2_keras_mnist.py

It is a tf.keras (Keras 2) script: ``TF_USE_LEGACY_KERAS=1``, which ringtrain workers
set (pass ``-env TF_USE_LEGACY_KERAS 1`` to a plain mpiexec).
"""

import argparse

import tensorflow as tf

# The only change to the calls: this line was `import horovod.tensorflow.keras as hvd`.
import ringtrain.horovod.tensorflow.keras as hvd


def main(epochs=24, steps_per_epoch=500):
    hvd.init()

    # One GPU per process, chosen by local rank.
    gpus = tf.config.experimental.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        tf.config.experimental.set_visible_devices(gpus[hvd.local_rank()], "GPU")

    (mnist_images, mnist_labels), _ = tf.keras.datasets.mnist.load_data(path=f"mnist-{hvd.rank()}.npz")

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.cast(mnist_images[..., tf.newaxis] / 255.0, tf.float32), tf.cast(mnist_labels, tf.int64))
    )
    dataset = dataset.repeat().shuffle(10000).batch(128)

    mnist_model = tf.keras.Sequential(
        [
            tf.keras.layers.Conv2D(32, [3, 3], activation="relu"),
            tf.keras.layers.Conv2D(64, [3, 3], activation="relu"),
            tf.keras.layers.MaxPooling2D(pool_size=(2, 2)),
            tf.keras.layers.Dropout(0.25),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(128, activation="relu"),
            tf.keras.layers.Dropout(0.5),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )

    # The learning rate grows with the number of workers (the warm-up callback ramps it up).
    scaled_lr = 0.001 * hvd.size()
    opt = tf.optimizers.Adam(scaled_lr)
    opt = hvd.DistributedOptimizer(opt, backward_passes_per_step=1, average_aggregated_gradients=True)

    mnist_model.compile(
        loss=tf.losses.SparseCategoricalCrossentropy(),
        optimizer=opt,
        metrics=["accuracy"],
        experimental_run_tf_function=False,
    )

    callbacks = [
        # Every rank starts from rank 0's weights.
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Epoch metrics averaged over ranks; list it before callbacks that read metrics.
        hvd.callbacks.MetricAverageCallback(),
        # Ramp the learning rate from scaled_lr / size up to scaled_lr over three epochs.
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=3, verbose=1),
    ]

    # Only rank 0 writes checkpoints, so ranks do not overwrite each other's files.
    if hvd.rank() == 0:
        callbacks.append(tf.keras.callbacks.ModelCheckpoint("./checkpoint-{epoch}.h5"))

    verbose = 1 if hvd.rank() == 0 else 0

    # Fewer steps per worker as workers are added: the epoch covers the same data in total.
    mnist_model.fit(
        dataset,
        steps_per_epoch=steps_per_epoch // hvd.size(),
        callbacks=callbacks,
        epochs=epochs,
        verbose=verbose,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Keras MNIST with ringtrain.horovod")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--steps-per-epoch", type=int, default=500)
    cli = parser.parse_args()
    main(cli.epochs, cli.steps_per_epoch)
