"""Every RINGTRAIN_* environment variable, with its default and meaning.

This table is the one place such a variable is named. Read values through
:func:`get`, which parses them and turns a bad value into a ConfigError.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Var:
    name: str
    default: str
    parse: Callable[[str], object]
    doc: str


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _byte_count(text: str) -> int:
    """Whole bytes, optionally with a binary K, M or G suffix: ``268435456``, ``256M``."""
    stripped = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = stripped[-1:] if stripped[-1:] in _BYTE_UNITS else ""
    number = stripped[: len(stripped) - len(unit)]
    if not number.isdigit():
        raise ValueError("must be a whole number of bytes, optionally with a K, M or G suffix")
    return int(number) * _BYTE_UNITS[unit]


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


VARS: dict[str, Var] = {
    v.name: v
    for v in (
        Var(
            "RINGTRAIN_START_TIMEOUT",
            "30",
            _positive_float,
            "Seconds to wait for executors and slots before a job fails with ResourceError.",
        ),
        Var(
            "RINGTRAIN_KILL_GRACE",
            "3",
            _positive_float,
            "Seconds between SIGTERM and SIGKILL when workers are stopped.",
        ),
        Var(
            "RINGTRAIN_ABORT_WAIT",
            "10",
            _positive_float,
            "Seconds the driver waits for task agents to confirm their workers stopped after a failure.",
        ),
        Var(
            "RINGTRAIN_TF_THREADS",
            "0",
            _non_negative_int,
            "Intra- and inter-op TF threads per worker (also OMP_NUM_THREADS); 0 keeps TF's default.",
        ),
        Var(
            "RINGTRAIN_LEGACY_KERAS",
            "1",
            _flag,
            "1 sets TF_USE_LEGACY_KERAS=1 in workers, so tf.keras is tf-keras and Model.fit works "
            "under MultiWorkerMirroredStrategy. `import keras` stays Keras 3 either way.",
        ),
        Var(
            "RINGTRAIN_TF_NOISE",
            "0",
            _flag,
            "1 forwards TensorFlow's C++ start-up log lines; by default they are filtered out.",
        ),
        Var(
            "RINGTRAIN_LOCAL_SLOTS",
            "0",
            _non_negative_int,
            "Slots of the embedded local Spark started when no session is active; 0 means "
            "max(num_proc, CPU count).",
        ),
        Var(
            "RINGTRAIN_MALLOC_REUSE",
            "1",
            _flag,
            "1 makes workers keep freed blocks up to 32 MiB in the heap (glibc mallopt), so each "
            "step's gradient arrays reuse memory instead of page-faulting fresh mappings.",
        ),
        # The data path (ringtrain.data).
        Var(
            "RINGTRAIN_DATA_SPILL_DIR",
            "",
            str,
            "Where task agents store their rows of the job's DataFrames; unset means the first of "
            "Spark's local directories (SPARK_LOCAL_DIRS), else the system temporary directory.",
        ),
        Var(
            "RINGTRAIN_DATA_SHUFFLE_WINDOW",
            "32M",
            _byte_count,
            "Shuffled shard reads visit blocks of about 1 MiB in random order and mix the rows of "
            "this many bytes of blocks at a time, so reads stay sequential on disk; 0 shuffles "
            "the whole shard uniformly (scattered reads: fast only while it sits in page cache).",
        ),
        Var(
            "RINGTRAIN_DATA_MAPPED_LIMIT",
            "64M",
            _byte_count,
            "A worker reading its shard hands the file's mapped pages back to the kernel once this "
            "many bytes of them are resident (K/M/G suffixes accepted), bounding its resident "
            "memory; 0 never does.",
        ),
        # Fused buffers: parsed by ringtrain.fusion, which reads them at import.
        Var(
            "RINGTRAIN_FUSION_THRESHOLD",
            "128M",
            str,
            "Fused-buffer bucket size in bytes (K/M/G suffixes accepted); 0 puts every tensor alone.",
        ),
        Var(
            "RINGTRAIN_FUSION_IMPL",
            "auto",
            str,
            "auto uses the native extension when built; numpy forces the twin; "
            "native requires the extension.",
        ),
        Var(
            "RINGTRAIN_FUSION_THREADS",
            "1",
            str,
            "Threads the native extension may use to pack or unpack one buffer.",
        ),
        # Read by `ringtrain launch` only, as defaults for its flags; a flag beats its variable.
        Var(
            "RINGTRAIN_NP",
            "",
            str,
            "`ringtrain launch -np`: worker processes; unset means every GPU, or every slot on CPU.",
        ),
        Var(
            "RINGTRAIN_BACKEND",
            "",
            str,
            "`ringtrain launch --backend`: the collective backend. "
            "Inside a worker it holds the job's backend.",
        ),
        Var(
            "RINGTRAIN_MASTER",
            "",
            str,
            "`ringtrain launch --master`: Spark master URL; unset starts an embedded local Spark.",
        ),
        Var("RINGTRAIN_GPUS_PER_PROC", "", str, "`ringtrain launch --gpus-per-proc`: GPUs per worker."),
        Var(
            "RINGTRAIN_CONF",
            "",
            str,
            "`ringtrain launch --conf`: Spark settings, key=value separated by commas or newlines.",
        ),
        Var(
            "RINGTRAIN_ENV",
            "",
            str,
            "`ringtrain launch --env`: worker environment, K=V separated by commas or newlines.",
        ),
        Var(
            "RINGTRAIN_TIMEOUT",
            "",
            str,
            "`ringtrain launch --timeout`: job wall-clock limit in seconds; unset means none.",
        ),
    )
}


# Set by the task agent for its workers; not meant to be set by users.
INTERNAL = {
    "RINGTRAIN_WORKDIR": "the worker's private directory (payload, result, error files)",
    "RINGTRAIN_PARENT_PID": "the agent's pid, checked when the worker asks to die with its parent",
    "RINGTRAIN_LOCAL_ENVS": "mpi backend: each local rank's placement, keyed by PMI rank",
    "RINGTRAIN_DATA_DIR": "the task's data directory (layout.json, one Arrow IPC file per dataset)",
}


def get(name: str):
    """Return the parsed value of ``name``, from the environment or its default."""
    var = VARS[name]
    raw = os.environ.get(name, var.default)
    try:
        return var.parse(raw)
    except ValueError as err:
        raise ConfigError(
            f"{name}={raw!r} is not valid ({err}). {var.doc} Default: {var.default!r}."
        ) from None
