"""BF16ScreenIndex: rounding helper, the error bound, exact answers, and KNNHead's use of it."""

from __future__ import annotations

import sys

import faiss
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from virtualst.heads import knn, screened_search  # noqa: E402
from virtualst.heads.knn import KNNHead  # noqa: E402
from virtualst.heads.screened_search import BF16_UNIT, BF16ScreenIndex, candidate_threshold  # noqa: E402

REL = BF16_UNIT / (1 - BF16_UNIT)  # output rounding, relative to the bfloat16 score

#: The bound (and so the screen's exactness) rests on the arithmetic the probe checks.
needs_model = pytest.mark.skipif(not screened_search.bf16_model_holds(), reason="this CPU's bfloat16 products break the error model")


def pairwise_scores(Q: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Every pairwise float32 score the index re-scores with, (n_queries, n_references)."""
    R = np.ascontiguousarray(R, dtype=np.float32)
    return screened_search.pair_scores(Q, R, np.tile(np.arange(len(R)), (len(Q), 1)))


def brute_top_k(Q: np.ndarray, R: np.ndarray, k: int) -> np.ndarray:
    """The k largest pairwise float32 scores per query, ties to the lower index, best first."""
    S = pairwise_scores(Q, R)
    return np.argsort(-S, axis=1, kind="stable")[:, :k]


def assert_pairwise_best_first(scores: np.ndarray, idx: np.ndarray, Q: np.ndarray, R: np.ndarray) -> None:
    """The search's scores are the pairwise float32 scores of its neighbours, best first."""
    np.testing.assert_array_equal(scores, np.take_along_axis(pairwise_scores(Q, R), idx, axis=1))
    assert (np.diff(scores, axis=1) <= 0).all()


def unit(A: np.ndarray) -> np.ndarray:
    return (A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-30)).astype(np.float32)


@pytest.fixture
def clustered():
    """Unit references around 6 tight centres (many near-ties at the k-th score), queries from the same centres."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 96))
    R = unit(centres[rng.integers(0, 6, 4000)] + rng.normal(scale=0.3, size=(4000, 96)))
    Q = unit(centres[rng.integers(0, 6, 70)] + rng.normal(scale=0.3, size=(70, 96)))
    return R, Q


@pytest.fixture
def screened_only(monkeypatch):
    """Fails the test if a search falls back to faiss: what it checks is the screen's own answer."""

    def refuse(*args, **kwargs):
        raise AssertionError("the search fell back to faiss")

    monkeypatch.setattr(screened_search.faiss, "knn", refuse)


def test_bf16_floor_is_the_largest_bfloat16_not_above():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=500), rng.normal(size=200) * 1e-20, [0.0, -0.0, 1.0, -1.0, 0.5 + 2.0**-9, -(0.5 + 2.0**-9)]])
    x = np.concatenate([x, torch.from_numpy(x).to(torch.bfloat16).double().numpy()])  # exact bfloat16 values too
    got = screened_search._bf16_floor(x).double().numpy()
    assert (got <= x).all()
    bits = screened_search._bf16_floor(x).view(torch.int16).numpy().astype(np.int32)
    # One bfloat16 step up (toward +inf) from the result exceeds x: up is +1 in the bits for
    # positives and -1 for negatives (sign-magnitude).
    up_bits = np.where(got >= 0, bits + 1, bits - 1)
    up_bits = np.where(bits == np.int16(-32768), 1, up_bits)  # -0.0 steps to the smallest positive
    up = torch.from_numpy(up_bits.astype(np.int16)).view(torch.bfloat16).double().numpy()
    assert (up > x).all()


@needs_model
@pytest.mark.parametrize("scale", ["unit", "wide"])
def test_bound_covers_every_pair(scale):
    """|shifted bfloat16 score + shift - pairwise float32 score| <= the bound for every pair, also for non-unit vectors."""
    rng = np.random.default_rng(5)
    R = rng.normal(size=(400, 200)).astype(np.float32)
    Q = rng.normal(size=(60, 200)).astype(np.float32)
    if scale == "unit":
        R, Q = unit(R), unit(Q)
    else:  # norms over ~6 decades, entries over more
        R *= np.exp(rng.uniform(-7, 7, size=(400, 1))).astype(np.float32)
        Q *= np.exp(rng.uniform(-7, 7, size=(60, 1))).astype(np.float32)
        R[:, :5] *= 1e3
    v, shift, a = BF16ScreenIndex(R).shifted_scores(Q)
    v = v.double().numpy()
    bound = a[:, None] + REL * np.abs(v)
    err = np.abs(v + shift[:, None] - pairwise_scores(Q, R))
    assert (err <= bound).all()
    if scale == "unit":  # tight enough to screen, and the shift puts the top scores near 0
        assert bound.max() < 0.01 and err.max() > bound.max() / 50
        assert np.abs(np.sort(v, axis=1)[:, -10]).mean() < 0.06 < np.sort(v + shift[:, None], axis=1)[:, -10].mean()


