"""Caption metrics: hand-computed BLEU-4, ROUGE-L and CIDEr-D values, and pycocoevalcap when present."""

import math

import numpy as np
import pytest

from vlm.eval import caption_metrics as cm
from vlm.eval.caption_metrics import compute, tokenize


def test_tokenize_lowercases_drops_punctuation_splits_whitespace():
    assert tokenize("A man, riding a Horse!") == ["a", "man", "riding", "a", "horse"]
    assert tokenize("  Two\tdogs\n play... ") == ["two", "dogs", "play"]
    # Punctuation inside a word is deleted, not turned into a split (PTB keeps "t-shirt" whole too).
    assert tokenize("A t-shirt; don't") == ["a", "tshirt", "dont"]
    assert tokenize("?!") == [] and tokenize("") == []


def test_bleu_clips_repeated_ngrams():
    # candidate: a cat sat on the the mat (7 tokens); reference: a cat sat on the mat (6)
    # 1-grams: 7 guesses; "the" twice but once in the reference → 6 correct (unclipped: 7)
    # 2-grams: a·cat cat·sat sat·on on·the the·the the·mat → 6 guesses, 5 correct (not the·the)
    # 3-grams: a·cat·sat cat·sat·on sat·on·the on·the·the the·the·mat → 5 guesses, 3 correct
    # 4-grams: a·cat·sat·on cat·sat·on·the sat·on·the·the on·the·the·mat → 4 guesses, 2 correct
    # brevity: 7 ≥ 6 → 1.  BLEU-4 = (6/7 · 5/6 · 3/5 · 2/4)^(1/4) = (180/840)^(1/4) = (3/14)^(1/4)
    m = compute({0: "a cat sat on the the mat"}, {0: ["a cat sat on the mat"]})
    assert m["bleu4"] == pytest.approx((3 / 14) ** 0.25, rel=1e-9)
    # With the 1e-15 / 1e-9 epsilons an absent order is (1e-15 / 1e-9) = 1e-6, not 0 or 0/0:
    # three-word captions have no 4-grams, so even a perfect one scores (1·1·1·1e-6)^(1/4).
    m = compute({0: "a cat sat"}, {0: ["a cat sat"]})
    assert m["bleu4"] == pytest.approx(1e-6 ** 0.25, rel=1e-6)


def test_bleu_brevity_penalty_uses_closest_reference_length():
    # candidate "a cat sat on the" (5 tokens), every n-gram matches reference 0 → precisions 1.
    # reference lengths 6, 2, 9: distances 1, 3, 4 → closest is 6 (not the shortest 2, not the mean 17/3)
    # BP = exp(1 - 6/5) = exp(-0.2)
    refs = ["a cat sat on the mat", "a dog", "one two three four five six seven eight nine"]
    assert compute({0: "a cat sat on the"}, {0: refs})["bleu4"] == pytest.approx(math.exp(-0.2), rel=1e-8)
    # candidate "a cat sat on" (4): lengths 6 and 2 are both 2 away → the tie goes to the shorter, 2:
    # ratio 4/2 ≥ 1 → no penalty (picking 6 would give exp(1 - 6/4) = exp(-0.5)).
    assert compute({0: "a cat sat on"}, {0: refs[:2]})["bleu4"] == pytest.approx(1.0, rel=1e-8)
    # Corpus level: lengths are summed before the penalty. 9 candidate tokens vs 6 + 2 = 8 → BP 1,
    # whereas a mean of sentence scores would be (exp(-0.2) + 1) / 2.
    m = compute({0: "a cat sat on the", 1: "a cat sat on"}, {0: refs, 1: refs[:2]})
    assert m["bleu4"] == pytest.approx(1.0, rel=1e-8)


