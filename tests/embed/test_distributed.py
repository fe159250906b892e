"""Embedding over Ray (``virtualst embed --ray``): the caches of a local run, reuse, resume, refusal, CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import sys

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from virtualst.cli import app
from virtualst.embed.cache import partial_path, read_embeddings
from virtualst.embed.distributed import embed_samples_ray, worker_count, worker_resources
from virtualst.embed.runner import EmbedSettings, embed_samples
from virtualst.embed.shards import shard_root, shard_sample
from virtualst.embed.tiling import TileSpec
from virtualst.errors import InputError, MissingDependencyError, VirtualSTError

from .conftest import make_sample

SIDES = {"s0": 2, "s1": 3, "s2": 4}  # 4 + 9 + 16 tiles
SETTINGS = EmbedSettings(batch_size=4, num_workers=0, device="cpu")
#: Everything a cache says about its content (not when or where it was made).
CONTENT_ATTRS = (
    "fingerprint", "settings", "complete", "n_done", "format_version", "encoder", "weights_source", "weights_sha256",
    "pooling", "precision", "transform", "tile_px", "tile_um", "um_per_px", "tile_um_per_px", "sample_id", "patient_id",
)  # fmt: skip


@contextlib.contextmanager
def one_thread():
    """Run the local reference like a 1-CPU Ray worker, so that features agree bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    out = [make_sample(folder, n_side=n, sample_id=sid) for sid, n in SIDES.items()]
    for sample in out:
        sample.metadata["image_path"] = str(sample.image.path)  # so that an .h5ad export reopens the image
    return out


@pytest.fixture(scope="module")
def reference(samples, tmp_path_factory):
    """Caches of the single-process run."""
    with one_thread():
        return embed_samples(samples, tmp_path_factory.mktemp("reference"), SETTINGS, show_progress=False)


@pytest.fixture(scope="module")
def ray_installed():
    return pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster(ray_installed):
    ray = ray_installed
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level=logging.ERROR)
    yield ray
    if started:
        ray.shutdown()


def assert_same_cache(path, expected):
    got, want = read_embeddings(path), read_embeddings(expected)
    np.testing.assert_array_equal(got.features, want.features)
    np.testing.assert_array_equal(got.coords, want.coords)
    np.testing.assert_array_equal(got.barcodes, want.barcodes)
    assert {k: got.attrs.get(k) for k in CONTENT_ATTRS} == {k: want.attrs.get(k) for k in CONTENT_ATTRS}
    with h5py.File(path) as a, h5py.File(expected) as b:
        np.testing.assert_array_equal(a["edge"][()], b["edge"][()])


# Runs first, before the module's Ray instance exists: the CLI starts (and stops) its own.
@pytest.mark.ray
def test_cli_embeds_on_a_local_ray_instance_and_prints_a_summary(ray_installed, samples, reference, tmp_path):
    ray = ray_installed
    already_running = ray.is_initialized()
    files = []
    for sample in samples[:2]:
        files.append(tmp_path / f"{sample.sample_id}.h5ad")
        sample.write_h5ad(files[-1])
    cache = tmp_path / "cache"
    args = ["embed", *files, "--cache", cache, "--batch-size", "4", "--workers", "0", "--device", "cpu", "--ray"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert re.search(r"embedded 2 samples \(13 tiles\) on \d+ workers in [\d.]+ s; 0 reused", result.output), result.output
    for sample, ref in zip(samples[:2], reference):
        path = cache / "efficientnet_lite0" / f"{sample.sample_id}.h5"
        assert str(path) in result.output.splitlines()
        assert_same_cache(path, ref)
    if not already_running:
        assert not ray.is_initialized(), "a Ray instance started by the command is shut down"


@pytest.mark.ray
def test_distributed_caches_equal_the_local_run_and_are_reused(ray_cluster, samples, reference, tmp_path):
    report = embed_samples_ray(samples, tmp_path, SETTINGS, show_progress=False)
    assert report.paths == [tmp_path / "efficientnet_lite0" / f"{sid}.h5" for sid in SIDES]
    assert (report.embedded, report.reused, report.tiles, report.workers) == (3, 0, 29, 2)
    for path, ref in zip(report.paths, reference):
        assert_same_cache(path, ref)

    stamps = [p.stat().st_mtime_ns for p in report.paths]
    again = embed_samples_ray(samples, tmp_path, SETTINGS, max_workers=1, show_progress=False)  # one start-up is enough here
    assert again.paths == report.paths
    assert (again.embedded, again.reused, again.tiles) == (0, 3, 0)
    assert [p.stat().st_mtime_ns for p in again.paths] == stamps, "complete caches are reused untouched"
    assert again.summary().startswith("embedded 0 samples (0 tiles) on 1 workers in ") and again.summary().endswith("; 3 reused")


@pytest.mark.ray
def test_interrupted_local_run_resumes_over_ray(ray_cluster, samples, reference, tmp_path, monkeypatch, interrupt_at_batch):
    big = samples[2]  # 16 tiles: four batches of 4
    interrupt_at_batch(3)
    final = tmp_path / "efficientnet_lite0" / "s2.h5"
    with one_thread(), pytest.raises(KeyboardInterrupt):
        embed_samples([big], tmp_path, SETTINGS, show_progress=False)
    monkeypatch.undo()
    assert partial_path(final).exists() and not final.exists()

    report = embed_samples_ray([big], tmp_path, SETTINGS, show_progress=False)
    assert report.paths == [final] and report.tiles == 16 - 8, "only the rows after the two flushed batches are encoded"
    assert not partial_path(final).exists()
    assert_same_cache(final, reference[2])


@pytest.mark.ray
def test_cache_with_other_settings_is_refused_before_any_work(ray_cluster, samples, reference, tmp_path):
    shutil.copytree(reference[0].parent, tmp_path / "efficientnet_lite0")
    before = sorted(p.name for p in (tmp_path / "efficientnet_lite0").iterdir())
    other = dataclasses.replace(SETTINGS, tile=TileSpec(px=224, um=56.0))
    with pytest.raises(InputError, match=r"cache exists with other settings \(tile_um 112.0 vs 56.0.*--overwrite") as caught:
        embed_samples_ray(samples, tmp_path, other, max_workers=1, show_progress=False)
    assert caught.value.path == (tmp_path / "efficientnet_lite0" / "s0.h5").absolute()
    assert sorted(p.name for p in (tmp_path / "efficientnet_lite0").iterdir()) == before, "nothing written"


@pytest.mark.ray
def test_bad_samples_fail_before_ray_starts(ray_installed, samples, tmp_path, monkeypatch):
    ray = ray_installed
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray must not start for bad input"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(InputError, match="'s0' appears twice"):
        embed_samples_ray([samples[0], samples[0]], tmp_path, SETTINGS, show_progress=False)
    no_image = make_sample(tmp_path, n_side=2, sample_id="blank")
    no_image.image = None
    with pytest.raises(InputError, match="no image"):
        embed_samples_ray([no_image], tmp_path, SETTINGS, show_progress=False)


def test_missing_ray_names_the_extra(samples, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingDependencyError, match=r"ray is needed for distributed embedding \(--ray\): pip install 'virtualst\[ray\]'"):
        embed_samples_ray(samples, tmp_path, SETTINGS)
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "whatever"), "--ray"])
    assert result.exit_code == 2 and result.output.strip().startswith("error: ray is needed"), result.output
    assert "virtualst[ray]" in result.output


