"""Spark side of the driver: the session (classic or Spark Connect) and the pre-flight check.

The barrier stage itself lives in :mod:`ringtrain.launcher.stage`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import JobConfig
from ..errors import ConfigError, ResourceError
from ..rendezvous import workers_per_task
from .stage import is_connect

logger = logging.getLogger(__name__)


# A session on one machine: loopback keeps it off the network (and Spark's warning about
# the hostname), and no UI or progress bar writes over the workers' output.
LOOPBACK_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
}

# Settings that only shape a session this process starts; a Spark Connect client cannot
# set them on the server (and has no console progress bar of Spark's to silence).
_CLASSIC_ONLY_CONF = ("spark.ui.showConsoleProgress",)

CONNECT_DEFAULT_PORT = 15002


def loopback_session(master: str, app_name: str = "ringtrain", conf: Mapping[str, str] | None = None):
    """A quiet SparkSession for ``local[...]`` or ``local-cluster[...]`` masters; ``conf`` wins."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in {**_loopback_defaults(), **(conf or {})}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def connect_session(remote: str, conf: Mapping[str, str] | None = None):
    """A Spark Connect session: ``sc://HOST[:PORT][/;params]``, or ``local[N]`` for a Connect
    server that pyspark starts in this process. ``conf`` holds session (SQL) settings."""
    from pyspark.sql import SparkSession

    try:
        import pyspark.sql.connect.session  # noqa: F401  (checks the client's dependencies)
    except ImportError as err:
        raise ConfigError(
            f"Spark Connect needs its client libraries ({err}); install them with "
            "pip install 'ringtrain[connect]'"
        ) from None
    settings = dict(conf or {})
    if remote.startswith("local"):
        # pyspark starts this server as a classic Spark in this process, from these settings:
        # make it as quiet as an embedded session, and run its workers with this Python.
        settings = {**_loopback_defaults(), **settings}
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    else:
        settings = {k: v for k, v in settings.items() if k not in _CLASSIC_ONLY_CONF}
    builder = SparkSession.builder.remote(remote)
    for key, value in settings.items():
        builder = builder.config(key, value)
    with warnings.catch_warnings():
        # The client then tries the server's start-up settings on its own session, and
        # warns that they cannot change; they already applied when the server started.
        warnings.filterwarnings("ignore", "Failed to set spark", UserWarning)
        return builder.getOrCreate()


def _loopback_defaults() -> dict[str, str]:
    quiet_logs = f"-Dlog4j2.configurationFile={Path(__file__).with_name('log4j2.properties').as_uri()}"
    return {**LOOPBACK_CONF, "spark.driver.extraJavaOptions": quiet_logs}


def active_session():
    """The session ``ringtrain.run`` should use, or None: pyspark's active (or default)
    session, which is a Connect one once this process is in Connect mode; failing that, a
    Connect session made without pyspark's generic builder."""
    from pyspark.sql import SparkSession

    try:
        return SparkSession.active()
    except Exception:  # PySparkRuntimeError: no active or default session of that kind
        pass
    connect = sys.modules.get("pyspark.sql.connect.session")
    if connect is None:
        return None
    try:
        return connect.SparkSession.active()
    except Exception:
        return None


def get_session(config: JobConfig):
    """The active SparkSession (classic or Connect), a Connect session for ``config.remote``
    (or SPARK_REMOTE), or an embedded local session with enough slots."""
    from pyspark.sql import SparkSession

    if config.master is None and config.remote is None and not config.spark_conf:
        active = active_session()
        if active is not None:
            return active
    remote = config.remote or (None if config.master else os.environ.get("SPARK_REMOTE"))
    if remote:
        return connect_session(remote, config.spark_conf)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    master = config.master or f"local[{_local_slots(config)}]"
    if master.startswith("local"):
        return loopback_session(master, conf=config.spark_conf)
    builder = SparkSession.builder.master(master).appName("ringtrain")
    for key, value in config.spark_conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _local_slots(config: JobConfig) -> int:
    from .. import env

    return env.get("RINGTRAIN_LOCAL_SLOTS") or max(config.num_proc or 0, os.cpu_count() or 1)


