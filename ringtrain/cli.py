"""The ``ringtrain`` command line: ``launch`` runs a script on every worker, ``check`` tests the setup.

Exit status of ``ringtrain launch``: 0 when every rank succeeds; the first failing
rank's exit code (128+N when it was killed by signal N); 124 when ``--timeout``
ran out; 130 on Ctrl-C (SIGINT) and 143 on SIGTERM; 2 for a bad command line,
option or RINGTRAIN_* value (ConfigError); 1 for any other error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, env
from .config import BACKENDS, JobConfig
from .errors import ConfigError, JobTimeoutError, RingtrainError, WorkerError

logger = logging.getLogger(__name__)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124  # as timeout(1)

# Each launch flag (by argparse dest) and the variable that supplies its default.
FLAG_VARS = {
    "num_proc": "RINGTRAIN_NP",
    "backend": "RINGTRAIN_BACKEND",
    "master": "RINGTRAIN_MASTER",
    "remote": "RINGTRAIN_REMOTE",
    "gpus_per_proc": "RINGTRAIN_GPUS_PER_PROC",
    "conf": "RINGTRAIN_CONF",
    "env": "RINGTRAIN_ENV",
    "timeout": "RINGTRAIN_TIMEOUT",
    "max_restarts": "RINGTRAIN_MAX_RESTARTS",
    "job_dir": "RINGTRAIN_JOB_DIR",
    "threads": "RINGTRAIN_TF_THREADS",
}

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Split a RINGTRAIN_CONF/RINGTRAIN_ENV list at newlines, and at commas that start a
# new key=, so a value may itself hold commas (e.g. extraJavaOptions).
_LIST_SEPARATOR = re.compile(r"\n|,(?=\s*[A-Za-z_][\w.\-]*=)")

_LAUNCH_EPILOG = """\
examples:
  ringtrain launch -np 2 train.py --epochs 3
      two workers on an embedded local Spark; script arguments follow the script
  ringtrain launch -np 4 --master spark://10.0.0.5:7077 --conf spark.executor.cores=1 train.py
      four workers on a standalone cluster (train.py must exist at the same path on every host)
  ringtrain launch --master local-cluster[2,2,1024] --env DATA=/shared/data train.py
      every slot of the cluster, with DATA set in each worker
  ringtrain launch -np 2 --remote sc://spark-connect.example.com:15002 train.py
      two workers through a Spark Connect server (SPARK_REMOTE also works)
  RINGTRAIN_NP=2 RINGTRAIN_CONF='spark.driver.memory=4g' ringtrain launch train.py
      flags from the environment; a flag on the command line beats its variable

environment (read when the flag is not given):
{variables}

Each worker runs the script as __main__ in a fresh Python, with RANK, SIZE, LOCAL_RANK, LOCAL_SIZE
and, for --backend tf, TF_CONFIG set; its output is printed prefixed with "[rank] ".

exit status:
  0 every rank succeeded; N the first failing rank's exit code (128+S if killed by signal S);
  124 --timeout ran out; 130 Ctrl-C; 143 SIGTERM; 2 bad usage or configuration; 1 other errors
