"""Caption metrics with the COCO caption toolkit's definitions: BLEU-4, ROUGE-L, CIDEr-D.

`compute(predictions, references)` returns the keys {"bleu4", "rougeL", "cider"} (`METRIC_KEYS`).

Each metric reproduces pycocoevalcap (github.com/salaniz/pycocoevalcap, the PyPI package; the same
scorers as tylin/coco-caption) on already-tokenised text, in pure Python, without Java:

- BLEU-4 (`Bleu(4)`, option "closest"): corpus level. Clipped n-gram matches (a candidate n-gram
  counts at most as often as in the one reference where it is most frequent) and guesses are
  summed over the corpus; BLEU-4 = (prod_{n=1..4} (correct_n + 1e-15) / (guess_n + 1e-9))^(1/4).
  Each candidate's reference length is the one closest to its own length, the shorter one on a
  tie; lengths are summed over the corpus and, if ratio = (cand + 1e-15) / (ref + 1e-9) < 1,
  the score is multiplied by exp(1 - 1/ratio).
- ROUGE-L (`Rouge`): per candidate, P = LCS/len(candidate) and R = LCS/len(reference) against
  every reference; F = (1 + β²)·maxP·maxR / (maxR + β²·maxP) with β = 1.2 (0 if either max is 0),
  averaged over ids. As in the toolkit (which splits on " "), an empty caption counts as one
  empty token.
- CIDEr-D: the toolkit's `Cider` class, which is vrama91/cider's `CiderD` scorer with
  df_mode="corpus" (the two files are identical line for line; only vrama91's *plain* `Cider`
  lacks the clipping and the length penalty). Over 1..4-grams, document frequencies df(g) = the
  number of ids whose reference set contains g; idf(g) = log(#ids) - log(max(1, df(g))), so a
  term in every reference set weighs 0 and one in none weighs log(#ids). Per order n and per
  reference r: sum_g min(c_g, r_g)·r_g / (|c|·|r|) over the tf-idf vectors of the candidate c
  (clipped by the reference), 0 if a norm is 0, times the Gaussian length penalty
  exp(-(len c - len r)² / (2·6²)); averaged over n (an order absent from a caption scores 0),
  summed over references and divided by their number, ×10, averaged over ids. (The toolkit
  measures length in bigrams; the difference is the same as in words whenever both captions are
  non-empty, and an empty caption scores 0 either way.) With a single id every idf is 0 and so
  is CIDEr-D: use it on evaluation sets, not single captions.

Tokenisation (`tokenize`): lower-case, delete punctuation (every character that is neither a
word character nor whitespace), split on whitespace. The toolkit instead runs the Stanford PTB
tokenizer (Java) and drops punctuation tokens; that differs on contractions and possessives
("don't" → PTB "do n't", here "dont"; "man's" → "man 's" vs "mans") and on punctuation glued
between words ("dog,cat" → here "dogcat"). On text that is already lower-case, free of
punctuation and single-space separated, the scores are the toolkit's to floating-point rounding
(BLEU-4 and ROUGE-L bit for bit; see the cross-check in tests/test_caption_metrics.py).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

METRIC_KEYS = ("bleu4", "rougeL", "cider")
MAX_N = 4  # n-gram orders 1..4 for BLEU and CIDEr-D
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0
_BLEU_TINY = 1e-15  # the toolkit's epsilons: added to numerators ...
_BLEU_SMALL = 1e-9  # ... and denominators: an order with no n-grams gives 1e-6, not 0/0

_PUNCTUATION = re.compile(r"[^\w\s]")

Tokens = list[str]
NgramCounts = Counter  # Counter[tuple[str, ...], int], orders 1..MAX_N together


def tokenize(text: str) -> Tokens:
    """Lower-case, delete punctuation, split on whitespace (the module docstring lists how this
    differs from the toolkit's PTB tokenizer)."""
    return _PUNCTUATION.sub("", text.lower()).split()


def ngram_counts(tokens: Tokens, max_n: int = MAX_N) -> NgramCounts:
    """Counts of every n-gram (as a tuple) of orders 1..max_n."""
    counts = Counter()
    for n in range(1, max_n + 1):
        counts.update(zip(*(tokens[i:] for i in range(n))))  # the n-grams as tuples, built in C
    return counts


# ---------------------------------------------------------------- BLEU-4


def bleu4(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> float:
    """Corpus BLEU-4 of tokenised candidates [N] against their references [N][k_i]."""
    correct, guess = [0] * MAX_N, [0] * MAX_N
    cand_len_total, ref_len_total = 0, 0
    for cand, refs in zip(candidates, references, strict=True):
        max_ref_counts = Counter()  # per n-gram, its largest count in any one reference
        for ref in refs:
            max_ref_counts |= ngram_counts(ref)
        for gram, count in ngram_counts(cand).items():
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
        for n in range(1, MAX_N + 1):
            guess[n - 1] += max(0, len(cand) - n + 1)
        # Closest reference length; on a tie the shorter one (tuples compare distance, then length).
        cand_len_total += len(cand)
        ref_len_total += min((abs(len(ref) - len(cand)), len(ref)) for ref in refs)[1]
    score = 1.0
    for n in range(MAX_N):  # same product order as the toolkit, for identical rounding
        score *= (correct[n] + _BLEU_TINY) / (guess[n] + _BLEU_SMALL)
    score **= 1.0 / MAX_N
    ratio = (cand_len_total + _BLEU_TINY) / (ref_len_total + _BLEU_SMALL)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)  # brevity penalty
    return score


# ---------------------------------------------------------------- ROUGE-L


def lcs_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence (one-row dynamic programme, O(len a · len b))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)  # row[j] = LCS(a[:i], b[:j]) for the current i
    for token in a:
        diagonal = 0  # LCS(a[:i-1], b[:j-1])
        for j, other in enumerate(b, start=1):
            match = diagonal + 1 if token == other else max(row[j], row[j - 1])
            diagonal, row[j] = row[j], match
    return row[-1]


