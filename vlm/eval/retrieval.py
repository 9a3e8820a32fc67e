"""Text↔video retrieval metrics: recall@K, median and mean rank (ranks are 1-based)."""

from __future__ import annotations

import numpy as np

RECALL_AT = (1, 5, 10)


def ground_truth_ranks(sim: np.ndarray) -> np.ndarray:
    """sim [N(query), N(candidate)] with the right answer on the diagonal → rank of it per query.

    Ties count against the query (a candidate scoring equal to the right one ranks above it),
    so a constant similarity matrix gives rank N, never a lucky 1.
    """
    sim = np.asarray(sim, np.float64)
    correct = np.diag(sim)[:, None]
    return (sim >= correct).sum(axis=1)  # [N], in 1..N


def recall_metrics(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": float(np.mean(ranks <= k)) for k in RECALL_AT}
    out[f"{prefix}_medr"] = float(np.median(ranks))
    out[f"{prefix}_meanr"] = float(np.mean(ranks))
    return out


def retrieval_metrics(sim: np.ndarray) -> dict[str, float]:
    """sim [N(text), N(video)], text i describes video i. Keys: t2v_r1 ... v2t_meanr."""
    sim = np.asarray(sim)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity matrix must be square [N, N], got {sim.shape}")
    return {**recall_metrics(ground_truth_ranks(sim), "t2v"), **recall_metrics(ground_truth_ranks(sim.T), "v2t")}


def format_table(metrics: dict[str, float], num_pairs: int) -> str:
    """A plain-text table: one row per direction, chance R@1 = 1/N for reference."""
    cols = [f"R@{k}" for k in RECALL_AT] + ["MedR", "MeanR"]
    keys = [f"r{k}" for k in RECALL_AT] + ["medr", "meanr"]
    lines = [f"retrieval on {num_pairs} held-out pairs (chance R@1 = {1 / max(num_pairs, 1):.4f})"]
    lines.append(f"{'':<12}" + "".join(f"{c:>9}" for c in cols))
    for prefix, name in (("t2v", "text→video"), ("v2t", "video→text")):
        lines.append(f"{name:<12}" + "".join(f"{metrics[f'{prefix}_{k}']:>9.3f}" for k in keys))
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
