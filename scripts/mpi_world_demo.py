#!/usr/bin/env python
"""Form one MPI world from simulated task agents, without Spark.

    python scripts/mpi_world_demo.py --agents 2 [--procs 1] [--fail-rank R]

Roles, all on this machine:
- driver: starts the agents and plays BarrierTaskContext.allGather for them
  (each agent writes one JSON line per round on stdout; the driver answers each
  with the list of all agents' lines, in partition order);
- agent i: round 1 publishes {host, nprocs}; agent 0 then starts mpiexec in
  manual mode and publishes the proxy argv list in round 2; every agent runs its
  own proxy, forwards its own ranks' output with a rank prefix, and reports the
  proxy's exit code in round 3;
- rank: checks COMM_WORLD size and rank against what the agents expect and does
  an Allreduce.

Exit code 0 means every rank checked out; no mpiexec, proxy or rank is left.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- rank


def rank_main(args: argparse.Namespace) -> int:
    # Send our own output to the agent that ran our proxy, not to mpiexec: the
    # agent gives us a FIFO per local rank. This must happen before anything prints.
    out_dir = os.environ.get("RT_DEMO_OUT_DIR")
    local = int(os.environ.get("MPI_LOCALRANKID", "0"))
    if out_dir:
        fd = os.open(os.path.join(out_dir, f"local-{local}"), os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)

    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    expect_size = int(os.environ["RT_DEMO_SIZE"])
    expect_rank = int(os.environ["RT_DEMO_FIRST_RANK"]) + local
    ok = comm.size == expect_size and comm.rank == expect_rank
    buf = np.full(1024, comm.rank + 1, np.float32)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    want = expect_size * (expect_size + 1) / 2
    ok = ok and bool(np.all(buf == want))
    print(
        f"size={comm.size} (want {expect_size}) rank={comm.rank} (want {expect_rank}) "
        f"allreduce={buf[0]:g} (want {want:g}) agent={os.environ['RT_DEMO_AGENT']} "
        f"{'OK' if ok else 'MISMATCH'}",
        flush=True,
    )
    if args.fail_rank == comm.rank:
        print("failing on purpose", flush=True)
        os._exit(3)
    comm.Barrier()
    return 0 if ok else 1


# ----------------------------------------------------------------------------- agent


def agent_main(args: argparse.Namespace) -> int:
    import tempfile

    from ringtrain.backends import _hydra
    from ringtrain.errors import BackendError

    index = args.index
    proto_in, proto_out = sys.stdin, sys.stdout
    # Everything human-readable goes to stderr; stdout is the allGather channel.
    log = lambda msg: print(f"[agent {index}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    def all_gather(payload: dict) -> list[dict]:
        proto_out.write(json.dumps(payload) + "\n")
        proto_out.flush()
        line = proto_in.readline()
        if not line:
            raise SystemExit("driver went away")
        return json.loads(line)

    # Round 1: who is where. In Spark this is the rendezvous payload.
    gathered = all_gather({"host": "127.0.0.1", "nprocs": args.procs})
    counts = [g["nprocs"] for g in gathered]
    first_rank = sum(counts[:index])

    launch = None
    proxies_argv: list[list[str]] | None = None
    error = None
    if index == 0:
        cmd = _hydra.build_mpiexec_command(
            counts,
            [sys.executable, os.path.abspath(__file__), "--role", "rank", "--fail-rank", str(args.fail_rank)],
            control_host=gathered[0]["host"],
        )
        log(f"starting {' '.join(cmd)}")
        try:
            launch = _hydra.start_mpiexec(cmd, timeout=20, on_line=lambda s: log(f"mpiexec: {s}"))
            proxies_argv = launch.proxies
        except BackendError as e:
            error = str(e)
    # Round 2: agent 0 hands out the proxy commands (or the reason it could not).
    gathered = all_gather({"proxies": proxies_argv, "error": error} if index == 0 else {})
    if gathered[0]["error"]:
        log(f"mpiexec failed: {gathered[0]['error']}")
        all_gather({"rc": 1})
        return 1
    argv = gathered[0]["proxies"][index]

    with tempfile.TemporaryDirectory(prefix="rt-demo-") as out_dir:
        fifos = [os.path.join(out_dir, f"local-{i}") for i in range(args.procs)]
        for f in fifos:
            os.mkfifo(f)
        env = dict(os.environ)
        env.update(
            RT_DEMO_OUT_DIR=out_dir,
            RT_DEMO_SIZE=str(sum(counts)),
            RT_DEMO_FIRST_RANK=str(first_rank),
            RT_DEMO_AGENT=str(index),
            PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        )
        proxy = _hydra.start_proxy(argv, env=env)

        def forward(i: int) -> None:
            # Opening for reading blocks until the rank opens its end; O_RDWR
            # would never see EOF, so a plain read-open in a thread it is.
            with open(fifos[i], errors="replace") as f:
                for line in f:
                    log(f"rank {first_rank + i}: {line.rstrip()}")

        readers = [threading.Thread(target=forward, args=(i,), daemon=True) for i in range(args.procs)]
        for t in readers:
            t.start()
        try:
            rc = proxy.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            log("proxy timed out; tearing down")
            rc = None
        # A rank that exits with a non-zero code without MPI_Finalize leaves its
        # proxy exiting 0 and its peers hanging, so the proxy's code alone is not
        # trustworthy; mpiexec's is (see below). Tear down anything left either way.
        _hydra.terminate_group(proxy, grace=1.0)
        for t in readers:
            t.join(timeout=1.0)
        if launch is not None:
            try:
                mrc = launch.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log("mpiexec still waiting; tearing down")
                mrc = None
            _hydra.terminate_group(launch.proc, grace=1.0)
            log(f"mpiexec exit code {mrc}")
            rc = mrc if mrc is not None else 1
        else:
            rc = 1 if rc is None else rc
        log(f"proxy done, reporting {rc}")
    # Round 3: results. Agent 0's mpiexec code covers every rank.
    results = all_gather({"rc": rc})
    return 0 if all(r["rc"] == 0 for r in results) else 1


# ----------------------------------------------------------------------------- driver


def driver_main(args: argparse.Namespace) -> int:
    from ringtrain.backends import _hydra

    t0 = time.monotonic()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--role",
                "agent",
                "--index",
                str(i),
                "--procs",
                str(args.procs),
                "--fail-rank",
                str(args.fail_rank),
                "--timeout",
                str(args.timeout),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        for i in range(args.agents)
    ]
    ok = True
    try:
        result: list[dict] = []
        for _round in range(3):
            # A real barrier: wait for every agent's line, then answer all.
            got = []
            for a in agents:
                line = _readline(a, t0 + args.timeout + 30)
                if line is None:
                    raise RuntimeError(f"agent {agents.index(a)} gave no answer in round {_round + 1}")
                got.append(json.loads(line))
            for a in agents:
                a.stdin.write(json.dumps(got) + "\n")
                a.stdin.flush()
            result = got
        codes = [a.wait(timeout=10) for a in agents]
        ok = all(c == 0 for c in codes) and all(r["rc"] == 0 for r in result)
        print(f"[driver] agent exit codes {codes}, reported {[r['rc'] for r in result]}", flush=True)
    except Exception as e:  # noqa: BLE001 - any failure ends the demo with teardown
        print(f"[driver] {e}", flush=True)
        ok = False
    finally:
        for a in agents:
            _hydra.terminate_group(a, grace=2.0)
    print(f"[driver] {'SUCCESS' if ok else 'FAILURE'} in {time.monotonic() - t0:.2f} s", flush=True)
    return 0 if ok else 1


def _readline(proc: subprocess.Popen, deadline: float) -> str | None:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(max(deadline - time.monotonic(), 0.1))
    return box[0] if box and box[0] else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["driver", "agent", "rank"], default="driver")
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--procs", type=int, default=1, help="ranks per agent")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--fail-rank", type=int, default=-1, help="this rank exits with code 3 (failure demo)")
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    if args.role == "rank":
        return rank_main(args)
    if args.role == "agent":
        return agent_main(args)
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
