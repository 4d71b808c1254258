"""Learning-rate schedule and warm-up callbacks, and a best-model checkpoint, with Horovod's semantics.

The classes are built on first use (see ``ringtrain.keras.__getattr__``); this module
holds their behaviour as mixins so it imports neither Keras nor TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ringtrain import context
from ringtrain.errors import ConfigError

logger = logging.getLogger(__name__)


def _learning_rate_holder(optimizer: Any) -> Any:
    value = optimizer.learning_rate
    if callable(value) and not hasattr(value, "assign"):
        raise ConfigError(
            "the optimizer's learning rate is a LearningRateSchedule; LearningRateScheduleCallback and "
            "LearningRateWarmupCallback set a plain learning rate, so give the optimizer a number"
        )
    return value


def get_learning_rate(optimizer: Any) -> float:
    return float(np.asarray(_learning_rate_holder(optimizer)))


def set_learning_rate(optimizer: Any, value: float) -> None:
    holder = _learning_rate_holder(optimizer)
    if hasattr(holder, "assign"):
        holder.assign(value)
    else:
        optimizer.learning_rate = value


class LearningRateScheduleMixin:
    """Sets the learning rate to ``initial_lr * multiplier(epoch)`` from ``start_epoch`` to ``end_epoch``.

    ``multiplier`` is a number (exponential decay: ``multiplier ** (epoch - start_epoch)``)
    or a function of the epoch. With ``staircase=True`` the rate changes at the first
    batch of each epoch and the function sees whole epochs; with ``staircase=False`` it
    changes before every batch and sees ``epoch + batch / steps_per_epoch``
    (``steps_per_epoch`` is read from ``fit``'s parameters when not given).
    ``momentum_correction`` scales a momentum held in a variable by new_lr/old_lr for
    the batch in which the rate changes; Keras' own optimizers keep momentum as a plain
    number fixed when the train step is traced, so there it is left alone (logged once).
    The current rate is logged as ``lr`` at each epoch's end.
    """

    def __init__(
        self,
        initial_lr: float,
        multiplier: float | Callable[[float], float],
        start_epoch: int = 0,
        end_epoch: int | None = None,
        staircase: bool = True,
        momentum_correction: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if initial_lr is None:
            raise ConfigError("initial_lr is required: pass the learning rate the schedule starts from")
        self.initial_lr = float(initial_lr)
        if callable(multiplier):
            self.multiplier = multiplier
        else:
            factor = float(multiplier)
            self.multiplier = lambda epoch: factor ** (epoch - start_epoch)
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.staircase = staircase
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = 0
        self._restore_momentum: float | None = None
        self._warned_momentum = False

    def _steps_from_params(self) -> int:
        params = getattr(self, "params", None) or {}
        if params.get("steps"):
            return int(params["steps"])
        if params.get("samples") and params.get("batch_size"):
            return int(params["samples"]) // int(params["batch_size"])
        raise ConfigError(
            f"{type(self).__name__} could not find the number of steps per epoch in fit()'s parameters; "
            "pass steps_per_epoch=..."
        )

    def on_train_begin(self, logs: Any = None) -> None:
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self._steps_from_params()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.current_epoch = epoch

    def on_batch_begin(self, batch: int, logs: Any = None) -> None:
        epoch = self.current_epoch
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            return
        if self.staircase:
            if batch == 0:
                self._adjust(epoch)
        else:
            self._adjust(epoch + float(batch) / self.steps_per_epoch)

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        if self._restore_momentum is not None:
            self.model.optimizer.momentum.assign(self._restore_momentum)
            self._restore_momentum = None

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is not None:
            logs["lr"] = get_learning_rate(self.model.optimizer)

    def _adjust(self, epoch: float) -> None:
        optimizer = self.model.optimizer
        old_lr = get_learning_rate(optimizer)
        new_lr = self.initial_lr * self.multiplier(epoch)
        set_learning_rate(optimizer, new_lr)
        momentum = getattr(optimizer, "momentum", None)
        if not self.momentum_correction or momentum is None or old_lr == 0:
            return
        if hasattr(momentum, "assign"):
            self._restore_momentum = float(np.asarray(momentum))
            momentum.assign(self._restore_momentum * new_lr / old_lr)
        elif not self._warned_momentum and float(momentum) != 0.0:
            self._warned_momentum = True
            logger.warning(
                "%s: momentum correction skipped: the optimizer's momentum is a plain number, fixed "
                "when the train step was traced",
                type(self).__name__,
            )


class LearningRateWarmupMixin(LearningRateScheduleMixin):
    """Warms the learning rate up from ``initial_lr / size`` to ``initial_lr`` over ``warmup_epochs``.

    ``lr(epoch) = initial_lr / size * (epoch * (size - 1) / warmup_epochs + 1)``, updated
    before every batch (Goyal et al., "Accurate, Large Minibatch SGD"). With
    ``verbose=1`` rank 0 prints when the warm-up ends.
    """

    def __init__(
        self,
        initial_lr: float,
        warmup_epochs: int = 5,
        momentum_correction: bool = True,
        steps_per_epoch: int | None = None,
        verbose: int = 0,
    ) -> None:
        def multiplier(epoch: float) -> float:
            size = context.size()
            epoch += 1.0 / self.steps_per_epoch  # whole numbers at each epoch's end
            return 1.0 / size * (epoch * (size - 1) / warmup_epochs + 1)

        super().__init__(
            initial_lr,
            multiplier,
            start_epoch=0,
            end_epoch=warmup_epochs,
            staircase=False,
            momentum_correction=momentum_correction,
            steps_per_epoch=steps_per_epoch,
        )
        self.verbose = verbose

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and context.rank() == 0:
            lr = get_learning_rate(self.model.optimizer)
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {lr:g}.", flush=True)


_checkpoint_classes: dict[type, type] = {}


def best_model_checkpoint_class(model_checkpoint: type) -> type:
    """``BestModelCheckpoint`` built on ``model_checkpoint`` (Keras 3's or tf-keras' ModelCheckpoint)."""
    if model_checkpoint in _checkpoint_classes:
        return _checkpoint_classes[model_checkpoint]

    class BestModelCheckpoint(model_checkpoint):
        """ModelCheckpoint that keeps only the best model (``save_best_only=True``), written by rank 0.

        Arguments as Horovod's, plus ``filepath``, which Horovod's Spark estimator
        filled in and which is required here. Other ranks never write, so they cannot
        corrupt rank 0's file.
        """

        def __init__(
            self,
            monitor: str = "val_loss",
            verbose: int = 0,
            save_weights_only: bool = False,
            mode: str = "auto",
            save_freq: Any = "epoch",
            filepath: str | None = None,
        ) -> None:
            if filepath is None:
                raise ConfigError(
                    "BestModelCheckpoint needs filepath=... (where to save the best model); "
                    "Horovod's Spark estimator set it for you, ringtrain has no estimator"
                )
            super().__init__(
                filepath=filepath,
                monitor=monitor,
                verbose=verbose,
                save_best_only=True,
                save_weights_only=save_weights_only,
                mode=mode,
                save_freq=save_freq,
            )

        def _save_model(self, *args: Any, **kwargs: Any) -> Any:
            if context.rank() != 0:
                return None
            return super()._save_model(*args, **kwargs)

    _checkpoint_classes[model_checkpoint] = BestModelCheckpoint
    return BestModelCheckpoint
