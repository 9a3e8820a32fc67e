"""Generation metrics, scored by the project's own dual encoder (pure numpy on its embeddings).

- `prompt_top1`: for each generated video, is its own prompt the scorer's top match among the
  held-out prompts (ties count against it). Chance is 1 / number of prompts.
- `frechet_distance`: between Gaussians fitted to the scorer's video embeddings of generated and of
  real held-out videos (FID's formula on our encoder's features).
- `attribute_scores`: on the synthetic set, for each attribute (colour, shape, size, direction,
  speed), the share of generated videos whose scorer similarity to their prompt beats the same
  prompt with that attribute changed. 0.5 is chance; 1 means the attribute is always right.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

ATTRIBUTES = ("colour", "shape", "size", "direction", "speed")


def prompt_top1(sim: np.ndarray) -> float:
    """sim [N(videos), N(prompts)], video i generated from prompt i → share with prompt i ranked first.

    A video whose similarities are not all finite counts as a miss; so does a tie with its prompt.
    """
    sim = np.asarray(sim, np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity matrix must be square [N, N], got {sim.shape}")
    own = np.diag(sim)[:, None]
    hits = ((sim >= own).sum(1) == 1) & np.isfinite(sim).all(1)
    return float(hits.mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½) between feature sets a [N, D] and b [M, D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets [N ≥ 2, D] of the same D, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(root):  # numerical noise: the product of two PSD matrices has a real square root
        root = root.real
    return float(np.sum(np.square(mu_a - mu_b)) + np.trace(cov_a + cov_b - 2.0 * root))


def changed_caption(caption: str, attribute: str) -> str:
    """The synthetic caption with `attribute` of its first object moved to the next value."""
    from input_pipeline import synthetic

    objects = synthetic.parse_caption(caption)
    counts = {"colour": len(synthetic.COLOUR_NAMES), "shape": len(synthetic.SHAPE_NAMES),
              "size": len(synthetic.SIZE_NAMES), "direction": len(synthetic.DIRECTION_NAMES),
              "speed": len(synthetic.SPEED_NAMES)}
    first = objects[0]
    objects[0] = first._replace(**{attribute: (getattr(first, attribute) + 1) % counts[attribute]})
    return synthetic.caption_of(objects)


def attribute_scores(video_emb: np.ndarray, prompt_emb: np.ndarray, changed_emb: dict[str, np.ndarray]
                     ) -> dict[str, float]:
    """video_emb, prompt_emb [N, E] (pair i ↔ i), changed_emb {attribute: [N, E]} → {attribute: share}."""
    own = np.sum(np.asarray(video_emb) * np.asarray(prompt_emb), -1)
    return {name: float(np.mean(own > np.sum(np.asarray(video_emb) * np.asarray(other), -1)))
            for name, other in changed_emb.items()}
