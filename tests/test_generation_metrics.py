"""Generation metrics on hand-made embeddings: prompt top-1, Fréchet distance, attribute preference."""

import numpy as np
import pytest

from vlm.eval import generation


def test_prompt_top1_counts_own_prompt_first_and_ties_as_misses():
    sim = np.array([[0.9, 0.1, 0.2],   # hit
                    [0.5, 0.4, 0.1],   # miss: prompt 0 beats its own
                    [0.3, 0.3, 0.3]])  # tie: a miss
    assert generation.prompt_top1(sim) == pytest.approx(1 / 3)
    assert generation.prompt_top1(np.eye(4)) == 1.0
    assert generation.prompt_top1(np.full((4, 4), np.nan)) == 0.0  # never success on garbage


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = 2.0 * rng.normal(size=(20000, 3)) + np.array([1.0, 0.0, -1.0])
    # ‖μ‖² = 2; covariances I and 4I: Tr(I + 4I − 2·2I) = 3·(1 + 4 − 4) = 3.  Total 5.
    assert generation.frechet_distance(a, b) == pytest.approx(5.0, rel=0.03)
    assert generation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(generation.frechet_distance(a, np.full_like(a, np.nan)))
    with pytest.raises(ValueError, match="same D"):
        generation.frechet_distance(a, b[:, :2])


def test_changed_caption_moves_one_attribute_of_the_first_object():
    caption = "a large red circle moves left quickly"
    assert generation.changed_caption(caption, "colour") == "a large green circle moves left quickly"
    assert generation.changed_caption(caption, "shape") == "a large red square moves left quickly"
    assert generation.changed_caption(caption, "size") == "a small red circle moves left quickly"
    assert generation.changed_caption(caption, "direction") == "a large red circle moves right quickly"
    assert generation.changed_caption(caption, "speed") == "a large red circle moves left slowly"
    with pytest.raises(ValueError):
        generation.changed_caption("a dog", "colour")


def test_attribute_scores_compare_prompt_with_the_changed_prompt():
    video = np.array([[1.0, 0.0], [0.0, 1.0]])
    prompt = np.array([[1.0, 0.0], [0.0, 1.0]])
    changed = {"colour": np.array([[0.0, 1.0], [0.0, 1.0]])}  # video 0 prefers its prompt, video 1 ties
    assert generation.attribute_scores(video, prompt, changed) == {"colour": 0.5}