def driver_host(session) -> str:
    """The address the task agents dial to reach this process (the control channel).

    On a classic session this process is the Spark driver: ``spark.driver.host``. A Spark
    Connect client may run elsewhere: it is reached at its own address on the route to
    the Connect server, unless that route is loopback, which puts the client on the
    driver's host.
    """
    fallback = session.conf.get("spark.driver.host", None) or "127.0.0.1"
    if not is_connect(session):
        return fallback
    own = local_address_towards(session.client.host)
    if own is None or _is_loopback(own):
        return fallback
    return own


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def local_address_towards(host: str, port: int = CONNECT_DEFAULT_PORT) -> str | None:
    """This machine's address on its route to ``host`` (no packet is sent), or None."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return probe.getsockname()[0]
    except OSError as err:
        logger.debug("no route to %s: %s", host, err)
        return None


SETTLE_SECONDS = 5.0


@dataclass(frozen=True)
class Layout:
    """How the job maps onto barrier tasks.

    ``profile`` is the stage's own ResourceProfile when executors have GPUs but the
    session gives tasks none (stage-level scheduling); None when the session's task
    resources apply. ``slots_known`` is False when pre-flight could not count the
    cluster's slots (a Spark Connect session on a cluster whose configuration does not
    tell): the stage must then start within ``start_timeout``.
    """

    num_tasks: int
    workers_per_task: int
    uses_gpus: bool = False
    profile: Any = field(default=None, compare=False, repr=False)
    slots_known: bool = True

    @property
    def num_proc(self) -> int:
        return self.num_tasks * self.workers_per_task


TASK_GPU_AMOUNT = "spark.task.resource.gpu.amount"
EXECUTOR_GPU_AMOUNT = "spark.executor.resource.gpu.amount"


def gpu_amount(key: str, value: str) -> float:
    """A GPU amount Spark setting ``key`` holds, as a number; ConfigError naming both if it is none."""
    try:
        amount = float(value)
    except ValueError:
        amount = math.nan
    if not math.isfinite(amount) or amount < 0:
        raise ConfigError(f"{key}={value!r} is not a GPU amount; set it to a whole number of GPUs such as 1")
    return amount


def gpus_per_executor(conf_value: str | None) -> int:
    """GPUs each executor has, from ``spark.executor.resource.gpu.amount``; 0 when unset."""
    if conf_value in (None, ""):
        return 0
    amount = gpu_amount(EXECUTOR_GPU_AMOUNT, conf_value)
    if amount != int(amount):
        raise ConfigError(
            f"{EXECUTOR_GPU_AMOUNT}={conf_value!r} is not a whole number; an executor holds whole GPUs"
        )
    return int(amount)


def gpus_per_task(conf_value: str | None) -> int:
    """GPUs Spark gives each task, from ``spark.task.resource.gpu.amount``; 0 on CPU."""
    if conf_value in (None, "", "0"):
        return 0
    amount = gpu_amount(TASK_GPU_AMOUNT, conf_value)
    if amount == 0:
        return 0
    if amount < 1 or amount != int(amount):
        raise ConfigError(
            f"spark.task.resource.gpu.amount={conf_value} shares a GPU between tasks; ringtrain runs "
            "one worker per whole GPU, so set it to a whole number such as 1"
        )
    return int(amount)


def layout_for(num_proc: int | None, slots: int, per_task: int, gpus_per_worker: int = 1) -> Layout:
    """Pure: choose the task count for ``num_proc`` workers, or fail naming what exists.

    ``per_task`` is the GPUs each task holds (0 on CPU, one worker per task).
    """
    per_worker = workers_per_task(("",) * per_task, gpus_per_worker) if per_task else 1
    if num_proc is None:
        if slots < 1:
            raise ResourceError("the Spark cluster has no free task slots; start executors, then retry")
        return Layout(slots, per_worker, bool(per_task))
    if per_task:
        if num_proc % per_worker:
            raise ConfigError(
                f"num_proc={num_proc} is not a multiple of the {per_worker} worker(s) each task runs "
                f"(spark.task.resource.gpu.amount={per_task}, {gpus_per_worker} GPU(s) per worker)"
            )
        if num_proc > slots * per_worker:
            raise ResourceError(
                f"num_proc={num_proc} asks for {num_proc * gpus_per_worker} GPUs, but the cluster has "
                f"{slots} task slot(s) with {per_task} GPU(s) each ({slots * per_task} GPUs); lower "
                "num_proc or add GPUs"
            )
        return Layout(num_proc // per_worker, per_worker, True)
    if num_proc > slots:
        raise ResourceError(
            f"num_proc={num_proc} needs {num_proc} barrier task slots, but the cluster has {slots}; "
            f"lower num_proc to at most {slots} or add executor cores"
        )
    return Layout(num_proc, 1)


def _int_conf(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


@dataclass(frozen=True)
class ClusterConf:
    """What a session's configuration says about its cluster; readable on both kinds of
    session (a Spark Connect client sees the server's settings through ``session.conf``)."""

    master: str
    task_cpus: int = 1
    task_gpus: str | None = None
    executor_gpus: int = 0
    executor_cores: int | None = None
    executor_instances: int | None = None
    dynamic_allocation: bool = False

    @classmethod
    def read(cls, session) -> ClusterConf:
        def get(key: str) -> str | None:
            return session.conf.get(key, None)

        return cls(
            master=get("spark.master") or "",
            task_cpus=_int_conf(get("spark.task.cpus")) or 1,
            task_gpus=get(TASK_GPU_AMOUNT),
            executor_gpus=gpus_per_executor(get(EXECUTOR_GPU_AMOUNT)),
            executor_cores=_int_conf(get("spark.executor.cores")),
            executor_instances=_int_conf(get("spark.executor.instances")),
            dynamic_allocation=(get("spark.dynamicAllocation.enabled") or "").lower() == "true",
        )

    @property
    def is_local(self) -> bool:
        """``local`` or ``local[...]``: one executor inside the driver, which has no GPUs for tasks."""
        return self.master == "local" or self.master.startswith("local[")


_LOCAL = re.compile(r"local(?:\[\s*(\d+|\*)\s*(?:,\s*\d+\s*)?\])?")
_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]")