def rouge_l(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> np.ndarray:
    """ROUGE-L F (β = 1.2) per candidate, [N] float64; the toolkit reports the mean."""
    scores = []
    for cand, refs in zip(candidates, references, strict=True):
        cand = cand or [""]  # the toolkit's "".split(" ") == [""]
        precisions, recalls = [], []
        for ref in refs:
            ref = ref or [""]
            lcs = lcs_length(ref, cand)
            precisions.append(lcs / len(cand))
            recalls.append(lcs / len(ref))
        p, r = max(precisions), max(recalls)  # maxima taken separately, possibly from different refs
        b2 = ROUGE_BETA**2
        scores.append((1 + b2) * p * r / (r + b2 * p) if p != 0 and r != 0 else 0.0)
    return np.asarray(scores, np.float64)


# ---------------------------------------------------------------- CIDEr-D


def cider_idf(reference_counts: Sequence[Sequence[NgramCounts]]) -> tuple[dict, float]:
    """(idf of every n-gram seen in the references, idf of an unseen n-gram = log(#ids)).

    reference_counts[i][j]: n-gram counts of reference j of id i. df counts ids, not captions.
    """
    document_frequency = Counter()
    for refs in reference_counts:
        document_frequency.update(set().union(*refs))
    log_num_ids = math.log(len(reference_counts))
    idf = {gram: log_num_ids - math.log(max(1.0, df)) for gram, df in document_frequency.items()}
    return idf, log_num_ids


def _tfidf(counts: NgramCounts, idf: dict, unseen_idf: float) -> tuple[dict, list[float]]:
    """({n-gram: tf·idf}, the L2 norm of each order's part of that vector [MAX_N])."""
    vector = {gram: tf * idf.get(gram, unseen_idf) for gram, tf in counts.items()}
    squared_norms = [0.0] * MAX_N
    for gram, weight in vector.items():
        squared_norms[len(gram) - 1] += weight * weight
    return vector, [math.sqrt(s) for s in squared_norms]


def cider_d(candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]],
            sigma: float = CIDER_SIGMA) -> np.ndarray:
    """CIDEr-D per candidate, [N] float64 (df from these references); the toolkit reports the mean.

    Cost: one pass over every caption's n-grams to count, one to build the idf, one per
    (candidate, reference) pair over the candidate's n-grams: linear in the corpus size.
    """
    reference_counts = [[ngram_counts(r) for r in refs] for refs in references]
    idf, unseen_idf = cider_idf(reference_counts)
    scores = []
    for cand, refs, ref_counts in zip(candidates, references, reference_counts, strict=True):
        cand_vec, cand_norms = _tfidf(ngram_counts(cand), idf, unseen_idf)
        total = 0.0  # summed over references and orders
        for ref, counts in zip(refs, ref_counts):
            ref_vec, ref_norms = _tfidf(counts, idf, unseen_idf)
            dots = [0.0] * MAX_N  # per order: Σ_g min(c_g, r_g) · r_g, the candidate clipped by the reference
            for gram, weight in cand_vec.items():
                ref_weight = ref_vec.get(gram)
                if ref_weight:
                    dots[len(gram) - 1] += min(weight, ref_weight) * ref_weight
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
            for dot, cand_norm, ref_norm in zip(dots, cand_norms, ref_norms):
                if cand_norm != 0 and ref_norm != 0:  # else dot is 0 too; the toolkit leaves it undivided
                    total += penalty * dot / (cand_norm * ref_norm)
        scores.append(10.0 * total / MAX_N / len(refs))
    return np.asarray(scores, np.float64)


# ---------------------------------------------------------------- entry point


def _validated(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]):
    """(ids, candidate tokens, reference tokens) in the references' id order, or a ValueError."""
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise ValueError("predictions and references must be dicts: {id: caption} and {id: [captions]}")
    if not references:
        raise ValueError("no captions to score: references is empty")
    if predictions.keys() != references.keys():
        only_pred = [k for k in predictions if k not in references]
        only_ref = [k for k in references if k not in predictions]
        raise ValueError(f"predictions and references must have the same ids: {len(only_pred)} only in "
                         f"predictions {only_pred[:3]}, {len(only_ref)} only in references {only_ref[:3]}")
    ids = list(references)
    for i in ids:
        if not isinstance(predictions[i], str):
            raise ValueError(f"predictions[{i!r}] must be one caption string, got {type(predictions[i]).__name__}")
        refs = references[i]
        if not isinstance(refs, Sequence) or isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i!r}] must be a list of caption strings, got {refs!r:.80}")
        if len(refs) == 0:
            raise ValueError(f"references[{i!r}] is empty; every id needs at least one reference caption")
    return ids, [tokenize(predictions[i]) for i in ids], [[tokenize(r) for r in references[i]] for i in ids]


def compute(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
    """{"bleu4", "rougeL", "cider"} of predictions {id: caption} against references {id: [captions]}.

    The ids of both dicts must match exactly. Scores are on the toolkit's scale: BLEU-4 and
    ROUGE-L in [0, 1], CIDEr-D in [0, 10] (×10 included).
    """
    _, candidates, refs = _validated(predictions, references)
    return {
        "bleu4": float(bleu4(candidates, refs)),
        "rougeL": float(np.mean(rouge_l(candidates, refs))),
        "cider": float(np.mean(cider_d(candidates, refs))),
    }