@pytest.mark.parametrize("kth", [0.9, 0.004, 0.0, -0.003, -0.7])
def test_candidates_are_the_scores_whose_upper_bound_reaches_the_kth_lower_bound(kth):
    a = np.array([0.0, 1e-3, 5e-3])
    v = torch.linspace(-1, 1, 20001).to(torch.bfloat16).unique().double().numpy()  # bfloat16 scores
    threshold = candidate_threshold(np.full(3, kth), a)
    for ai, t in zip(a, threshold):
        reaches = v + ai + REL * np.abs(v) >= kth - ai - REL * abs(kth)
        np.testing.assert_array_equal(v >= t, reaches)


@needs_model
@pytest.mark.parametrize("k", [1, 10, 40])
def test_search_equals_brute_force(clustered, screened_only, k):
    R, Q = clustered
    scores, idx = BF16ScreenIndex(R).search(Q, k)
    np.testing.assert_array_equal(idx, brute_top_k(Q, R, k))
    assert_pairwise_best_first(scores, idx, Q, R)


@needs_model
@pytest.mark.parametrize("k", [300, 4000])
def test_k_beyond_a_sixteenth_of_the_references_goes_to_faiss(clustered, k):
    R, Q = clustered
    index = BF16ScreenIndex(R)
    scores, idx = index.search(Q, k)
    assert index.candidates_ == k * len(Q)
    assert_pairwise_best_first(scores, idx, Q, R)


@needs_model
def test_answer_does_not_depend_on_chunking_or_query_order(clustered, screened_only):
    R, Q = clustered
    index = BF16ScreenIndex(R)
    whole = index.search(Q, 10)[1]
    for chunk in (1, 7, 64):
        np.testing.assert_array_equal(index.search(Q, 10, chunk=chunk)[1], whole)
    order = np.random.default_rng(0).permutation(len(Q))
    np.testing.assert_array_equal(index.search(Q[order], 10, chunk=7)[1], whole[order])


@needs_model
def test_ties_go_to_the_lower_index_and_zero_references_work(screened_only):
    rng = np.random.default_rng(2)
    base = unit(rng.normal(size=(1500, 48)))
    R = np.concatenate([base, base[::-1], np.zeros((5, 48), np.float32)])  # every vector twice, and zero rows
    Q = unit(rng.normal(size=(20, 48)))
    _, idx = BF16ScreenIndex(R).search(Q, 12)
    np.testing.assert_array_equal(idx, brute_top_k(Q, R, 12))


@needs_model
def test_a_zero_query_ties_everything():
    rng = np.random.default_rng(2)
    R = unit(rng.normal(size=(3000, 48)))
    Q = np.concatenate([unit(rng.normal(size=(20, 48))), np.zeros((2, 48), np.float32)])
    _, idx = BF16ScreenIndex(R).search(Q, 12)
    np.testing.assert_array_equal(idx, brute_top_k(Q, R, 12))
    assert idx[-1].tolist() == list(range(12))  # the first 12


@needs_model
def test_screen_keeps_few_candidates(screened_only):
    """On unit vectors with spread-out scores the screen re-scores a small share of the references."""
    rng = np.random.default_rng(4)
    R, Q = unit(rng.normal(size=(5000, 64))), unit(rng.normal(size=(40, 64)))
    index = BF16ScreenIndex(R)
    index.search(Q, 10)
    assert 10 * len(Q) <= index.candidates_ < 0.05 * len(R) * len(Q)


@needs_model
def test_dense_chunks_fall_back_to_faiss(monkeypatch):
    """When too many references survive the screen, faiss's brute force answers (same neighbours without ties)."""
    rng = np.random.default_rng(6)
    R, Q = unit(rng.normal(size=(300, 24))), unit(rng.normal(size=(30, 24)))
    monkeypatch.setattr(screened_search, "_DENSE_SHARE", 10**9)  # every chunk counts as dense
    index = BF16ScreenIndex(R)
    scores, idx = index.search(Q, 8, chunk=7)
    assert index.candidates_ == 8 * len(Q)
    np.testing.assert_array_equal(idx, brute_top_k(Q, R, 8))
    assert_pairwise_best_first(scores, idx, Q, R)


