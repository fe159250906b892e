"""CPU encoder replicas: planning, scheduling, and caches equal to one process."""

from __future__ import annotations

import os
from collections import deque

import numpy as np
import pytest
import torch

from virtualst.embed.cache import CacheWriter, partial_path, read_embeddings
from virtualst.embed.replicas import (
    MIN_TILES_FOR_REPLICAS,
    ChunkQueue,
    EncoderReplicas,
    InOrder,
    ReplicaPlan,
    chunk_items,
    plan_replicas,
    weight_bytes,
)
from virtualst.embed.runner import EmbedSettings, FeatureExtractor, embed_samples, embed_with
from virtualst.errors import EncoderError, InputError

from .conftest import make_sample

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GB = 2**30


# ------------------------------------------------------------------------- planning
def test_plan_uses_every_core_up_to_four_replicas_for_long_cpu_runs():
    many = MIN_TILES_FOR_REPLICAS
    assert plan_replicas(CPU, many, GB, cores=2, memory_bytes=64 * GB) == ReplicaPlan(2, 1)
    assert plan_replicas(CPU, many, GB, cores=16, memory_bytes=64 * GB) == ReplicaPlan(4, 4)
    assert plan_replicas(CPU, many - 1, GB, cores=16, memory_bytes=64 * GB) == ReplicaPlan(1, 16), "short runs: one process"
    assert plan_replicas(CUDA, many, GB, cores=16, memory_bytes=64 * GB).replicas == 1


def test_plan_caps_replicas_by_memory_and_obeys_a_request():
    # Four 4.5 GB copies of a ViT-g would take 18 of 24 GB: only one fits in the 25 % share.
    assert plan_replicas(CPU, 10**5, int(4.5 * GB), cores=16, memory_bytes=24 * GB) == ReplicaPlan(1, 16)
    assert plan_replicas(CPU, 10, GB, requested=3, cores=16) == ReplicaPlan(3, 5), "a request holds even for short runs"
    assert plan_replicas(CPU, 10**5, GB, requested=64, cores=8) == ReplicaPlan(8, 1), "capped at the cores"
    assert plan_replicas(CPU, 10**5, GB, requested=1, cores=8) == ReplicaPlan(1, 8)


def test_weight_bytes_counts_parameters_and_buffers():
    module = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.BatchNorm1d(5))
    # Linear 50 + 5, BatchNorm weight/bias/mean/var 4 x 5 in float32, plus its int64 batch counter.
    assert weight_bytes(module) == (55 + 20) * 4 + 8


# ----------------------------------------------------------------------- scheduling
class Items:
    """Just the ``items`` a scheduler reads: (job, rows) per batch."""

    def __init__(self, batches_per_job: list[int], batch: int = 4, start: int = 0) -> None:
        self.items = [(job, np.arange(start + b * batch, start + (b + 1) * batch)) for job, n in enumerate(batches_per_job) for b in range(n)]


def test_chunks_hold_consecutive_batches_of_one_job():
    chunks = chunk_items(Items([3, 1, 2]), size=2)
    assert chunks == {0: deque([[0, 1], [2]]), 1: deque([[3]]), 2: deque([[4, 5]])}


def test_queue_keeps_replicas_on_their_sample_then_shares_the_largest():
    queue = ChunkQueue(chunk_items(Items([4, 1, 6]), size=1))
    assert queue.take(None) == (0, [0])  # replica A starts job 0
    assert queue.take(None) == (1, [4])  # replica B starts job 1
    assert queue.take(0) == (0, [1])  # A stays on job 0
    assert queue.take(1) == (2, [5])  # B's job is done: it starts the untouched job 2
    assert queue.take(0) == (0, [2])
    assert queue.take(0) == (0, [3])
    assert queue.take(0) == (2, [6]), "A helps with the job that has most chunks left"
    taken = [queue.take(2) for _ in range(5)]
    assert taken[-1] is None and not queue
    assert [c for _, c in taken[:-1]] == [[7], [8], [9], [10]], "every chunk handed out once, in order"


def test_in_order_releases_each_jobs_rows_in_order_in_blocks():
    order = InOrder({0: 0, 1: 8})  # job 1 resumes at row 8
    f = {r: np.full((4, 2), r) for r in range(0, 20, 4)}
    assert list(order.add([(0, 4, f[4]), (1, 12, f[12])])) == []
    ((job, first, block),) = order.add([(1, 8, f[8])])
    assert (job, first) == (1, 8)
    np.testing.assert_array_equal(block, np.concatenate([f[8], f[12]]))
    ((job, first, block),) = order.add([(0, 0, f[0]), (0, 8, f[8])])
    assert (job, first) == (0, 0) and block[:, 0].tolist() == [0] * 4 + [4] * 4 + [8] * 4


