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


# Whose return values travel to the driver (see RINGTRAIN_RESULTS).
RESULTS = ("all", "0", "none")


@dataclass(frozen=True)
class JobConfig:
    """Everything the launcher needs to run one job.

    ``num_proc`` counts worker processes; ``None`` means every GPU, or every slot
    on CPU. ``remote`` is a Spark Connect URL (``sc://...``, or ``local[N]``) to use
    instead of a master. ``worker_env`` is added to each worker's environment. ``timeout``
    bounds the job's wall-clock seconds over all its attempts; past it every worker is
    stopped. A failed job is started again up to ``max_restarts`` times, with the same
    ``job_dir``. ``results`` says whose return values travel to the driver.
    ``worker_settings`` are the forwarded RINGTRAIN_* values every worker gets.
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
    max_restarts: int = 0
    job_dir: str | None = None
    results: str = "all"
    start_timeout: float = 30.0
    kill_grace: float = 15.0
    abort_wait: float = 10.0
    stall_warning: float = 60.0
    stall_timeout: float = 600.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 30.0
    channel_ports: tuple[int, int] | None = None
    driver_host: str = ""
    prewarm: bool = False
    legacy_keras: bool = True
    show_tf_noise: bool = False
    worker_settings: Mapping[str, str] = field(default_factory=dict)

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
        if self.timeout is not None:
            object.__setattr__(self, "timeout", env.seconds(self.timeout, "timeout"))
        for name in (
            "start_timeout",
            "kill_grace",
            "abort_wait",
            "stall_warning",
            "heartbeat_interval",
            "heartbeat_timeout",
        ):
            object.__setattr__(self, name, env.seconds(getattr(self, name), name))
        object.__setattr__(self, "stall_timeout", env.seconds(self.stall_timeout, "stall_timeout", True))
        if (
            isinstance(self.max_restarts, bool)
            or not isinstance(self.max_restarts, int)
            or self.max_restarts < 0
        ):
            raise ConfigError(
                f"max_restarts must be a whole number >= 0, got {self.max_restarts!r}; it counts how "
                "many times a failed job is started again"
            )
        if self.job_dir is not None and (not isinstance(self.job_dir, str) or not self.job_dir.strip()):
            raise ConfigError(f"job_dir must be a non-empty path, got {self.job_dir!r}")
        if self.results not in RESULTS:
            raise ConfigError(f"results must be one of {', '.join(RESULTS)}, got {self.results!r}")
        if self.threads_per_worker < 0:
            raise ConfigError(f"threads_per_worker must be >= 0, got {self.threads_per_worker}")
        object.__setattr__(self, "spark_conf", MappingProxyType(dict(self.spark_conf)))
        object.__setattr__(self, "worker_env", MappingProxyType(dict(self.worker_env)))
        object.__setattr__(self, "worker_settings", MappingProxyType(dict(self.worker_settings)))

    def __getstate__(self) -> dict:
        # Plain pickle (the keeper's socketpair) cannot pickle mapping proxies; send dicts.
        return {k: dict(v) if isinstance(v, MappingProxyType) else v for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, MappingProxyType(value) if isinstance(value, dict) else value)

    @classmethod
    def from_env(cls, **overrides) -> JobConfig:
        """A config whose tuning knobs come from RINGTRAIN_* variables, then ``overrides``.

        Every variable the workers use is checked here, on the driver, so a bad value
        fails before anything starts.
        """
        job_dir = str(env.get("RINGTRAIN_JOB_DIR")).strip()
        base = dict(
            threads_per_worker=env.get("RINGTRAIN_TF_THREADS"),
            start_timeout=env.get("RINGTRAIN_START_TIMEOUT"),
            kill_grace=env.get("RINGTRAIN_KILL_GRACE"),
            abort_wait=env.get("RINGTRAIN_ABORT_WAIT"),
            stall_warning=env.get("RINGTRAIN_STALL_WARNING"),
            stall_timeout=env.get("RINGTRAIN_STALL_TIMEOUT"),
            heartbeat_interval=env.get("RINGTRAIN_HEARTBEAT_INTERVAL"),
            heartbeat_timeout=env.get("RINGTRAIN_HEARTBEAT_TIMEOUT"),
            channel_ports=env.get("RINGTRAIN_CHANNEL_PORTS"),
            driver_host=env.get("RINGTRAIN_DRIVER_HOST"),
            prewarm=env.get("RINGTRAIN_PREWARM"),
            legacy_keras=env.get("RINGTRAIN_LEGACY_KERAS"),
            show_tf_noise=env.get("RINGTRAIN_TF_NOISE"),
            job_dir=job_dir or None,
        )
        base.update({k: v for k, v in overrides.items() if not (k == "job_dir" and v is None)})
        base["worker_settings"] = env.worker_settings(base.get("worker_env"))
        return cls(**base)