"""


def _launch_epilog() -> str:
    flags = {
        "num_proc": "-np",
        "gpus_per_proc": "--gpus-per-proc",
        "max_restarts": "--max-restarts",
        "job_dir": "--job-dir",
    }
    lines = [
        f"  {name:<24}{flags.get(dest, '--' + dest)}: {env.VARS[name].doc.split(': ', 1)[-1]}"
        for dest, name in FLAG_VARS.items()
    ]
    return _LAUNCH_EPILOG.format(variables="\n".join(lines))


def _default(field_name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(JobConfig)}[field_name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ringtrain",
        description="Ring-allreduce TensorFlow training on Apache Spark barrier mode.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run `ringtrain launch --help` for the launcher's options and examples",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"ringtrain {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log ringtrain's own messages: -v info, -vv debug"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    launch = commands.add_parser(
        "launch",
        help="run a Python script on N workers of a Spark barrier job",
        description="Run SCRIPT once per worker, as `python SCRIPT ARGS...` would, with a shared\n"
        "rendezvous (TF_CONFIG for MultiWorkerMirroredStrategy).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_launch_epilog(),
        allow_abbrev=False,
    )
    launch.add_argument(
        "-np",
        "--num-proc",
        dest="num_proc",
        type=int,
        metavar="N",
        help="worker processes (default: every GPU, or every slot on CPU)",
    )
    launch.add_argument(
        "--backend", choices=BACKENDS, help=f"collective backend (default: {_default('backend')})"
    )
    launch.add_argument(
        "--master",
        metavar="URL",
        help="Spark master: spark://HOST:PORT, yarn, k8s://..., local-cluster[...], "
        "local[N] (default: an embedded local Spark)",
    )
    launch.add_argument(
        "--remote",
        metavar="URL",
        help="Spark Connect server: sc://HOST[:PORT][/;param=value...], or local[N] for one in this "
        "process (default: SPARK_REMOTE, else --master)",
    )
    launch.add_argument(
        "--gpus-per-proc",
        dest="gpus_per_proc",
        type=int,
        metavar="K",
        help=f"GPUs per worker (default: {_default('gpus_per_worker')})",
    )
    launch.add_argument(
        "--conf", action="append", metavar="KEY=VALUE", help="Spark setting for the session; repeat for more"
    )
    launch.add_argument(
        "--env",
        action="append",
        metavar="NAME=VALUE",
        help="environment variable for every worker; repeat for more",
    )
    launch.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="stop every worker and fail after S seconds, restarts included (default: no limit)",
    )
    launch.add_argument(
        "--max-restarts",
        dest="max_restarts",
        type=int,
        metavar="N",
        help="start a failed job again up to N times (default: 0)",
    )
    launch.add_argument(
        "--job-dir",
        dest="job_dir",
        metavar="DIR",
        help="the job directory, kept across restarts: rank logs and checkpoints; shared storage "
        "on a cluster (default: a new local directory)",
    )
    launch.add_argument(
        "--threads",
        type=int,
        metavar="T",
        help="TF intra/inter-op and OpenMP threads per worker (default: TF's own)",
    )
    launch.add_argument("script", metavar="SCRIPT", help="the Python script every worker runs")
    launch.add_argument(
        "script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed to SCRIPT"
    )

    check = commands.add_parser(
        "check",
        help="report Java, Spark, TensorFlow, MPI and GPUs, and run an allreduce on each backend",
        description="Report what the runtime finds, then run a 2-worker allreduce smoke test on\n"
        "every backend that can run here. Exits 1 if something required is missing or a test fails.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    check.add_argument("--master", metavar="URL", help="run the smoke tests on this Spark master")
    check.add_argument(
        "--remote", metavar="URL", help="run the smoke tests through this Spark Connect server (sc://...)"
    )
    check.add_argument("--no-smoke", dest="smoke", action="store_false", help="skip the smoke tests")
    return parser


# ---------------------------------------------------------------------------- launch: arguments


def split_list(text: str) -> list[str]:
    """Entries of a RINGTRAIN_CONF / RINGTRAIN_ENV value; blank ones are dropped."""
    return [item.strip() for item in _LIST_SEPARATOR.split(text) if item.strip()]


def parse_pairs(items: Iterable[str], what: str, env_names: bool = False) -> dict[str, str]:
    """``["k=v", ...]`` to a dict, later entries winning; ``what`` names the source in errors."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{what} {item!r} is not KEY=VALUE; write it as e.g. {what} name=value")
        if env_names and not _ENV_NAME.fullmatch(key):
            raise ConfigError(
                f"{what} {item!r}: {key!r} is not a valid environment variable name "
                "(letters, digits and _, not starting with a digit)"
            )
        pairs[key] = value
    return pairs


