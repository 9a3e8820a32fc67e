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
    assert m["t2v_r1"] == 0.0 and m["t2v_medr"] == 10


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
