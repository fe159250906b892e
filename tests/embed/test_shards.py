"""Shards of a large sample: sizes, row ranges, sub-samples, merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virtualst.embed.cache import read_embeddings
from virtualst.embed.encoders import load_encoder
from virtualst.embed.runner import EmbedSettings, FeatureExtractor, embed_with, open_cache_writer, plan_job
from virtualst.embed.shards import MIN_SHARD_SPOTS, merge_shards, shard_ranges, shard_root, shard_sample, shard_size

from .conftest import make_sample

SETTINGS = EmbedSettings(batch_size=4, device="cpu")


def test_shard_size_is_a_whole_number_of_batches():
    assert shard_size(100_000, 4, 256) == 25_088  # 25,000 rounded up to 98 batches of 256
    assert shard_size(3_000, 4, 16) == MIN_SHARD_SPOTS, "no shards below the minimum"
    assert shard_size(100_000, 1, 16) == 0, "one worker: no shards"
    assert shard_size(100_000, 4, 16, requested=0) == 0
    assert shard_size(100, 4, 16, requested=20) == 32


def test_shard_ranges_cover_every_row_once():
    assert shard_ranges(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert shard_ranges(8, 4) == [range(0, 4), range(4, 8)]


def test_shard_sample_is_a_named_slice(toy_sample):
    shard = shard_sample(toy_sample, range(4, 8), 1, 4)
    assert shard.sample_id == "toy.shard0002of0004"
    np.testing.assert_array_equal(shard.barcodes, toy_sample.barcodes[4:8])
    np.testing.assert_array_equal(shard.centers, toy_sample.centers[4:8])
    assert shard.image is toy_sample.image and toy_sample.sample_id == "toy"


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(load_encoder("efficientnet_lite0"), torch.device("cpu"))


def test_merged_shards_equal_a_whole_sample_run(toy_sample, extractor, tmp_path):
    (whole,) = embed_with(extractor, [toy_sample], tmp_path / "whole", SETTINGS)
    ranges = shard_ranges(toy_sample.n_spots, 8)
    shards = embed_with(extractor, [shard_sample(toy_sample, r, k, 2) for k, r in enumerate(ranges)], shard_root(tmp_path, "toy"), SETTINGS)
    job = plan_job(toy_sample, extractor.encoder, extractor.device, tmp_path, SETTINGS)
    merged = merge_shards(open_cache_writer(job, 1280, SETTINGS), toy_sample.barcodes, shards)
    got, want = read_embeddings(merged), read_embeddings(whole)
    np.testing.assert_array_equal(got.features, want.features)
    np.testing.assert_array_equal(got.barcodes, want.barcodes)
    assert got.attrs["fingerprint"] == want.attrs["fingerprint"] and got.attrs["sample_id"] == "toy" and got.attrs["complete"]


def test_shards_out_of_order_are_refused(tmp_path, extractor):
    sample = make_sample(tmp_path, n_side=3)
    ranges = shard_ranges(sample.n_spots, 4)
    shards = embed_with(extractor, [shard_sample(sample, r, k, 3) for k, r in enumerate(ranges)], shard_root(tmp_path, "toy"), SETTINGS)
    job = plan_job(sample, extractor.encoder, extractor.device, tmp_path, SETTINGS)
    with pytest.raises(RuntimeError, match="do not follow row 0"):
        merge_shards(open_cache_writer(job, 1280, SETTINGS), sample.barcodes, shards[::-1])
    assert not job.path.exists(), "no complete cache from a failed merge"