def _from_env(dest: str, parse: Callable[[str], Any]) -> Any:
    """The value of ``dest``'s RINGTRAIN_* variable, or None when it is unset or blank."""
    name = FLAG_VARS[dest]
    raw = str(env.get(name)).strip()
    if not raw:
        return None
    try:
        return parse(raw)
    except ValueError as err:
        raise ConfigError(f"{name}={raw!r} is not valid ({err}). {env.VARS[name].doc}") from None


def config_from_args(ns: argparse.Namespace) -> JobConfig:
    """Merge the parsed flags over their RINGTRAIN_* variables into a validated JobConfig."""
    overrides: dict[str, Any] = {}

    def pick(dest: str, parse: Callable[[str], Any]) -> Any:
        value = getattr(ns, dest)
        return value if value is not None else _from_env(dest, parse)

    num_proc = pick("num_proc", int)
    if num_proc is not None:
        if num_proc < 1:
            raise ConfigError(f"-np must be at least 1, got {num_proc}; omit it to use every slot")
        overrides["num_proc"] = num_proc
    for dest, field_name, parse in (
        ("backend", "backend", str),
        ("master", "master", str),
        ("remote", "remote", str),
        ("gpus_per_proc", "gpus_per_worker", int),
        ("timeout", "timeout", float),
        ("max_restarts", "max_restarts", int),
        ("job_dir", "job_dir", str),
    ):
        value = pick(dest, parse)
        if value is not None:
            overrides[field_name] = value
    if "remote" not in overrides and "master" not in overrides and os.environ.get("SPARK_REMOTE"):
        overrides["remote"] = os.environ["SPARK_REMOTE"]  # pyspark's own variable for Connect
    if ns.threads is not None:  # else JobConfig.from_env reads RINGTRAIN_TF_THREADS
        overrides["threads_per_worker"] = ns.threads
    # Per key, a --conf/--env flag beats the same key in the variable. Spark's console
    # progress bar would garble the rank-prefixed output, so it is off unless asked for.
    conf = {"spark.ui.showConsoleProgress": "false"}
    conf |= parse_pairs(split_list(str(env.get("RINGTRAIN_CONF"))), "RINGTRAIN_CONF entry")
    conf |= parse_pairs(ns.conf or (), "--conf")
    worker_env = parse_pairs(split_list(str(env.get("RINGTRAIN_ENV"))), "RINGTRAIN_ENV entry", True)
    worker_env |= parse_pairs(ns.env or (), "--env", env_names=True)
    # A script's exit is its result: no return value travels to the driver.
    return JobConfig.from_env(spark_conf=conf, worker_env=worker_env, results="none", **overrides)


def resolve_script(path: str) -> str:
    """The script's absolute path; workers may run in another directory."""
    script = Path(path).expanduser()
    if not script.is_file():
        where = "is not a file" if script.exists() else "does not exist"
        raise ConfigError(f"script {path!r} {where} (looked in {Path.cwd()}); pass the path to a .py file")
    return str(script.resolve())


# ---------------------------------------------------------------------------- launch: running


