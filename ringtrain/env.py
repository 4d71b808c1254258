"""Every RINGTRAIN_* environment variable, with its default and meaning.

This table is the one place such a variable is named. Read values through
:func:`get`, which parses them and turns a bad value into a ConfigError.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Var:
    """One variable. ``forward``: the driver's value is passed to every worker, so all ranks agree."""

    name: str
    default: str
    parse: Callable[[str], object]
    doc: str
    forward: bool = False


def seconds(value: object, what: str, allow_zero: bool = False) -> float:
    """``value`` as a finite number of seconds, > 0 (or >= 0); ConfigError naming ``what`` if not."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{what} must be a finite number of seconds {bound}, got {value!r}")
    return number


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a finite number > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number >= 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower() or allowed[0]
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def port_range(text: str) -> tuple[int, int] | None:
    """``"40000-40100"`` (or one port) to an inclusive range; empty means any free port."""
    text = text.strip()
    if not text:
        return None
    low, _, high = text.partition("-")
    first, last = int(low), int(high or low)
    if not 1 <= first <= last <= 65535:
        raise ValueError("must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535")
    return first, last


def _host(text: str) -> str:
    """A host name or address, or "none"; no port, no spaces."""
    text = text.strip()
    if any(c.isspace() for c in text) or "/" in text:
        raise ValueError("must be a host name or IP address (or none)")
    return text


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
            "15",
            _positive_float,
            "Seconds a stopped worker has between SIGTERM and SIGKILL: time to write a checkpoint, "
            "run atexit handlers and flush. Workers that exit sooner end the wait sooner.",
            forward=True,
        ),
        Var(
            "RINGTRAIN_ABORT_WAIT",
            "10",
            _positive_float,
            "Seconds, on top of RINGTRAIN_KILL_GRACE, the driver waits for task agents to confirm "
            "their workers stopped.",
        ),
        Var(
            "RINGTRAIN_STALL_WARNING",
            "60",
            _positive_float,
            "Seconds some ranks may wait in a collective that others have not entered before the "
            "driver prints a stall warning naming both.",
        ),
        Var(
            "RINGTRAIN_STALL_TIMEOUT",
            "600",
            _non_negative_float,
            "Seconds of such a stall after which the job fails with StallError; 0 never fails it.",
        ),
        Var(
            "RINGTRAIN_STALL_INSPECTOR",
            "1",
            _flag,
            "1 makes every worker record its collectives and sample its main thread for the stall "
            "inspector; 0 turns that off (and stall detection with it). Liveness heartbeats stay on.",
            forward=True,
        ),
        Var(
            "RINGTRAIN_HEARTBEAT_INTERVAL",
            "1",
            _positive_float,
            "Seconds between heartbeats, both ways between driver and task agents, and between "
            "progress samples in each worker.",
            forward=True,
        ),
        Var(
            "RINGTRAIN_HEARTBEAT_TIMEOUT",
            "30",
            _positive_float,
            "Seconds of silence after which the driver declares a task agent lost, and an agent "
            "declares the driver gone and stops its workers.",
        ),
        Var(
            "RINGTRAIN_CHANNEL_PORTS",
            "",
            port_range,
            "Port range of the driver's control channel, LOW-HIGH; empty takes any free port.",
        ),
        Var(
            "RINGTRAIN_DRIVER_HOST",
            "",
            _host,
            "The address task agents dial to reach this process's control channel (live output, "
            "the fast rendezvous); empty: spark.driver.host, or on Spark Connect this machine's "
            "address on its route to the server. 'none': the executors cannot reach this process, "
            "so agents do not try, and results come back with the stage's output rows.",
        ),
        Var(
            "RINGTRAIN_PREWARM",
            "0",
            _flag,
            "1 leaves, in each Spark Python worker that ran a ringtrain task, one spare task agent "
            "for the next job, its worker processes already started (fresh interpreters, no user "
            "code) with the slow modules the last job's workers used (tensorflow) imported; it "
            "dies with that Python worker or the executor. Each waiting worker that imported "
            "tensorflow holds about 700 MB of memory on the executor's host, counted against "
            "container limits (YARN, Kubernetes). 0 keeps nothing between jobs.",
        ),
        Var(
            "RINGTRAIN_TF_THREADS",
            "0",
            _non_negative_int,
            "Intra- and inter-op TF threads per worker (also OMP_NUM_THREADS). 0 keeps TF's own "
            "intra- and inter-op choice, and sets OMP_NUM_THREADS (unless the job's worker env does) to "
            "the task's CPUs (PySpark's OMP_NUM_THREADS, from spark.task.cpus) split among the task's "
            "workers, or the host's cores split among them when the task has no such value.",
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
            forward=True,
        ),
        # The data path (ringtrain.data).
        Var(
            "RINGTRAIN_DATA_SPILL_DIR",
            "",
            str,
            "Where task agents store their rows of the job's DataFrames (read on each executor, or "
            "from the job's worker environment); unset means the first of Spark's local directories "
            "(SPARK_LOCAL_DIRS), else the system temporary directory.",
        ),
        Var(
            "RINGTRAIN_DATA_SHUFFLE_WINDOW",
            "32M",
            byte_size,
            "Shuffled shard reads visit blocks of about 1 MiB in random order and mix the rows of "
            "this many bytes of blocks at a time, so reads stay sequential on disk; 0 shuffles "
            "the whole shard uniformly (scattered reads: fast only while it sits in page cache).",
            forward=True,
        ),
        Var(
            "RINGTRAIN_DATA_MAPPED_LIMIT",
            "64M",
            byte_size,
            "A worker reading its shard hands the file's mapped pages back to the kernel once this "
            "many bytes of them are resident (K/M/G suffixes accepted), bounding its resident "
            "memory; 0 never does.",
            forward=True,
        ),
        # Fused buffers and collectives: read lazily, at the first collective, so a bad
        # value never breaks `import ringtrain`; every rank must see the same values.
        Var(
            "RINGTRAIN_FUSION_THRESHOLD",
            DEFAULT_FUSION_THRESHOLD,
            _fusion_threshold,
            "Fused-buffer bucket size in bytes (K/M/G suffixes accepted); 0 puts every tensor alone. "
            "Tensors of at least 1 MiB skip the bucket and reduce straight into their output.",
            forward=True,
        ),
        Var(
            "RINGTRAIN_FUSION_IMPL",
            "auto",
            _choice("auto", "native", "numpy"),
            "auto uses the native extension when built; numpy forces the twin; "
            "native requires the extension.",
            forward=True,
        ),
        Var(
            "RINGTRAIN_FUSION_THREADS",
            "1",
            _positive_int,
            "Threads the native extension may use to pack or unpack one buffer.",
            forward=True,
        ),
        Var(
            "RINGTRAIN_FUSION_SHM",
            "auto",
            _fusion_shm,
            "auto reduces through one POSIX shared-memory segment per host (MPI only between hosts) "
            "when the native extension is built; off always uses MPI; on is auto that fails "
            "instead of falling back to MPI.",
            forward=True,
        ),
        Var(
            "RINGTRAIN_FUSION_SHM_CHUNK",
            DEFAULT_SHM_CHUNK,
            _shm_chunk,
            "Bytes each rank stages per step of the shared-memory allreduce (K/M suffixes; >= 4K). "
            "auto: 1M, less with more than 16 ranks per host, so the segment stays within 32 MiB "
            "(never below 256K): small enough to stay in the cache, large enough to amortise the barriers.",
            forward=True,
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
        Var(
            "RINGTRAIN_REMOTE",
            "",
            str,
            "`ringtrain launch --remote`: Spark Connect URL (sc://HOST[:PORT]); unset falls back to "
            "SPARK_REMOTE, then to the master.",
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
            "`ringtrain launch --timeout`: job wall-clock limit in seconds, over all attempts; "
            "unset means none.",
        ),
        Var(
            "RINGTRAIN_MAX_RESTARTS",
            "",
            str,
            "`ringtrain launch --max-restarts`: times a failed job is started again; unset means 0.",
        ),
        Var(
            "RINGTRAIN_JOB_DIR",
            "",
            str,
            "The job directory (`run(job_dir=)`, `ringtrain launch --job-dir`): rank logs and "
            "checkpoints, kept across restarts; use shared storage on a cluster. Unset: a new "
            "local directory per job. Inside a worker it holds the job's directory.",
        ),
    )
}


# Set by the driver or the task agent for the workers; not meant to be set by users.
INTERNAL = {
    "RINGTRAIN_WORKDIR": "the worker's private directory (payload, result, error files)",
    "RINGTRAIN_PARENT_PID": "the agent's pid, checked when the worker asks to die with its parent",
    "RINGTRAIN_LOCAL_ENVS": "mpi backend: each local rank's placement, keyed by PMI rank",
    "RINGTRAIN_RESTART_COUNT": "which attempt this is: 0 first, then 1, 2, ... (ringtrain.restart_count())",
    "RINGTRAIN_RESULTS": "whose return values travel to the driver: all, none, or a comma list of ranks",
    "RINGTRAIN_DATA_DIR": "the task's data directory (layout.json, one Arrow IPC file per dataset)",
    "RINGTRAIN_SHM_HOST_KEY": "tests: replaces this rank's host identity for the shared-memory allreduce, "
    "so one machine can pose as several hosts",
    "RINGTRAIN_REQUIRE_NATIVE": "tests (scripts/test.sh sets 1): a native extension that failed to build "
    "fails the suite instead of leaving only the numpy twin tested",
    "RINGTRAIN_TEST_SESSION": "tests: a per-session marker every started process inherits, so leak checks "
    "find this session's processes only",
    "RINGTRAIN_FAKE_GPU_COUNTER": "tests: the file tests/helpers/fake_gpus.sh counts in, handing each "
    "executor the next two fake GPU addresses",
    "RINGTRAIN_PREIMPORT": "modules a worker started ahead of its placement imports first (comma list)",
}


def get(name: str, environ: Mapping[str, str] | None = None):
    """Return the parsed value of ``name``, from the environment or its default.

    A variable set to an empty (or blank) value counts as unset.
    """
    var = VARS[name]
    raw = (os.environ if environ is None else environ).get(name, "")
    if not raw.strip():
        raw = var.default
    try:
        return var.parse(raw)
    except ValueError as err:
        raise ConfigError(
            f"{name}={raw!r} is not valid ({err}). {var.doc} Default: {var.default!r}."
        ) from None


def worker_settings(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The forwarded variables' values for every worker, each checked here on the driver.

    The driver's environment (or its default) supplies each one, and ``overrides`` (the
    job's own worker environment) wins; a bad value is a ConfigError before anything starts.
    """
    merged = {**os.environ, **(overrides or {})}
    settings = {}
    for var in VARS.values():
        if var.forward:
            get(var.name, merged)
            settings[var.name] = merged.get(var.name, var.default)
    return settings
