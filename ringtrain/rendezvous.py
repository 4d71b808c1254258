"""Rendezvous: turn what every task published into each worker's place in the job.

Pure logic, free of Spark and I/O, so it is tested without a cluster. Each barrier
task publishes a :class:`TaskOffer` through ``allGather``; :func:`plan` orders the
workers by (partition id, local index) and gives each a :class:`WorkerSpec`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import ConfigError


@dataclass(frozen=True)
class TaskOffer:
    """One barrier task: its partition, reachable host, reserved ports, assigned GPUs.

    ``data`` is what the task stored of the job's DataFrames (a
    :class:`ringtrain.data.spill.SpillSummary` as JSON; empty without data): it rides
    the same exchange, so every task learns every task's row counts at no extra cost.
    """

    partition: int
    host: str
    ports: tuple[int, ...]
    gpus: tuple[str, ...] = ()
    gpus_per_worker: int = 1
    data: str = ""

    @property
    def num_workers(self) -> int:
        return workers_per_task(self.gpus, self.gpus_per_worker)

    def worker_gpus(self, index: int) -> tuple[str, ...]:
        k = self.gpus_per_worker
        return self.gpus[index * k : (index + 1) * k]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TaskOffer:
        data = json.loads(text)
        return cls(
            partition=int(data["partition"]),
            host=str(data["host"]),
            ports=tuple(int(p) for p in data["ports"]),
            gpus=tuple(str(g) for g in data["gpus"]),
            gpus_per_worker=int(data.get("gpus_per_worker", 1)),
            data=str(data.get("data", "")),
        )


@dataclass(frozen=True)
class WorkerSpec:
    """Where one worker stands in the job, and what it needs to find its peers."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    partition: int
    host: str
    port: int
    gpus: tuple[str, ...]
    peers: tuple[str, ...] = field(repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def tf_config(self) -> dict:
        """TF_CONFIG for MultiWorkerMirroredStrategy: every worker, this one's index."""
        return {"cluster": {"worker": list(self.peers)}, "task": {"type": "worker", "index": self.rank}}

    def environ(self) -> dict[str, str]:
        """Environment variables that place this worker in the job."""
        return {
            "RANK": str(self.rank),
            "SIZE": str(self.size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_SIZE": str(self.local_size),
            "TF_CONFIG": json.dumps(self.tf_config()),
            # Only this worker's GPUs; an empty value hides every GPU from a CPU worker.
            "CUDA_VISIBLE_DEVICES": ",".join(self.gpus),
        }


def workers_per_task(gpus: tuple[str, ...] | list[str], gpus_per_worker: int = 1) -> int:
    """One worker per ``gpus_per_worker`` assigned GPUs (default: per GPU); one per task on CPU."""
    if gpus_per_worker < 1:
        raise ConfigError(f"gpus_per_worker must be >= 1, got {gpus_per_worker}")
    if len(gpus) % gpus_per_worker:
        raise ConfigError(
            f"a task holds {len(gpus)} GPU(s), which {gpus_per_worker} GPU(s) per worker does not divide; "
            "make spark.task.resource.gpu.amount a multiple of the GPUs per worker"
        )
    return max(1, len(gpus) // gpus_per_worker)


def plan(offers: list[TaskOffer]) -> list[WorkerSpec]:
    """Give every worker of the job its rank, local rank and peers.

    Ranks follow (partition id, local index). Local rank counts workers on the same
    host, in rank order, so it matches what a host-level launcher would give.
    """
    partitions = [o.partition for o in offers]
    if len(set(partitions)) != len(partitions):
        raise ConfigError(f"rendezvous got duplicate partitions {sorted(partitions)}")
    ordered = sorted(offers, key=lambda o: o.partition)
    placed: list[tuple[TaskOffer, int]] = []
    for offer in ordered:
        if len(offer.ports) != offer.num_workers:
            raise ConfigError(
                f"partition {offer.partition} published {len(offer.ports)} port(s) "
                f"for {offer.num_workers} worker(s)"
            )
        placed.extend((offer, i) for i in range(offer.num_workers))

    peers = tuple(f"{offer.host}:{offer.ports[i]}" for offer, i in placed)
    per_host: dict[str, int] = {}
    for offer, _ in placed:
        per_host[offer.host] = per_host.get(offer.host, 0) + 1

    seen: dict[str, int] = {}
    specs = []
    for rank, (offer, i) in enumerate(placed):
        local_rank = seen.get(offer.host, 0)
        seen[offer.host] = local_rank + 1
        specs.append(
            WorkerSpec(
                rank=rank,
                size=len(placed),
                local_rank=local_rank,
                local_size=per_host[offer.host],
                partition=offer.partition,
                host=offer.host,
                port=offer.ports[i],
                gpus=offer.worker_gpus(i),
                peers=peers,
            )
        )
    return specs