# ------------------------------------------------------------------ real replicas
@pytest.fixture(scope="module")
def extractor():
    from virtualst.embed.encoders import load_encoder

    return FeatureExtractor(load_encoder("efficientnet_lite0"), CPU)


@pytest.fixture(scope="module")
def replicas():
    with EncoderReplicas(EmbedSettings(device="cpu"), ReplicaPlan(2, 1)) as pool:
        yield pool


@pytest.fixture
def samples(tmp_path):
    return [make_sample(tmp_path, n_side=n, sample_id=f"s{n}") for n in (3, 5, 4)]


SETTINGS = EmbedSettings(batch_size=4, device="cpu")


def test_replicas_write_the_caches_of_one_process(samples, extractor, replicas, tmp_path):
    one = embed_with(extractor, samples, tmp_path / "one", SETTINGS)
    many = embed_with(replicas, samples, tmp_path / "many", SETTINGS)
    assert replicas.encoder.config.name == "efficientnet_lite0" and replicas.encoder.dim == 1280
    for a, b in zip(one, many):
        ea, eb = read_embeddings(a), read_embeddings(b)
        assert eb.attrs["complete"] and eb.attrs["fingerprint"] == ea.attrs["fingerprint"]
        np.testing.assert_array_equal(eb.barcodes, ea.barcodes)
        np.testing.assert_array_equal(eb.coords, ea.coords)
        np.testing.assert_allclose(eb.features, ea.features, rtol=1e-4, atol=1e-5)


def test_killed_run_through_replicas_resumes(samples, extractor, replicas, tmp_path, monkeypatch):
    reference = embed_with(extractor, samples, tmp_path / "ref", SETTINGS)
    real_write, calls = CacheWriter.write, {"n": 0}

    def killed_at_fifth_write(self, start, features):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_write(self, start, features)

    monkeypatch.setattr(CacheWriter, "write", killed_at_fifth_write)
    with pytest.raises(KeyboardInterrupt):
        embed_with(replicas, samples, tmp_path / "run", SETTINGS)
    monkeypatch.undo()
    partial = [p for p in (tmp_path / "run" / "efficientnet_lite0").iterdir() if p.suffix == ".partial"]
    assert partial, "the interrupted caches stay partial"
    paths = embed_with(replicas, samples, tmp_path / "run", SETTINGS)
    for path, ref in zip(paths, reference):
        assert not partial_path(path).exists()
        np.testing.assert_allclose(read_embeddings(path).features, read_embeddings(ref).features, rtol=1e-4, atol=1e-5)


def test_unreadable_image_in_a_replica_is_a_one_line_input_error(tmp_path, replicas):
    sample = make_sample(tmp_path, n_side=3)
    data = sample.image.path.read_bytes()
    sample.image.path.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match="cannot read image") as info:
        embed_with(replicas, [sample], tmp_path / "cache", SETTINGS)
    assert str(sample.image.path) in str(info.value)
    assert not (tmp_path / "cache" / "efficientnet_lite0" / f"{sample.sample_id}.h5").exists()


class DyingBatches:
    """Items whose reading kills the replica process (out of memory, kill -9)."""

    items = [(0, np.arange(4))]

    def __getitem__(self, item):
        os._exit(1)


def test_dead_replica_is_a_clear_error():
    with EncoderReplicas(EmbedSettings(device="cpu"), ReplicaPlan(1, 1)) as pool:
        with pytest.raises(EncoderError, match="replica process died.*--cpu-replicas 1"):
            list(pool.encode(DyingBatches()))


def test_embed_samples_runs_multithreaded_replicas_from_a_fork_server(samples, extractor, tmp_path):
    one = embed_with(extractor, samples[:1], tmp_path / "one", SETTINGS)
    settings = EmbedSettings(batch_size=4, device="cpu", cpu_replicas=1)
    with EncoderReplicas(settings, ReplicaPlan(1, 2)) as pool:  # two threads: fork server, not fork
        (path,) = embed_with(pool, samples[:1], tmp_path / "fs", settings)
    np.testing.assert_allclose(read_embeddings(path).features, read_embeddings(one[0]).features, rtol=1e-4, atol=1e-5)
    # And through the public entry point, replicas on request:
    (again,) = embed_samples(samples[:1], tmp_path / "api", EmbedSettings(batch_size=4, device="cpu", cpu_replicas=2), show_progress=False)
    np.testing.assert_allclose(read_embeddings(again).features, read_embeddings(one[0]).features, rtol=1e-4, atol=1e-5)