def conf_slots(cluster: ClusterConf, task_gpus: int, cpu_count: Callable[[], int]) -> int | None:
    """Pure: the barrier slots the configuration implies, or None when it does not tell.

    ``task_gpus`` is what each task asks for (0 on CPU). ``cpu_count`` gives the driver
    host's cores, for ``local[*]``. Exact for local masters, local-cluster, and YARN or
    Kubernetes with a fixed ``spark.executor.instances``; a standalone cluster's executors
    take whatever cores their workers offer, which no setting says.
    """

    def per_executor(cores: int, gpus: int) -> int:
        tasks = cores // cluster.task_cpus
        return min(tasks, gpus // task_gpus) if task_gpus else tasks

    local = _LOCAL.fullmatch(cluster.master)
    if local:
        threads = local.group(1)
        cores = 1 if threads is None else cpu_count() if threads == "*" else int(threads)
        return per_executor(cores, 0) if not task_gpus else 0
    local_cluster = _LOCAL_CLUSTER.fullmatch(cluster.master)
    if local_cluster:
        executors, cores = int(local_cluster.group(1)), int(local_cluster.group(2))
        return executors * per_executor(cores, cluster.executor_gpus)
    static = cluster.executor_instances is not None and not cluster.dynamic_allocation
    if static and (cluster.master == "yarn" or cluster.master.startswith("k8s://")):
        cores = cluster.executor_cores or 1  # the default on YARN and Kubernetes
        return cluster.executor_instances * per_executor(cores, cluster.executor_gpus)
    return None


def concurrent_task_slots(sc, java_profile=None) -> int:
    """How many tasks of ``java_profile`` (default: the default profile) can run at once,
    by Spark's own count; classic sessions only."""
    jsc = sc._jsc.sc()
    profile = java_profile or jsc.resourceProfileManager().defaultResourceProfile()
    return int(jsc.maxNumConcurrentTasks(profile))


def task_profile(session, cluster: ClusterConf, gpus: int):
    """A ResourceProfile asking ``gpus`` GPUs per task for the training stage alone.

    Spark schedules such task-only profiles on the executors it already has when dynamic
    allocation is off (as barrier mode needs): on standalone, YARN and Kubernetes. A
    ``local[N]`` master has no GPUs for tasks, so it gets a ConfigError naming the
    session-wide setting instead.
    """
    if cluster.is_local:
        raise ConfigError(
            f"executors have GPUs (spark.executor.resource.gpu.amount={cluster.executor_gpus}) but "
            f"spark.task.resource.gpu.amount is unset, and master {cluster.master} cannot give the "
            "training stage its own GPU request (Spark does that on standalone, YARN and Kubernetes "
            "masters); set spark.task.resource.gpu.amount for the session, or unset "
            "spark.executor.resource.gpu.amount to train on CPU"
        )
    from pyspark.resource import (
        ResourceProfile,
        ResourceProfileBuilder,
        TaskResourceRequest,
        TaskResourceRequests,
    )

    try:
        if is_connect(session):
            # Built from plain requests: the server creates it, and checks it is supported.
            requests = {"cpus": TaskResourceRequest("cpus", cluster.task_cpus)}
            requests["gpu"] = TaskResourceRequest("gpu", gpus)
            profile = ResourceProfile(_exec_req={}, _task_req=requests)
            profile.id  # noqa: B018  (creates it on the server now, so errors surface here)
        else:
            wanted = TaskResourceRequests().cpus(cluster.task_cpus).resource("gpu", gpus)
            profile = ResourceProfileBuilder().require(wanted).build
            manager = session.sparkContext._jsc.sc().resourceProfileManager()
            manager.addResourceProfile(profile._java_resource_profile)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(
            f"Spark refused a stage-level GPU request of {gpus} GPU(s) per task on master "
            f"{cluster.master} ({error_line(err)}); set spark.task.resource.gpu.amount for the "
            "whole session instead"
        ) from None
    logger.info("the training stage asks for %d GPU(s) per task through its own resource profile", gpus)
    return profile


def error_line(err: BaseException) -> str:
    """The most telling line of a Spark error: the last Python exception it quotes (one raised
    in a task, say), else its first line; a Py4J wrapper line is never the answer."""
    text = str(err).strip()
    raised = re.findall(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$", text, re.MULTILINE)
    python_side = [f"{name}: {msg}" for name, msg in raised if not name.startswith("Py4J")]
    if python_side:
        return python_side[-1]
    return text.splitlines()[0] if text else type(err).__name__


def _probe_cpu_count(session) -> int:
    """The cores of the host a ``local[*]`` Connect server runs on, from a one-task job."""
    table = session.range(1).mapInArrow(_cpu_count_batches, "cpus int").toArrow()
    return int(table.column("cpus")[0].as_py())


def _cpu_count_batches(batches):
    import pyarrow as pa

    for _ in batches:
        pass
    yield pa.RecordBatch.from_pydict({"cpus": pa.array([len(os.sched_getaffinity(0))], pa.int32())})


def preflight(session, config: JobConfig, sleep: Callable[[float], None] = time.sleep) -> Layout:
    """Check the cluster can run the job, within ``start_timeout`` instead of Spark's ~10 min.

    A classic session counts slots through Spark's scheduler. Executors of a freshly
    started cluster register over a few seconds, so a short count is retried until it
    is enough, or stable when num_proc is left to default. A Spark Connect session has
    no scheduler to ask: the count comes from the configuration (and, for ``local[*]``,
    a one-task probe job); where the configuration does not tell, the stage itself must
    start within ``start_timeout`` (see :func:`await_slots`).
    """
    cluster = ClusterConf.read(session)
    if cluster.dynamic_allocation:
        raise ConfigError(
            "spark.dynamicAllocation.enabled=true: Spark's barrier mode, which ringtrain's training "
            "stage uses, does not run with dynamic allocation; disable it for this session"
        )
    per_task = gpus_per_task(cluster.task_gpus)
    profile = None
    if not per_task and cluster.executor_gpus:
        per_task = config.gpus_per_worker
        profile = task_profile(session, cluster, per_task)
    if is_connect(session):
        layout = _connect_layout(session, config, cluster, per_task)
    else:
        layout = _classic_layout(session.sparkContext, config, cluster, per_task, profile, sleep)
    return Layout(layout.num_tasks, layout.workers_per_task, layout.uses_gpus, profile, layout.slots_known)


def _classic_layout(sc, config: JobConfig, cluster: ClusterConf, per_task: int, profile, sleep) -> Layout:
    per_worker = layout_for(None, 1, per_task, config.gpus_per_worker).workers_per_task
    java_profile = profile._java_resource_profile if profile is not None else None
    # A local[N] master has all its slots at once; a cluster's count may still grow.
    settle = 0.0 if cluster.is_local else SETTLE_SECONDS
    deadline = time.monotonic() + config.start_timeout
    last, stable_since = -1, time.monotonic()
    while True:
        slots = concurrent_task_slots(sc, java_profile)
        now = time.monotonic()
        if slots != last:
            last, stable_since = slots, now
        enough = slots > 0 if config.num_proc is None else slots * per_worker >= config.num_proc
        settled = slots > 0 and now - stable_since >= settle
        # With num_proc left to default, wait for the count to settle; otherwise stop as
        # soon as it is enough, or has stopped growing while short.
        if (enough and (config.num_proc is not None or settled)) or (not enough and settled):
            break
        if now >= deadline:
            break
        sleep(0.25)
    return layout_for(config.num_proc, last, per_task, config.gpus_per_worker)


def _connect_layout(session, config: JobConfig, cluster: ClusterConf, per_task: int) -> Layout:
    slots = conf_slots(cluster, per_task, lambda: _probe_cpu_count(session))
    if slots is not None:
        return layout_for(config.num_proc, slots, per_task, config.gpus_per_worker)
    if config.num_proc is None:
        raise ConfigError(
            f"set num_proc: this Spark Connect session's configuration (master {cluster.master}) does "
            "not tell how many task slots the cluster has, so ringtrain cannot pick every slot"
        )
    # Trust num_proc; the stage has start_timeout to get its slots.
    layout = layout_for(config.num_proc, config.num_proc, per_task, config.gpus_per_worker)
    return Layout(layout.num_tasks, layout.workers_per_task, layout.uses_gpus, slots_known=False)


def await_slots(stage, layout: Layout, config: JobConfig) -> None:
    """Where pre-flight could not count the slots: fail with ResourceError unless the
    stage's tasks start within ``start_timeout`` (a barrier stage gets all or nothing)."""
    if layout.slots_known or stage.wait_started(config.start_timeout) or stage.done():
        return
    stage.cancel()
    stage.join(config.abort_wait)
    needs = f"{layout.num_tasks} barrier task slots"
    if layout.uses_gpus:
        needs += f" with {layout.num_proc * config.gpus_per_worker // layout.num_tasks} GPU(s) each"
    raise ResourceError(
        f"num_proc={layout.num_proc} needs {needs}, and the cluster did not offer them within "
        f"{config.start_timeout:g} s (RINGTRAIN_START_TIMEOUT); lower num_proc, add executors, "
        "or raise the timeout if executors are still starting"
    )


def check_master_reachable(master: str, timeout: float = 3.0) -> None:
    """Fail fast, naming the URL, when a cluster master cannot be reached.

    Spark retries an unreachable standalone master for over a minute, and a
    Kubernetes API server for longer, before it gives up; a TCP connect tells in
    ``timeout`` seconds. ``local``, ``local[N]`` and ``local-cluster[...]`` need no
    network; ``yarn`` needs HADOOP_CONF_DIR or YARN_CONF_DIR. Other schemes are
    left to Spark.
    """
    if re.fullmatch(r"local(\[[^\]]*\])?|local-cluster\[\d+,\s*\d+,\s*\d+\]", master):
        return
    if master.startswith("local"):
        raise ConfigError(
            f"master {master!r} is not a Spark local URL; use local, local[N], local[*] or "
            "local-cluster[WORKERS,CORES,MEMORY_MB]"
        )
    if master == "yarn":
        if not (os.environ.get("HADOOP_CONF_DIR") or os.environ.get("YARN_CONF_DIR")):
            raise ConfigError(
                "master 'yarn' needs HADOOP_CONF_DIR or YARN_CONF_DIR set to the directory holding "
                "yarn-site.xml; export one of them, then retry"
            )
        return
    if master.startswith("spark://"):
        # Standalone HA lists several masters: spark://h1:7077,h2:7077.
        targets = []
        for hostport in master[len("spark://") :].split(","):
            host, _, port = hostport.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"master {master!r} is not spark://HOST:PORT[,HOST:PORT...]")
            targets.append((host.strip("[]"), int(port)))
    elif master.startswith("k8s://"):
        # k8s://HOST:PORT means https; k8s://http://HOST:PORT is spelled out.
        rest = master[len("k8s://") :]
        url = urlsplit(rest if "://" in rest else f"https://{rest}")
        if not url.hostname:
            raise ConfigError(f"master {master!r} is not k8s://[https://]API_SERVER_HOST[:PORT]")
        targets = [(url.hostname, url.port or (80 if url.scheme == "http" else 443))]
    else:
        return
    errors = []
    for host, port in targets:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return
        except OSError as err:
            errors.append(f"{host}:{port}: {err.strerror or err}")
    raise ResourceError(
        f"cannot reach the Spark master {master} ({'; '.join(errors)}); check that the master is "
        "running and the host and port are right, or leave --master unset for an embedded local Spark"
    )


def check_remote_reachable(remote: str, timeout: float = 3.0) -> None:
    """Fail fast, naming the URL, when a Spark Connect server cannot be reached.

    ``local`` and ``local[N]`` start a Connect server in this process and need no network.
    """
    if re.fullmatch(r"local(\[[^\]]*\])?", remote):
        return
    url = urlsplit(remote)
    try:
        host, port = url.hostname, url.port or CONNECT_DEFAULT_PORT
    except ValueError:
        host, port = None, None
    if url.scheme != "sc" or not host:
        raise ConfigError(
            f"remote {remote!r} is not a Spark Connect URL; write sc://HOST[:PORT][/;param=value...] "
            "or local[N]"
        )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as err:
        raise ResourceError(
            f"cannot reach the Spark Connect server {host}:{port} ({err.strerror or err}); check that "
            "the server is running (sbin/start-connect-server.sh) and the host and port are right"
        ) from None