def test_rouge_l_takes_max_precision_and_max_recall_separately():
    # candidate "the cat sat on mat" (5 tokens)
    #   ref "the cat is on the mat" (6): LCS the·cat·on·mat = 4 → P = 4/5, R = 4/6
    #   ref "cat sat" (2):               LCS cat·sat = 2        → P = 2/5, R = 2/2
    # maxP = 4/5 (first ref), maxR = 1 (second ref); β² = 1.44
    # F = 2.44 · 0.8 · 1 / (1 + 1.44 · 0.8) = 1.952 / 2.152 = 244/269
    assert cm.lcs_length(tokenize("the cat is on the mat"), tokenize("the cat sat on mat")) == 4
    refs = {"a": ["the cat is on the mat", "cat sat"], "b": ["a cat"]}
    m = compute({"a": "the cat sat on mat", "b": "dog"}, refs)
    # "dog" shares nothing with "a cat" → 0; the mean over ids is (244/269 + 0) / 2.
    assert m["rougeL"] == pytest.approx(122 / 269, rel=1e-12)
    # The toolkit splits on " ", so an empty caption is one empty token: empty vs non-empty → 0,
    # empty vs empty → LCS 1 of length 1 → 1.
    assert compute({0: "..."}, {0: ["a cat"]})["rougeL"] == 0.0
    assert compute({0: "..."}, {0: ["!"]})["rougeL"] == 1.0


def test_cider_idf_from_reference_set():
    counts = [[cm.ngram_counts(tokenize(c)) for c in refs]
              for refs in (["a dog", "a big dog"], ["a cat"], ["a dog runs"])]
    idf, unseen = cm.cider_idf(counts)
    log3 = math.log(3)
    assert unseen == pytest.approx(log3)                        # log(#ids)
    assert idf[("a",)] == 0.0                                   # in all 3 reference sets
    assert idf[("dog",)] == pytest.approx(log3 - math.log(2))   # df counts ids (2), not captions (3)
    assert idf[("a", "dog")] == pytest.approx(log3 - math.log(2))
    assert idf[("cat",)] == pytest.approx(log3)                 # df 1 → log(max(1, 1)) = 0
    # A prediction made only of idf-0 terms scores 0, even when it equals its reference.
    m = compute({0: "a", 1: "a", 2: "a"}, {0: ["a"], 1: ["a"], 2: ["a"]})
    assert m["cider"] == 0.0


def test_cider_identical_prediction_in_a_set_of_several():
    # 3 ids, one reference each; idf(g) = log 3 - log df(g), L = log 3.
    #   id 0: "a dog runs" == its reference. "a" is in every set → weight 0; dog, runs, a·dog,
    #         dog·runs, a·dog·runs are only in id 0 → weight L. Orders 1-3: identical vectors,
    #         clipped dot = Σ v² = |v|² → cosine 1; no 4-grams → order 4 scores 0; equal lengths
    #         → penalty 1. Score = 10 · (1 + 1 + 1 + 0) / 4 / 1 reference = 7.5
    #   ids 1, 2: "x" / "y" share no n-gram with their reference → 0.
    # CIDEr-D = (7.5 + 0 + 0) / 3 = 2.5
    preds = {0: "a dog runs", 1: "x", 2: "y"}
    refs = {0: ["a dog runs"], 1: ["a cat sleeps"], 2: ["a bird sings"]}
    assert compute(preds, refs)["cider"] == pytest.approx(2.5, rel=1e-12)


