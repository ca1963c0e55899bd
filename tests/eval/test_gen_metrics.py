"""Generative metrics against the libraries that define them: corpus BLEU / chrF equal
sacrebleu's own `corpus_bleu` / `corpus_chrf` (one reference, several, a variable number, an
empty output), ROUGE-L equals rouge-score's best-reference F-measure, the bootstrap stderr equals
the spread of sacrebleu's corpus scores of the same resamples, exact match follows lm-eval's
options, and a bad metric_list is one DataError."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from fastserve.errors import DataError
from fastserve.eval.gen_metrics import (
    BOOTSTRAP_SEED,
    MetricSpec,
    bootstrap_stderr,
    corpus_score,
    exact_match_scores,
    parse_metric_list,
    score_outputs,
)

OUTPUTS = [
    "The cat sat on the mat near the door.",
    "A server answers every request in order.",
    "",  # an empty output
    "Tokens wait in the queue until a block is free.",
    "the model caches the keys and the values",
    "Le chat est assis sur le tapis.",
]
REFS = [
    ["The cat sat on the mat by the door.", "A cat was sitting on the mat near the door."],
    ["The server answers each request in order."],
    ["Nothing was generated here."],
    ["Tokens wait in a queue until some block is free.", "Tokens queue until a block frees."],
    ["The model caches keys and values."],
    ["Le chat est assis sur le tapis.", "Un chat est sur le tapis."],
]
ALL = [MetricSpec(n) for n in ("exact_match", "bleu", "chrf", "rouge_l")]


def _streams(refs):
    width = max(map(len, refs))
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


def test_bleu_and_chrf_equal_sacrebleu():
    single = [r[:1] for r in REFS]
    metrics, _ = score_outputs(OUTPUTS, single, ALL, bootstrap_iters=0)
    assert metrics["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(OUTPUTS, [[r[0] for r in REFS]]).score, abs=1e-9
    )
    assert metrics["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(OUTPUTS, [[r[0] for r in REFS]]).score, abs=1e-9
    )
    assert 0 < metrics["bleu"] < 100 and metrics["bleu_stderr"] is None

    # a variable number of references: sacrebleu's None-padded streams
    metrics, _ = score_outputs(OUTPUTS, REFS, ALL, bootstrap_iters=0)
    want_bleu = sacrebleu.corpus_bleu(OUTPUTS, _streams(REFS)).score
    assert metrics["bleu"] == pytest.approx(want_bleu, abs=1e-9)
    assert metrics["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(OUTPUTS, _streams(REFS)).score, abs=1e-9
    )
    assert metrics["bleu"] != pytest.approx(
        sacrebleu.corpus_bleu(OUTPUTS, [[r[0] for r in REFS]]).score
    )

    # two references for every doc
    two = [[r[0], r[-1] + " indeed"] for r in REFS]
    metrics, _ = score_outputs(OUTPUTS, two, ALL[1:3], bootstrap_iters=0)
    streams = [[r[0] for r in two], [r[1] for r in two]]
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(OUTPUTS, streams).score, abs=1e-9)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(OUTPUTS, streams).score, abs=1e-9)


def test_rouge_l_equals_rouge_score_best_reference():
    metrics, per_doc = score_outputs(OUTPUTS, REFS, ALL, bootstrap_iters=0, per_doc=True)
    scorer = RougeScorer(["rougeL"])
    want = [
        100 * scorer.score_multi(refs, out)["rougeL"].fmeasure for out, refs in zip(OUTPUTS, REFS)
    ]
    assert [d["rouge_l"] for d in per_doc] == pytest.approx(want, abs=1e-12)
    assert per_doc[2]["rouge_l"] == 0.0  # the empty output
    assert metrics["rouge_l"] == pytest.approx(np.mean(want), abs=1e-12)
    assert metrics["rouge_l_stderr"] == pytest.approx(np.std(want, ddof=1) / np.sqrt(len(want)))
    # per-doc BLEU / chrF of the samples: sacrebleu's sentence scores
    for d, out, refs in zip(per_doc, OUTPUTS, REFS):
        assert d["bleu"] == pytest.approx(sacrebleu.sentence_bleu(out, refs).score, abs=1e-9)
        assert d["chrf"] == pytest.approx(sacrebleu.sentence_chrf(out, refs).score, abs=1e-9)


def test_bootstrap_stderr_is_the_spread_of_sacrebleu_scores_of_resampled_docs():
    iters, n = 40, len(OUTPUTS)
    for name, corpus in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)):
        score, metric, stats = corpus_score(name, OUTPUTS, REFS)
        rng = np.random.default_rng(BOOTSTRAP_SEED)  # the draws bootstrap_stderr makes
        scores = []
        for _ in range(iters):
            idx = rng.integers(0, n, size=n)
            refs = [REFS[i] for i in idx]
            scores.append(corpus([OUTPUTS[i] for i in idx], _streams(refs)).score)
        got = bootstrap_stderr(metric, stats, iters)
        assert got == pytest.approx(np.std(scores, ddof=1), rel=1e-9), name
        assert got > 0
        assert (
            bootstrap_stderr(metric, stats, 1) is None
            and bootstrap_stderr(metric, stats[:1], 9) is None
        )


def test_exact_match_options():
    outs = [" Paris", "PARIS!", "paris 2024", "Lyon", "the answer is 42", ""]
    refs = [["Paris"], ["paris"], ["Paris"], ["Nice", "Lyon"], ["42"], [""]]
    em = lambda **kw: exact_match_scores(outs, refs, MetricSpec("exact_match", **kw))  # noqa: E731
    assert em() == [0, 0, 0, 1, 0, 1]  # lm-eval: exact strings, max over references
    assert em(strip=True) == [1, 0, 0, 1, 0, 1]
    assert em(ignore_case=True, ignore_punctuation=True) == [0, 1, 0, 1, 0, 1]
    assert em(ignore_case=True, ignore_numbers=True, strip=True) == [1, 0, 0, 1, 0, 1]
    # lm-eval's order: regexes first, digits later ("paris 2024" -> "paris ", its space stays)
    assert em(ignore_case=True, ignore_numbers=True, regexes_to_ignore=(r"\s+$",)) == [
        0,
        0,
        0,
        1,
        0,
        1,
    ]
    assert em(ignore_case=True, regexes_to_ignore=(r"\s*\d+$",)) == [0, 0, 1, 1, 0, 1]
    assert em(regexes_to_ignore=(r"^the answer is ", r"^\s+")) == [1, 0, 0, 1, 1, 1]
    metrics, _ = score_outputs(outs, refs, [MetricSpec("exact_match", strip=True)])
    assert metrics["exact_match"] == pytest.approx(0.5)
    assert metrics["exact_match_stderr"] == pytest.approx(
        np.std([1, 0, 0, 1, 0, 1], ddof=1) / np.sqrt(6)
    )


def test_metric_list_parsing():
    specs = parse_metric_list(
        [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
             "ignore_case": True, "regexes_to_ignore": [",", r"\$"]},
            "bleu",
            {"metric": "rouge_l"},
        ],
        "t.yaml",
    )  # fmt: skip
    assert specs[0] == MetricSpec("exact_match", ignore_case=True, regexes_to_ignore=(",", r"\$"))
    assert [s.name for s in specs] == ["exact_match", "bleu", "rouge_l"]
    bad = [
        ([{"metric": "meteor"}], "unknown metric 'meteor'"),
        ([{"metric": "bleu", "ignore_case": True}], "metric bleu has no option 'ignore_case'"),
        ([{"metric": "exact_match", "ignore_cases": True}], "no option 'ignore_cases'"),
        ([{"metric": "exact_match", "ignore_case": "yes"}], "must be true or false"),
        ([{"metric": "exact_match", "regexes_to_ignore": ["("]}], "is not a regex"),
        ([{"metric": "bleu", "aggregation": "mean"}], "aggregates by 'bleu'"),
        (["bleu", "bleu"], "listed twice"),
        ([], "non-empty list"),
        ([{"ignore_case": True}], "needs a 'metric' name"),
    ]
    for value, message in bad:
        with pytest.raises(DataError, match="^t.yaml: .*" + message.replace("(", r"\(")):
            parse_metric_list(value, "t.yaml")
