"""Frozen job configuration, built and validated once on the driver."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from . import env
from .errors import ConfigError

# "auto" picks tf (NCCL) where GPUs are assigned and mpi on CPU, falling back to the
# other when the first cannot start; a named backend never falls back.
BACKENDS = ("auto", "tf", "mpi")


@dataclass(frozen=True)
class JobConfig:
    """Everything the launcher needs to run one job.

    ``num_proc`` counts worker processes; ``None`` means every GPU, or every slot
    on CPU. ``remote`` is a Spark Connect URL (``sc://...``, or ``local[N]``) to use
    instead of a master. ``worker_env`` is added to each worker's environment. ``timeout`` bounds
    the job's wall-clock seconds; past it every worker is stopped.
    """

    num_proc: int | None = None
    backend: str = "auto"
    master: str | None = None
    remote: str | None = None
    spark_conf: Mapping[str, str] = field(default_factory=dict)
    worker_env: Mapping[str, str] = field(default_factory=dict)
    threads_per_worker: int = 0
    gpus_per_worker: int = 1
    timeout: float | None = None
    start_timeout: float = 30.0
    kill_grace: float = 3.0
    abort_wait: float = 10.0
    legacy_keras: bool = True
    show_tf_noise: bool = False

    def __post_init__(self):
        if self.num_proc is not None:
            if isinstance(self.num_proc, bool) or not isinstance(self.num_proc, int):
                raise ConfigError(f"num_proc must be an int or None, got {self.num_proc!r}")
            if self.num_proc < 1:
                raise ConfigError(
                    f"num_proc must be >= 1, got {self.num_proc}; pass the number of worker "
                    "processes, or None for every GPU (every slot on CPU)"
                )
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.master and self.remote:
            raise ConfigError(
                f"give a Spark master ({self.master}) or a Spark Connect remote ({self.remote}), "
                "not both: a Connect server already has its master"
            )
        for key, value in {**self.spark_conf, **self.worker_env}.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise ConfigError(
                    f"spark_conf and worker_env take str keys and values, got {key!r}={value!r}"
                )
        if self.gpus_per_worker < 1:
            raise ConfigError(f"gpus_per_worker must be >= 1, got {self.gpus_per_worker}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.threads_per_worker < 0:
            raise ConfigError(f"threads_per_worker must be >= 0, got {self.threads_per_worker}")
        object.__setattr__(self, "spark_conf", MappingProxyType(dict(self.spark_conf)))
        object.__setattr__(self, "worker_env", MappingProxyType(dict(self.worker_env)))

    @classmethod
    def from_env(cls, **overrides) -> JobConfig:
        """A config whose tuning knobs come from RINGTRAIN_* variables, then ``overrides``."""
        base = dict(
            threads_per_worker=env.get("RINGTRAIN_TF_THREADS"),
            start_timeout=env.get("RINGTRAIN_START_TIMEOUT"),
            kill_grace=env.get("RINGTRAIN_KILL_GRACE"),
            abort_wait=env.get("RINGTRAIN_ABORT_WAIT"),
            legacy_keras=env.get("RINGTRAIN_LEGACY_KERAS"),
            show_tf_noise=env.get("RINGTRAIN_TF_NOISE"),
        )
        base.update(overrides)
        return cls(**base)
