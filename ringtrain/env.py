"""Every RINGTRAIN_* environment variable, with its default and meaning.

This table is the one place such a variable is named. Read values through
:func:`get`, which parses them and turns a bad value into a ConfigError.
"""

from __future__ import annotations

import os
import re
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


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


_SIZE_RE = re.compile(r"^(\d+)\s*(?:([kmgt])(?:i?b)?|b)?$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
SIZE_HINT = "use a whole number of bytes, optionally with a K, M or G suffix (e.g. 16777216 or 16M)"


def byte_size(text: str) -> int:
    """Parse ``"16M"``-style byte counts (binary units); ValueError on anything else."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise ValueError(f"not a byte count; {SIZE_HINT}")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


# Chosen by measurement (benchmarks/RESULTS.md, "How the settings were chosen"): the
# smallest size that still fuses all small tensors of a ResNet-50 into one bucket, and
# fine enough to cut gradients into several buckets that start during backprop; 1 MiB
# buckets were slower.
DEFAULT_FUSION_THRESHOLD = "16M"
DEFAULT_SHM_CHUNK = "auto"


def _fusion_threshold(text: str) -> int:
    return byte_size(text if text.strip() else DEFAULT_FUSION_THRESHOLD)


def _fusion_impl(text: str) -> str:
    value = text.strip().lower() or "auto"
    if value not in ("auto", "native", "numpy"):
        raise ValueError("use auto, native or numpy")
    return value


def _fusion_threads(text: str) -> int:
    text = text.strip() or "1"
    if not text.isdigit() or int(text) < 1:
        raise ValueError("use a whole number >= 1")
    return int(text)


def _fusion_shm(text: str) -> str:
    value = text.strip().lower() or "auto"
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("0", "off", "false", "no"):
        return "off"
    if value != "auto":
        raise ValueError("use auto, on or off")
    return value


def _shm_chunk(text: str) -> int | str:
    if text.strip().lower() in ("", "auto"):
        return "auto"
    value = byte_size(text)
    if value < 4096:
        raise ValueError("must be at least 4K")
    return value


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
        # Fused buffers and collectives: read lazily, at the first collective, so a bad
        # value never breaks `import ringtrain`; every rank must see the same values.
        Var(
            "RINGTRAIN_FUSION_THRESHOLD",
            DEFAULT_FUSION_THRESHOLD,
            _fusion_threshold,
            "Fused-buffer bucket size in bytes (K/M/G suffixes accepted); 0 puts every tensor alone. "
            "Tensors of at least 1 MiB skip the bucket and reduce straight into their output.",
        ),
        Var(
            "RINGTRAIN_FUSION_IMPL",
            "auto",
            _fusion_impl,
            "auto uses the native extension when built; numpy forces the twin; "
            "native requires the extension.",
        ),
        Var(
            "RINGTRAIN_FUSION_THREADS",
            "1",
            _fusion_threads,
            "Threads the native extension may use to pack or unpack one buffer.",
        ),
        Var(
            "RINGTRAIN_FUSION_SHM",
            "auto",
            _fusion_shm,
            "auto reduces through one POSIX shared-memory segment per host (MPI only between hosts) "
            "when the native extension is built; off always uses MPI; on is auto that fails "
            "instead of falling back to MPI.",
        ),
        Var(
            "RINGTRAIN_FUSION_SHM_CHUNK",
            DEFAULT_SHM_CHUNK,
            _shm_chunk,
            "Bytes each rank stages per step of the shared-memory allreduce (K/M suffixes; >= 4K). "
            "auto: 1M, less with more than 16 ranks per host, so the segment stays within 32 MiB "
            "(never below 256K): small enough to stay in the cache, large enough to amortise the barriers.",
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
    "RINGTRAIN_SHM_HOST_KEY": "tests: replaces this rank's host identity for the shared-memory allreduce, "
    "so one machine can pose as several hosts",
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
