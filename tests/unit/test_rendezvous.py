import json

import pytest

from ringtrain.errors import ConfigError
from ringtrain.rendezvous import TaskOffer, plan, workers_per_task


def test_cpu_tasks_get_one_worker_each_ordered_by_partition():
    offers = [
        TaskOffer(partition=1, host="b", ports=(2001,)),
        TaskOffer(partition=0, host="a", ports=(1001,)),
    ]
    specs = plan(offers)
    assert [(s.rank, s.partition, s.host, s.port) for s in specs] == [(0, 0, "a", 1001), (1, 1, "b", 2001)]
    assert all(s.size == 2 and s.local_rank == 0 and s.local_size == 1 for s in specs)
    assert all(s.gpus == () for s in specs)


def test_gpu_tasks_get_one_worker_per_gpu_in_local_index_order():
    offers = [
        TaskOffer(partition=0, host="h0", ports=(10, 11), gpus=("2", "3")),
        TaskOffer(partition=1, host="h1", ports=(20, 21), gpus=("0", "1")),
    ]
    specs = plan(offers)
    assert [(s.rank, s.host, s.port, s.gpus, s.local_rank) for s in specs] == [
        (0, "h0", 10, ("2",), 0),
        (1, "h0", 11, ("3",), 1),
        (2, "h1", 20, ("0",), 0),
        (3, "h1", 21, ("1",), 1),
    ]
    assert [s.environ()["CUDA_VISIBLE_DEVICES"] for s in specs] == ["2", "3", "0", "1"]


def test_local_rank_counts_workers_across_tasks_on_one_host():
    offers = [TaskOffer(p, "same", (100 + p,)) for p in range(3)] + [TaskOffer(3, "other", (5,))]
    specs = plan(offers)
    assert [(s.local_rank, s.local_size) for s in specs] == [(0, 3), (1, 3), (2, 3), (0, 1)]


def test_tf_config_lists_every_worker_and_this_index():
    specs = plan([TaskOffer(0, "a", (1,)), TaskOffer(1, "b", (2,))])
    config = json.loads(specs[1].environ()["TF_CONFIG"])
    assert config == {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    env = specs[1].environ()
    assert (env["RANK"], env["SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == ("1", "2", "0", "1")
    assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_offer_json_round_trip():
    offer = TaskOffer(3, "10.0.0.7", (1, 2), ("0", "1"))
    assert TaskOffer.from_json(offer.to_json()) == offer


def test_duplicate_partitions_and_port_mismatch_are_rejected():
    with pytest.raises(ConfigError, match="duplicate partitions"):
        plan([TaskOffer(0, "a", (1,)), TaskOffer(0, "b", (2,))])
    with pytest.raises(ConfigError, match="partition 0 published 1 port"):
        plan([TaskOffer(0, "a", (1,), ("0", "1"))])


def test_workers_per_task():
    assert workers_per_task(()) == 1
    assert workers_per_task(("0", "1", "2")) == 3
    assert workers_per_task(("0", "1", "2", "3"), gpus_per_worker=2) == 2
    with pytest.raises(ConfigError, match="does not divide"):
        workers_per_task(("0", "1", "2"), gpus_per_worker=2)


def test_several_gpus_per_worker():
    specs = plan([TaskOffer(0, "h", (1, 2), ("0", "1", "2", "3"), gpus_per_worker=2)])
    assert [s.environ()["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0,1", "2,3"]
