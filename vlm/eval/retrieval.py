"""Text↔video retrieval metrics: recall@K, median and mean rank (ranks are 1-based).

A query whose similarities are not all finite (a diverged model: NaN or inf embeddings) has
no rank (NaN), and any such query makes every metric of its direction NaN: never a score
that looks like success. `retrieval_metrics` also returns "nonfinite", the number of
non-finite entries of the matrix (0 for a healthy model), and logs a warning when it is not 0.
"""

from __future__ import annotations

import numpy as np
from absl import logging

RECALL_AT = (1, 5, 10)


def ground_truth_ranks(sim: np.ndarray) -> np.ndarray:
    """sim [N(query), N(candidate)] with the right answer on the diagonal → rank of it per query.

    float64 [N]: in 1..N, or NaN for a query with any non-finite similarity. Ties count
    against the query (a candidate scoring equal to the right one ranks above it), so a
    constant similarity matrix gives rank N, never a lucky 1.
    """
    sim = np.asarray(sim, np.float64)
    correct = np.diag(sim)[:, None]  # [N, 1]
    ranks = (sim >= correct).sum(axis=1).astype(np.float64)  # [N]; the right answer counts itself
    ranks[~np.isfinite(sim).all(axis=1)] = np.nan  # NaN compares False: its rank would read 0 or too low
    return ranks


def recall_metrics(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@K, MedR, MeanR of 1-based ranks [N]; all NaN if any rank is NaN."""
    ranks = np.asarray(ranks, np.float64)
    if np.isnan(ranks).any():
        return {f"{prefix}_{key}": float("nan") for key in [f"r{k}" for k in RECALL_AT] + ["medr", "meanr"]}
    out = {f"{prefix}_r{k}": float(np.mean(ranks <= k)) for k in RECALL_AT}
    out[f"{prefix}_medr"] = float(np.median(ranks))
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def retrieval_metrics(sim: np.ndarray) -> dict[str, float]:
    """sim [N(text), N(video)], text i describes video i. Keys: t2v_r1 ... v2t_meanr, nonfinite.

    "nonfinite": how many entries of `sim` are NaN or inf; when it is not 0 the other metrics
    are NaN (see the module docstring) and a warning is logged.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity matrix must be square [N, N], got {sim.shape}")
    nonfinite = int(np.size(sim) - np.isfinite(sim).sum())
    if nonfinite:
        logging.warning("retrieval: %d of the %d similarities are NaN or inf (diverged model?); the retrieval"
                        " metrics are NaN", nonfinite, sim.size)
    metrics = {**recall_metrics(ground_truth_ranks(sim), "t2v"), **recall_metrics(ground_truth_ranks(sim.T), "v2t")}
    return {**metrics, "nonfinite": float(nonfinite)}


def format_table(metrics: dict[str, float], num_pairs: int) -> str:
    """A plain-text table: one row per direction, chance R@1 = 1/N for reference."""
    cols = [f"R@{k}" for k in RECALL_AT] + ["MedR", "MeanR"]
    keys = [f"r{k}" for k in RECALL_AT] + ["medr", "meanr"]
    lines = [f"retrieval on {num_pairs} held-out pairs (chance R@1 = {1 / max(num_pairs, 1):.4f})"]
    lines.append(f"{'':<12}" + "".join(f"{c:>9}" for c in cols))
    for prefix, name in (("t2v", "text→video"), ("v2t", "video→text")):
        lines.append(f"{name:<12}" + "".join(f"{metrics[f'{prefix}_{k}']:>9.3f}" for k in keys))
    if metrics.get("nonfinite"):
        lines.append(f"WARNING: {int(metrics['nonfinite'])} similarities are NaN or inf (diverged model?):"
                     " no ranks, metrics NaN")
    return "\n".join(lines) + "\n"


def format_examples(sim: np.ndarray, captions: list[str], num: int = 8) -> str:
    """For the first `num` text queries: the captions of the top-3 retrieved videos."""
    lines = ["text→video examples (query | top-3 retrieved videos, by their captions)"]
    for i in range(min(num, len(captions))):
        top = np.argsort(-sim[i])[:3]
        marks = ["*" if j == i else " " for j in top]
        lines.append(f"{captions[i]!r}")
        lines += [f"   {m} {captions[j]!r} ({sim[i, j]:.3f})" for m, j in zip(marks, top)]
    return "\n".join(lines) + "\n"