def test_ray_options_need_ray(tmp_path):
    result = CliRunner().invoke(app, ["embed", str(tmp_path), "--ray-shard-spots", "100"])
    assert result.exit_code == 2 and "need --ray" in result.output, result.output


def test_worker_resources_follow_the_device_and_the_cluster():
    cpu_cluster, gpu_cluster = {"CPU": 16.0}, {"CPU": 32.0, "GPU": 4.0}
    auto = EmbedSettings()
    on_cpu = worker_resources(auto, cpu_cluster)
    assert (on_cpu.gpus, on_cpu.cpus, on_cpu.device, on_cpu.num_workers) == (0, 1, "cpu", 0)
    assert worker_count(on_cpu, cpu_cluster, n_samples=40) == 16 and worker_count(on_cpu, cpu_cluster, n_samples=3) == 3
    on_gpu = worker_resources(auto, gpu_cluster)
    assert (on_gpu.gpus, on_gpu.cpus, on_gpu.device) == (1, 8, "cuda"), "a GPU each and its share of the CPUs"
    assert worker_count(on_gpu, gpu_cluster, n_samples=40) == 4
    assert worker_resources(EmbedSettings(device="cuda:1"), gpu_cluster).device == "cuda", "Ray pins the GPU"
    shared = worker_resources(auto, gpu_cluster, gpus_per_task=0.5, cpus_per_task=2)
    assert (shared.gpus, shared.cpus) == (0.5, 2) and worker_count(shared, gpu_cluster, n_samples=40) == 8
    assert worker_resources(EmbedSettings(device="cpu"), gpu_cluster).gpus == 0
    with pytest.raises(VirtualSTError, match="cluster has 0"):
        worker_resources(EmbedSettings(device="cuda"), cpu_cluster)
    with pytest.raises(VirtualSTError, match="cannot host"):
        worker_count(worker_resources(auto, cpu_cluster, cpus_per_task=32), cpu_cluster, n_samples=1)


@pytest.mark.ray
def test_a_large_sample_is_sharded_over_the_workers_and_merged(ray_cluster, samples, reference, tmp_path):
    big = samples[2]  # 16 tiles: four shards of one batch
    report = embed_samples_ray([big], tmp_path, SETTINGS, shard_spots=4, show_progress=False)
    final = tmp_path / "efficientnet_lite0" / "s2.h5"
    assert report.paths == [final]
    assert (report.embedded, report.tiles, report.workers) == (1, 16, 2)
    assert_same_cache(final, reference[2])  # batch-aligned shards: the features of a whole-sample run, bit for bit
    assert not shard_root(tmp_path, "s2").parent.exists(), "shards are deleted once merged"


@pytest.mark.ray
def test_finished_shards_are_reused_when_a_sharded_run_is_repeated(ray_cluster, samples, reference, tmp_path):
    big = samples[2]
    second = shard_sample(big, range(4, 8), 1, 4)  # as a killed run would have left it
    with one_thread():
        embed_samples([second], shard_root(tmp_path, "s2"), SETTINGS, show_progress=False)
    report = embed_samples_ray([big], tmp_path, SETTINGS, shard_spots=4, show_progress=False)
    assert report.tiles == 12, "the finished shard is not encoded again"
    assert_same_cache(report.paths[0], reference[2])
