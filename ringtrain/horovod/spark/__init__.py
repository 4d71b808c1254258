"""``ringtrain.horovod.spark.run``: Horovod's ``horovod.spark.run`` on ringtrain's Spark launcher.

Example::

    import ringtrain.horovod.spark

    def train(lr):
        import ringtrain.horovod.tensorflow as hvd
        hvd.init()
        ...
        return hvd.rank()

    ranks = ringtrain.horovod.spark.run(train, args=(0.1,), num_proc=2)   # [0, 1]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ringtrain
from ringtrain.errors import ConfigError

__all__ = ["run"]

logger = logging.getLogger(__name__)


class _Call:
    """Calls ``fn(*args, **kwargs)`` after adding ``env`` to the worker's environment.

    fn's keyword arguments travel inside this object rather than through ringtrain.run's
    own ``**kwargs``, so a name ringtrain.run also takes (``timeout``, ``num_proc``, ...)
    reaches ``fn`` and never changes the job. A class, not a closure, so it pickles.
    """

    def __init__(self, fn: Callable[..., Any], kwargs: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.fn = fn
        self.kwargs = dict(kwargs)
        self.env = dict(env)

    def __call__(self, *args: Any) -> Any:
        os.environ.update(self.env)
        return self.fn(*args, **self.kwargs)


def run(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    num_proc: int | None = None,
    start_timeout: float | None = None,
    extra_mpi_args: str | None = None,
    env: Mapping[str, str] | None = None,
    stdout: Any = None,
    stderr: Any = None,
    verbose: int = 1,
    nics: Any = None,
    prefix_output_with_timestamp: bool = False,
    executable: Any = None,
    use_mpi: bool | None = None,
    use_gloo: bool | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``num_proc`` Spark tasks; returns every rank's result in rank order.

    The job runs on the active Spark session (or ringtrain's embedded local one) with
    ringtrain's MPI backend, so ``ringtrain.horovod`` collectives work inside ``fn``.
    Every name in ``kwargs`` goes to ``fn``, also one ``ringtrain.run`` takes itself
    (``timeout``, ``num_proc``...).
    ``env`` is added to each worker's environment before ``fn`` starts (variables read
    at interpreter start-up are not affected). ``start_timeout`` maps to
    ``RINGTRAIN_START_TIMEOUT``. ``stdout``/``stderr``, ``verbose``, ``nics``,
    ``prefix_output_with_timestamp``, ``executable`` (workers use ``PYSPARK_PYTHON``) and
    ``use_mpi``/``use_gloo`` (ringtrain always uses MPI) are accepted and ignored: worker
    output reaches the driver's stdout/stderr prefixed with the rank. ``extra_mpi_args``
    cannot be honoured and raises ConfigError.
    """
    if extra_mpi_args:
        raise ConfigError(
            f"extra_mpi_args={extra_mpi_args!r} is not supported: ringtrain forms the MPI world itself; "
            "set MPI options through env=... instead"
        )
    if not callable(fn):
        raise ConfigError(f"fn must be callable, got {type(fn).__name__}")
    if kwargs is not None and not (
        isinstance(kwargs, Mapping) and all(isinstance(key, str) for key in kwargs)
    ):
        raise ConfigError(f"kwargs must be a mapping of keyword names to values, got {kwargs!r}")
    ignored = {
        "stdout": stdout,
        "stderr": stderr,
        "nics": nics,
        "executable": executable,
        "use_gloo": use_gloo,
    }
    for name, value in ignored.items():
        if value is not None:
            logger.info("horovod.spark.run: %s=%r has no effect with ringtrain; ignoring", name, value)
    target = _Call(fn, kwargs or {}, env or {})
    previous = os.environ.get("RINGTRAIN_START_TIMEOUT")
    if start_timeout is not None:
        os.environ["RINGTRAIN_START_TIMEOUT"] = str(start_timeout)
    try:
        return ringtrain.run(target, *args, num_proc=num_proc, backend="mpi", return_all=True)
    finally:
        if start_timeout is not None:
            if previous is None:
                os.environ.pop("RINGTRAIN_START_TIMEOUT", None)
            else:
                os.environ["RINGTRAIN_START_TIMEOUT"] = previous