@needs_model
def test_near_identical_references_go_to_faiss():
    """Scores all within the bound of each other: the first chunk is dense, faiss searches it and the rest at once."""
    rng = np.random.default_rng(7)
    centre = rng.normal(size=64)
    R = unit(centre + 1e-4 * rng.normal(size=(500, 64)))
    Q = unit(centre + 1e-4 * rng.normal(size=(40, 64)))
    index = BF16ScreenIndex(R)
    scores, idx = index.search(Q, 5, chunk=8)
    assert index.candidates_ == 5 * len(Q)
    assert_pairwise_best_first(scores, idx, Q, R)


def test_top_k_columns_orders_by_score_then_column():
    rng = np.random.default_rng(1)
    S = rng.choice(np.float32([-np.inf, -2.5, -1.0, -0.0, 0.0, 1e-30, 0.5, 0.5, 3.0]), size=(300, 40))
    S[:, :20] = rng.normal(size=(300, 20)).astype(np.float32)
    for k in (1, 7, 40):
        np.testing.assert_array_equal(screened_search._top_k_columns(S, k), np.argsort(-S, axis=1, kind="stable")[:, :k])


def test_rejects_k_out_of_range(clustered):
    R, Q = clustered
    with pytest.raises(ValueError, match=r"k must be in \[1, 4000\], got 4001"):
        BF16ScreenIndex(R).search(Q, 4001)


@pytest.mark.parametrize("bad", ["inf", "nan", "huge"])
def test_rejects_queries_whose_scores_leave_float32(clustered, bad):
    R, Q = clustered
    R, Q = R.copy(), Q.copy()
    if bad == "huge":  # norms 1e19 x 1e19: finite float32 norms, scores past 2^125
        R *= np.float32(1e19)
        Q[3] *= np.float32(1e19)
    else:
        Q[3, 0] = float(bad)
    with pytest.raises(ValueError, match="finite vectors whose norms multiply to < 2\\^125"):
        BF16ScreenIndex(R).search(Q, 5)


def test_error_model_check_accepts_rounding_to_nearest_and_rejects_truncation():
    rng = np.random.default_rng(9)
    a, b = (torch.from_numpy(rng.standard_normal(shape)).to(torch.bfloat16) for shape in ((64, 256), (300, 256)))
    exact = a.double() @ b.double().T
    nearest = exact.float().to(torch.bfloat16)  # float64 -> float32 -> bfloat16: within float32 error of one rounding
    truncated = (exact.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # toward zero
    assert screened_search.obeys_error_model(a, b, nearest)
    assert not screened_search.obeys_error_model(a, b, truncated)
    assert screened_search.obeys_error_model(a, b, a @ b.T) == screened_search.bf16_model_holds()


def test_probes_are_false_without_torch(monkeypatch):
    probes = (screened_search.bf16_model_holds, screened_search.bf16_screen_ok)
    for probe in probes:
        probe.cache_clear()
    monkeypatch.setitem(sys.modules, "torch", None)
    try:
        assert [probe() for probe in probes] == [False, False]
    finally:
        for probe in probes:
            probe.cache_clear()


@needs_model
def test_knn_head_searches_through_the_screen(monkeypatch, screened_only):
    """Forced on (any CPU), the screen gives KNNHead the faiss path's neighbours, CV scores and predictions.

    Spread-out data: with no float32 ties both searches must agree exactly.
    """
    rng = np.random.default_rng(8)
    R, Q = rng.normal(size=(4000, 32)), rng.normal(size=(50, 32))
    Y = R[:, :3] @ rng.normal(size=(3, 4)) + 0.1 * rng.normal(size=(len(R), 4))
    groups = np.arange(len(R)) % 3
    params = {"k_grid": (5, 20), "temperature_grid": (0.03, 0.3), "standardize": False, "n_components": None}
    plain = KNNHead(**params).fit(R, Y, groups=groups)
    assert isinstance(plain._search_index(), faiss.Index)  # 4,000 references: below the screen's minimum
    monkeypatch.setattr(knn, "SCREEN_MIN_REFERENCES", 1)
    monkeypatch.setattr(knn, "bf16_screen_ok", lambda: True)
    screened = KNNHead(**params).fit(R, Y, groups=groups)
    assert isinstance(screened._search_index(), BF16ScreenIndex)
    np.testing.assert_array_equal(screened.cv_scores_, plain.cv_scores_)
    d1, i1 = plain.kneighbors(Q)
    d2, i2 = screened.kneighbors(Q)
    np.testing.assert_array_equal(i2, i1)
    np.testing.assert_array_equal(d2, d1)
    np.testing.assert_array_equal(screened.predict(Q), plain.predict(Q))