class StopSignals:
    """While active, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread.

    The driver's supervisor catches it, aborts every task agent and cancels the
    Spark job. A second signal during that clean-up exits at once. (SparkContext
    installs its own SIGINT handler, which also cancels jobs and raises
    KeyboardInterrupt, so Ctrl-C reads the same either way.)
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            sys.stderr.write("ringtrain: second signal, exiting without clean-up\n")
            os._exit(128 + signum)
        self.received = signum
        sys.stderr.write(f"ringtrain: {signal.Signals(signum).name} received, stopping every worker\n")
        raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)


def launch(config: JobConfig, script: str, script_args: Sequence[str]) -> int:
    """Run ``script`` on every worker of a job built from ``config``; return the exit status."""
    from .api import serialize_task
    from .launcher import driver, spark
    from .worker import ScriptTask

    payload = serialize_task(ScriptTask.from_path(script, tuple(script_args)))
    if config.master:
        spark.check_master_reachable(config.master)
    if config.remote:
        spark.check_remote_reachable(config.remote)
    stop = StopSignals()
    try:
        with stop:
            try:
                driver.launch(config, payload)
            except KeyboardInterrupt:
                # Tasks killed on our request make Spark log errors while it stops; hide them.
                _stop_spark(quiet=True)
                raise
            finally:
                _stop_spark()
    except KeyboardInterrupt:
        print("ringtrain: interrupted; the Spark job and its workers were stopped", file=sys.stderr)
        return stop.exit_code
    return 0


def _stop_spark(quiet: bool = False) -> None:
    """Stop the session this process made (the CLI never inherits one), so the JVM exits."""
    try:
        from pyspark.sql import SparkSession

        from .launcher.stage import is_connect

        session = SparkSession.getActiveSession()
        if session is not None:
            if quiet and not is_connect(session):
                session.sparkContext.setLogLevel("OFF")
            session.stop()  # on Connect: releases this client's session on the server
    except Exception as err:  # the JVM may already be gone
        logger.debug("stopping Spark failed: %s", err)


def _run_launch(ns: argparse.Namespace) -> int:
    config = config_from_args(ns)
    script = resolve_script(ns.script)
    args = list(ns.script_args)
    if args[:1] == ["--"]:
        args = args[1:]
    return launch(config, script, args)


# ---------------------------------------------------------------------------- check


@dataclass(frozen=True)
class SmokeTest:
    """A 2-worker allreduce that proves one backend works end to end.

    ``fn`` runs in every worker and returns what it reduced; ``verify`` gets every
    rank's value and says what is wrong, or None. ``unavailable`` says why the
    test cannot run here, or None.
    """

    backend: str
    fn: Callable[[], Any]
    verify: Callable[[list[Any]], str | None]
    unavailable: Callable[[], str | None] = lambda: None


SMOKE_TESTS: dict[str, SmokeTest] = {}


def register_smoke_test(test: SmokeTest) -> None:
    SMOKE_TESTS[test.backend] = test


def _expect_all(expected: list[float]) -> Callable[[list[Any]], str | None]:
    def verify(values: list[Any]) -> str | None:
        bad = {rank: v for rank, v in enumerate(values) if v != expected}
        return f"expected {expected}, got {bad} (by rank)" if bad else None

    return verify


def _tf_allreduce() -> list[float]:
    """In a worker: sum (rank + 1) across ranks with the job's MultiWorkerMirroredStrategy."""
    import tensorflow as tf

    import ringtrain

    strategy = ringtrain.tf.strategy()
    value = tf.fill([4], float(ringtrain.rank() + 1))

    @tf.function  # eager collectives work too, but TF warns about their overhead
    def reduce():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", value))

    total = reduce()
    return strategy.experimental_local_results(total)[0].numpy().tolist()


def _mpi_allreduce() -> list[float]:
    """In a worker: allreduce (rank + 1) with ringtrain's MPI collectives."""
    import numpy as np

    import ringtrain

    out = ringtrain.allreduce(np.full(4, ringtrain.rank() + 1, np.float32), op=ringtrain.Sum)
    return np.asarray(out, dtype=np.float64).tolist()


def _mpi_unavailable() -> str | None:
    import importlib.util

    if importlib.util.find_spec("ringtrain.collectives") is None:
        return "ringtrain.collectives is not part of this build"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed; pip install ringtrain[mpi]"
    return None


register_smoke_test(SmokeTest("tf", _tf_allreduce, _expect_all([3.0] * 4)))
register_smoke_test(SmokeTest("mpi", _mpi_allreduce, _expect_all([3.0] * 4), _mpi_unavailable))