def test_cider_gaussian_length_penalty_and_clipping():
    # Same corpus, but id 0's reference is "a dog runs fast" (weights: a 0, everything else L).
    #   order 1: cand (dog L, runs L), |c| = L√2; ref (dog, runs, fast) |r| = L√3; dot 2L² → 2/√6
    #   order 2: cand a·dog, dog·runs; ref + runs·fast → likewise 2/√6
    #   order 3: cand a·dog·runs (|c| = L); ref a·dog·runs, dog·runs·fast (|r| = L√2); dot L² → 1/√2
    #   order 4: cand has none → 0
    #   lengths 3 vs 4 → penalty exp(-1² / (2 · 6²)) = exp(-1/72)
    # id 0 = 10 · exp(-1/72) · (2/√6 + 2/√6 + 1/√2 + 0) / 4; ids 1, 2 score 0; CIDEr-D = id 0 / 3
    cands = [tokenize(c) for c in ("a dog runs", "x", "y")]
    refs = [[tokenize(r)] for r in ("a dog runs fast", "a cat sleeps", "a bird sings")]
    cosines = 2 / math.sqrt(6) + 2 / math.sqrt(6) + 1 / math.sqrt(2)
    expected = 10 * math.exp(-1 / 72) * cosines / 4
    np.testing.assert_allclose(cm.cider_d(cands, refs), [expected, 0, 0], rtol=1e-12)
    # Without the penalty (σ → ∞) exactly the factor exp(-1/72) disappears.
    no_penalty = cm.cider_d(cands, refs, sigma=1e12)[0]
    assert cm.cider_d(cands, refs)[0] / no_penalty == pytest.approx(math.exp(-1 / 72), rel=1e-12)

    # Clipping: "dog dog dog" against "dog" (other ids: "a cat", "a bird"; weight of dog = L).
    #   order 1: cand dog 3L, ref dog L → dot min(3L, L) · L = L², norms 3L and L → 1/3 (unclipped: 1)
    #   orders 2-4: the reference has none → 0.  lengths 3 vs 1 → exp(-4/72)
    cands = [tokenize(c) for c in ("dog dog dog", "x", "y")]
    refs = [[tokenize(r)] for r in ("dog", "a cat", "a bird")]
    assert cm.cider_d(cands, refs)[0] == pytest.approx(10 * math.exp(-4 / 72) * (1 / 3) / 4, rel=1e-12)


def test_perfect_predictions():
    refs = {i: [f"a person number {i} is doing thing {i}", "someone does something"] for i in range(4)}
    preds = {i: refs[i][0].upper() + "." for i in range(4)}  # case and punctuation do not count
    m = compute(preds, refs)
    assert set(m) == set(cm.METRIC_KEYS)
    assert m["bleu4"] == pytest.approx(1.0, rel=1e-9)
    assert m["rougeL"] == 1.0
    # CIDEr-D has no fixed maximum here (the second reference disagrees, shared words weigh less),
    # but a perfect prediction must beat one that matches only the generic reference.
    wrong = compute({i: "someone does something" for i in range(4)}, refs)
    assert m["cider"] > wrong["cider"] and wrong["bleu4"] < 1.0


def test_bad_input_is_one_line_value_error():
    with pytest.raises(ValueError, match=r"same ids: 1 only in predictions \['c'\], 1 only in references \['b'\]"):
        compute({"a": "x", "c": "y"}, {"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match=r"references\['a'\] is empty"):
        compute({"a": "x"}, {"a": []})
    with pytest.raises(ValueError, match="list of caption strings"):
        compute({"a": "x"}, {"a": "x"})  # a bare string would otherwise be read as characters
    with pytest.raises(ValueError, match="one caption string"):
        compute({"a": ["x"]}, {"a": ["x"]})
    with pytest.raises(ValueError, match="references is empty"):
        compute({}, {})


def _random_corpus(rng, num_ids, vocab=12, max_len=12):
    words = [f"w{i}" for i in range(vocab)]
    caption = lambda: " ".join(rng.choice(words, size=rng.integers(0, max_len + 1)))  # noqa: E731
    preds = {i: caption() for i in range(num_ids)}
    refs = {i: [caption() for _ in range(rng.integers(1, 6))] for i in range(num_ids)}
    return preds, refs


def test_matches_pycocoevalcap_when_installed():
    bleu = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="optional cross-check: pip install pycocoevalcap")
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    cider = pytest.importorskip("pycocoevalcap.cider.cider")  # = vrama91 CiderD, df_mode="corpus"
    rng = np.random.default_rng(0)
    for trial in range(20):
        preds, refs = _random_corpus(rng, num_ids=int(rng.integers(2, 30)))
        res, gts = {i: [p] for i, p in preds.items()}, refs  # already tokenised: lower-case, spaces
        ours = compute(preds, refs)
        assert ours["bleu4"] == pytest.approx(bleu.Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-12)
        assert ours["rougeL"] == pytest.approx(rouge.Rouge().compute_score(gts, res)[0], abs=1e-12)
        assert ours["cider"] == pytest.approx(cider.Cider().compute_score(gts, res)[0], abs=1e-12)
