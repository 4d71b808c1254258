"""A Spark Connect server in its own process, for tests and benchmarks.

pyspark's ``SparkSession.builder.remote("local[N]")`` starts its server inside the calling
process, which then cannot also hold a classic SparkContext. A server started with
spark-submit leaves this process a pure Connect client, so one test session can use both
kinds of session.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
_STARTED = re.compile(r"Spark Connect server started at: \S+:(\d+)")


class LocalConnectServer:
    """``with LocalConnectServer("local[2]") as server: ... server.url ...``; stopped on exit."""

    def __init__(self, master: str = "local[2]", conf: dict[str, str] | None = None, timeout: float = 180.0):
        self.master = master
        self.conf = {
            "spark.connect.grpc.binding.address": "127.0.0.1",
            "spark.connect.grpc.binding.port": "0",
            "spark.ui.enabled": "false",
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            **(conf or {}),
        }
        self.timeout = timeout
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="connect-server-", suffix=".log", delete=False)

    def __enter__(self) -> LocalConnectServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        import pyspark

        spark_home = os.path.dirname(pyspark.__file__)
        argv = [
            os.path.join(spark_home, "bin", "spark-submit"),
            "--class",
            SERVER_CLASS,
            "--master",
            self.master,
        ]
        for key, value in self.conf.items():
            argv += ["--conf", f"{key}={value}"]
        env = dict(
            os.environ, SPARK_HOME=spark_home, PYSPARK_PYTHON=os.environ.get("PYSPARK_PYTHON", sys.executable)
        )
        # Its own session, so stop() reaches the JVM spark-submit's script execs.
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            found = _STARTED.search(Path(self._log.name).read_text(errors="replace"))
            if found:
                self.url = f"sc://127.0.0.1:{found.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        log_tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"the Spark Connect server did not start within {self.timeout:g} s:\n{log_tail}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` s."""
        proc, self.proc = self.proc, None
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # whatever the JVM left in its group (Python workers)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        try:
            os.unlink(self._log.name)
        except FileNotFoundError:
            pass