@dataclass(frozen=True)
class Finding:
    name: str
    value: str
    required: bool = False
    ok: bool = True
    fix: str = ""


def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _command_output(argv: list[str], timeout: float = 30.0) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    return text if done.returncode == 0 and text else None


def _java() -> Finding:
    fix = "install a JDK 17 (e.g. apt-get install openjdk-17-jdk-headless) or set JAVA_HOME to one"
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home, "bin", "java")) if home else shutil.which("java")
    out = _command_output([java, "-version"]) if java else None
    if out is None:
        return Finding("java", "not found" + (f" (JAVA_HOME={home})" if home else ""), True, False, fix)
    return Finding("java", f"{out.splitlines()[0]} ({java})", True)


def _mpi_library() -> str:
    code = (
        "import mpi4py; mpi4py.rc.initialize = mpi4py.rc.finalize = False\n"
        "from mpi4py import MPI; print(' '.join(MPI.Get_library_version().split('\\n')[0].split()))"
    )
    # A subprocess, so a broken MPI library cannot take this process down.
    return _command_output([sys.executable, "-c", code]) or "MPI library did not load"


def _keras_in_workers(tf_keras: str | None) -> Finding:
    legacy = env.get("RINGTRAIN_LEGACY_KERAS")
    if legacy and tf_keras:
        return Finding("tf.keras", f"tf-keras {tf_keras} (TF_USE_LEGACY_KERAS=1 in workers)")
    if legacy:
        return Finding(
            "tf.keras",
            "Keras 3: tf-keras is not installed, so Model.fit fails under MultiWorkerMirroredStrategy",
            ok=False,
            fix="pip install tf-keras",
        )
    return Finding("tf.keras", "Keras 3 (RINGTRAIN_LEGACY_KERAS=0)")


