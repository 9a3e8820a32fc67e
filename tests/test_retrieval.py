import numpy as np
import pytest

from vlm.eval import retrieval


def test_perfect_and_reversed_rankings():
    n = 20
    perfect = retrieval.retrieval_metrics(np.eye(n))
    assert perfect["t2v_r1"] == perfect["v2t_r1"] == 1.0
    assert perfect["t2v_medr"] == 1.0 and perfect["t2v_meanr"] == 1.0
    # The right answer always scores lowest: rank N for everyone.
    worst = retrieval.retrieval_metrics(-np.eye(n))
    assert worst["t2v_r10"] == 0.0 and worst["t2v_medr"] == n


def test_known_ranks_and_directions():
    # text 0 → video 0 at rank 1; text 1 → video 1 at rank 2; text 2 → video 2 at rank 3.
    sim = np.array([[0.9, 0.1, 0.0],
                    [0.8, 0.5, 0.1],
                    [0.7, 0.6, 0.2]])
    np.testing.assert_array_equal(retrieval.ground_truth_ranks(sim), [1, 2, 3])
    m = retrieval.retrieval_metrics(sim)
    assert m["t2v_r1"] == pytest.approx(1 / 3)
    assert m["t2v_medr"] == 2 and m["t2v_meanr"] == 2
    # video→text uses columns: video 0 best matches text 0 (0.9), video 1: 0.5 vs 0.6 → rank 2.
    np.testing.assert_array_equal(retrieval.ground_truth_ranks(sim.T), [1, 2, 1])


def test_ties_do_not_count_as_hits():
    m = retrieval.retrieval_metrics(np.ones((10, 10)))
    assert m["t2v_r1"] == 0.0 and m["t2v_medr"] == 10 and m["t2v_meanr"] == 10 and m["v2t_meanr"] == 10
    assert m["nonfinite"] == 0
    # A tie with one other candidate costs one place; a tie below the right answer costs nothing.
    sim = np.array([[0.5, 0.5, 0.1],
                    [0.2, 0.7, 0.7],
                    [0.3, 0.3, 0.9]])
    np.testing.assert_array_equal(retrieval.ground_truth_ranks(sim), [2, 2, 1])
    np.testing.assert_array_equal(retrieval.ground_truth_ranks(sim.T), [1, 1, 1])  # columns: no ties above


def test_ranks_are_1_based_and_within_n():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 30):
        sim = rng.integers(0, 3, (n, n)).astype(np.float32)  # many ties
        for matrix in (sim, sim.T):
            ranks = retrieval.ground_truth_ranks(matrix)
            assert ranks.min() >= 1 and ranks.max() <= n
            # Rank = 1 + the number of other candidates scoring at least the right one's score.
            expected = [1 + sum(matrix[i, j] >= matrix[i, i] for j in range(n) if j != i) for i in range(n)]
            np.testing.assert_array_equal(ranks, expected)


_METRICS = [f"{d}_{k}" for d in ("t2v", "v2t") for k in ("r1", "r5", "r10", "medr", "meanr")]


def test_nan_similarities_give_nan_metrics_never_perfect_ones():
    # A diverged model: NaN everywhere. `sim >= correct` is all False, which used to read as rank 0
    # (R@1 = 1, MedR = 0).
    m = retrieval.retrieval_metrics(np.full((8, 8), np.nan, np.float32))
    assert all(np.isnan(m[key]) for key in _METRICS), m
    assert m["nonfinite"] == 64
    assert np.isnan(retrieval.ground_truth_ranks(np.full((3, 3), np.nan))).all()
    table = retrieval.format_table(m, num_pairs=8)
    assert "nan" in table and "WARNING: 64 similarities are NaN or inf" in table


def test_some_non_finite_rows_make_every_metric_nan():
    sim = np.eye(6)
    sim[2] = np.nan  # one text query diverged: every video's column now holds a NaN too
    sim[4, 0] = np.inf  # a non-diagonal inf in another row
    ranks = retrieval.ground_truth_ranks(sim)
    np.testing.assert_array_equal(ranks, [1, 1, np.nan, 1, np.nan, 1])
    m = retrieval.retrieval_metrics(sim)
    assert all(np.isnan(m[key]) for key in _METRICS), m
    assert m["nonfinite"] == 7
    # A NaN off the diagonal of an otherwise perfect matrix must not pass as perfect either.
    sim = np.eye(6)
    sim[0, 3] = np.nan
    m = retrieval.retrieval_metrics(sim)
    assert np.isnan(m["t2v_r1"]) and np.isnan(m["v2t_r1"]) and m["nonfinite"] == 1


def test_random_similarity_is_near_chance():
    rng = np.random.default_rng(0)
    m = retrieval.retrieval_metrics(rng.normal(size=(500, 500)))
    assert 0.0 <= m["t2v_r1"] < 0.02
    assert abs(m["t2v_meanr"] - 250.5) < 25


def test_table_lists_both_directions():
    table = retrieval.format_table(retrieval.retrieval_metrics(np.eye(4)), num_pairs=4)
    assert "text→video" in table and "video→text" in table and "0.2500" in table


def test_non_square_is_an_error():
    with pytest.raises(ValueError, match="square"):
        retrieval.retrieval_metrics(np.zeros((3, 4)))
