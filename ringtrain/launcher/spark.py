"""Spark side of the driver: the session, the pre-flight slot check, the barrier job."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import JobConfig
from ..errors import ConfigError, ResourceError
from ..rendezvous import workers_per_task

logger = logging.getLogger(__name__)


# A session on one machine: loopback keeps it off the network (and Spark's warning about
# the hostname), and no UI or progress bar writes over the workers' output.
LOOPBACK_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
}


def loopback_session(master: str, app_name: str = "ringtrain", conf: Mapping[str, str] | None = None):
    """A quiet SparkSession for ``local[...]`` or ``local-cluster[...]`` masters; ``conf`` wins."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName(app_name)
    quiet_logs = f"-Dlog4j2.configurationFile={Path(__file__).with_name('log4j2.properties').as_uri()}"
    defaults = {**LOOPBACK_CONF, "spark.driver.extraJavaOptions": quiet_logs}
    for key, value in {**defaults, **(conf or {})}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def get_session(config: JobConfig):
    """The active SparkSession, or an embedded local one with enough slots."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None and config.master is None and not config.spark_conf:
        return active
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


SETTLE_SECONDS = 5.0


@dataclass(frozen=True)
class Layout:
    """How the job maps onto barrier tasks."""

    num_tasks: int
    workers_per_task: int
    uses_gpus: bool = False

    @property
    def num_proc(self) -> int:
        return self.num_tasks * self.workers_per_task


def gpus_per_task(conf_value: str | None) -> int:
    """GPUs Spark gives each task, from ``spark.task.resource.gpu.amount``; 0 on CPU."""
    if conf_value in (None, "", "0"):
        return 0
    amount = float(conf_value)
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


def concurrent_task_slots(sc) -> int:
    """How many tasks of the default resource profile can run at once (Spark's own count)."""
    jsc = sc._jsc.sc()
    profile = jsc.resourceProfileManager().defaultResourceProfile()
    return int(jsc.maxNumConcurrentTasks(profile))


def preflight(sc, config: JobConfig, sleep: Callable[[float], None] = time.sleep) -> Layout:
    """Check the cluster can run the job, within ``start_timeout`` instead of Spark's ~10 min.

    Executors of a freshly started cluster register over a few seconds, so a short
    count is retried until it is enough, or stable when num_proc is left to default.
    """
    per_task = gpus_per_task(sc.getConf().get("spark.task.resource.gpu.amount"))
    per_worker = layout_for(None, 1, per_task, config.gpus_per_worker).workers_per_task
    # A local[N] master has all its slots at once; a cluster's count may still grow.
    fixed = sc.master.startswith("local[") or sc.master == "local"
    settle = 0.0 if fixed else SETTLE_SECONDS
    deadline = time.monotonic() + config.start_timeout
    last, stable_since = -1, time.monotonic()
    while True:
        slots = concurrent_task_slots(sc)
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


class BarrierJob:
    """Runs the barrier stage on a background thread, tagged so it can be cancelled."""

    def __init__(self, sc, num_tasks: int, task_fn: Callable[[Any], list]):
        self._sc = sc
        self._num_tasks = num_tasks
        self._task_fn = task_fn
        self.tag = f"ringtrain-{uuid.uuid4().hex[:12]}"
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=self.tag, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        sc = self._sc
        sc.addJobTag(self.tag)
        sc.setInterruptOnCancel(True)
        try:
            rdd = sc.parallelize(range(self._num_tasks), self._num_tasks)
            rdd.barrier().mapPartitions(self._task_fn).collect()
        except BaseException as err:  # reported by the driver loop
            self.error = err
        finally:
            sc.removeJobTag(self.tag)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        try:
            self._sc.cancelJobsWithTag(self.tag)
        except Exception as err:  # the context may already be stopped
            logger.debug("cancelling %s failed: %s", self.tag, err)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def check_master_reachable(master: str, timeout: float = 3.0) -> None:
    """Fail fast, naming the URL, when a cluster master cannot be reached.

    Spark retries an unreachable standalone master for over a minute, and a
    Kubernetes API server for longer, before it gives up; a TCP connect tells in
    ``timeout`` seconds. ``local``, ``local[N]`` and ``local-cluster[...]`` need no
    network; ``yarn`` needs HADOOP_CONF_DIR or YARN_CONF_DIR. Other schemes are
    left to Spark.
    """
    import re
    import socket
    from urllib.parse import urlsplit

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