def collect_findings() -> list[Finding]:
    """What the runtime finds, without importing TensorFlow or starting Spark."""
    import importlib.util
    import platform

    found = [
        Finding("ringtrain", __version__),
        Finding("python", f"{platform.python_version()} ({sys.executable})", True),
        _java(),
    ]
    pyspark = _dist_version("pyspark")
    found.append(Finding("pyspark", pyspark or "not installed", True, bool(pyspark), "pip install pyspark"))
    tf = (
        _dist_version("tensorflow", "tensorflow-cpu", "tf-nightly")
        if importlib.util.find_spec("tensorflow")
        else None
    )
    found.append(Finding("tensorflow", tf or "not installed", True, bool(tf), "pip install tensorflow"))
    found.append(_keras_in_workers(_dist_version("tf-keras", "tf_keras")))
    found.append(Finding("keras", _dist_version("keras") or "not installed"))
    grpc = _dist_version("grpcio")
    found.append(
        Finding(
            "spark connect",
            f"client ready (grpcio {grpc})"
            if grpc and importlib.util.find_spec("grpc_status")
            else "client not installed (optional: pip install ringtrain[connect])",
        )
    )
    mpi4py = _dist_version("mpi4py")
    found.append(
        Finding(
            "mpi4py",
            f"{mpi4py}, {_mpi_library()}"
            if mpi4py
            else "not installed (optional: pip install ringtrain[mpi])",
        )
    )
    try:
        from . import fusion

        found.append(Finding("fusion", fusion.IMPLEMENTATION))
    except (ImportError, RingtrainError) as err:
        found.append(Finding("fusion", f"unavailable ({err})", ok=False))
    gpus = _command_output(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else None
    found.append(Finding("gpus", "; ".join(gpus.splitlines()) if gpus else "none"))
    return found


def _print_row(name: str, status: str, value: str) -> None:
    print(f"  {name:<14} {status:<5} {value}", flush=True)


def run_smoke_tests(master: str | None, remote: str | None = None) -> bool:
    """Run each available backend's smoke test on 2 workers; print and return whether all passed."""
    import pickle

    from .api import serialize_task
    from .launcher import driver, spark
    from .worker import FunctionTask

    print(f"smoke tests (2 workers, {remote or master or 'embedded local Spark'}):", flush=True)
    started = time.monotonic()
    try:
        if master:
            spark.check_master_reachable(master)
        if remote:
            spark.check_remote_reachable(remote)
        spark.get_session(JobConfig.from_env(num_proc=2, master=master, remote=remote))
    except Exception as err:
        _print_row("spark", "FAIL", f"{time.monotonic() - started:.1f} s: {err}")
        return False
    _print_row("spark", "ok", f"session started in {time.monotonic() - started:.1f} s")
    passed = True
    try:
        for backend in BACKENDS:
            test = SMOKE_TESTS.get(backend)
            if backend == "auto":
                _print_row(backend, "skip", "picks one of the other backends for each job")
                continue
            reason = "no smoke test for this backend" if test is None else test.unavailable()
            if reason or test is None:
                _print_row(backend, "skip", reason or "")
                continue
            started = time.monotonic()
            try:
                # master=None: the session above is active and is used as it is.
                config = JobConfig.from_env(num_proc=2, backend=backend, timeout=180.0)
                results = driver.launch(config, serialize_task(FunctionTask(test.fn)))
                values = [pickle.loads(results[r]) if results[r] else None for r in sorted(results)]
                problem = test.verify(values)
            except RingtrainError as err:
                problem = str(err).splitlines()[0]
            took = f"{time.monotonic() - started:.1f} s"
            _print_row(backend, "FAIL" if problem else "pass", f"{took}: {problem}" if problem else took)
            passed = passed and not problem
    finally:
        _stop_spark()
    return passed


def _run_check(ns: argparse.Namespace) -> int:
    findings = collect_findings()
    print("ringtrain check:")
    for f in findings:
        _print_row(f.name, "ok" if f.ok else ("MISS" if f.required else "warn"), f.value)
    missing = [f for f in findings if f.required and not f.ok]
    for f in findings:
        if not f.ok and f.fix:
            print(f"  -> {f.name}: {f.fix}")
    if missing:
        print(
            f"ringtrain: missing {', '.join(f.name for f in missing)}; install it and retry", file=sys.stderr
        )
        return EXIT_ERROR
    if ns.smoke and not run_smoke_tests(ns.master, ns.remote):
        return EXIT_ERROR
    return 0


# ---------------------------------------------------------------------------- entry point


def _configure_logging(verbosity: int) -> None:
    # The package logger, not the root one: other libraries' logging stays as it was.
    log = logging.getLogger("ringtrain")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("ringtrain: %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)])


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit status."""
    ns = build_parser().parse_args(argv)
    _configure_logging(ns.verbose)
    try:
        if ns.command == "launch":
            return _run_launch(ns)
        return _run_check(ns)
    except WorkerError as err:
        print(str(err), file=sys.stderr)
        first = err.failures[0] if err.failures else None
        more = f" (and {len(err.failures) - 1} more)" if len(err.failures) > 1 else ""
        print(f"ringtrain: {first.describe() if first else 'a worker failed'}{more}", file=sys.stderr)
        return err.exitcode
    except ConfigError as err:
        print(f"ringtrain: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except JobTimeoutError as err:
        print(f"ringtrain: {err}", file=sys.stderr)
        return EXIT_TIMEOUT
    except RingtrainError as err:
        print(f"ringtrain: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before the launch's own handlers were in place
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # Output was piped into something that stopped reading (e.g. `| head`).
        sys.stderr.close()
        return 128 + signal.SIGPIPE
    except Exception as err:  # e.g. Spark could not start; the traceback shows where
        traceback.print_exc()
        first_line = (str(err).strip().splitlines() or [""])[0]
        print(f"ringtrain: error: {type(err).__name__}: {first_line}", file=sys.stderr)
        return EXIT_ERROR
