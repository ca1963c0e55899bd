"""Metrics of generative tasks: pure functions of the outputs and their references (strings).

    specs = parse_metric_list([{"metric": "exact_match", "ignore_case": True}, "bleu"], where)
    metrics, per_doc = score_outputs(outputs, references, specs, bootstrap_iters=1000)
    metrics["bleu"], metrics["bleu_stderr"], per_doc[0]["exact_match"]

`references[i]` holds one or more reference strings of doc i. The metrics, with
lm-evaluation-harness 0.4's names and conventions for `generate_until` tasks:

- `exact_match` (0-1): a doc scores 1 when its output equals one of its references after the
  options, applied to both in lm-eval's order (`exact_match_hf_evaluate`): `regexes_to_ignore`
  (each `re.sub(regex, "", s)`), `ignore_case` (lower), `ignore_punctuation` (the characters of
  `string.punctuation` deleted), `ignore_numbers` (digits deleted). FastServe adds `strip`
  (str.strip() of both, before the others): lm-eval's default filter (take the first output)
  strips nothing, so " Paris" != "Paris" there; the default metric list turns it on. Mean over
  docs.
- `bleu`, `chrf` (0-100): sacrebleu's corpus BLEU (tokenizer 13a, exponential smoothing) and chrF
  (character 6-grams, beta 2), with sacrebleu's defaults, as lm-eval's `bleu` / `chrf`
  aggregations (`sacrebleu.corpus_bleu(outputs, refs).score`). Several references: sacrebleu's
  reference streams; a doc with fewer references than another is padded with None, sacrebleu's
  convention for a variable number of references.
- `rouge_l` (0-100): rouge-score's `RougeScorer(["rougeL"])` F-measure (its default tokenizer:
  lowercase, runs of [a-z0-9], so letters outside ASCII are dropped; no stemming) against the
  best reference, mean over docs, times 100.

Standard errors: exact_match and rouge_l, the sample standard deviation over docs / sqrt(n)
(lm-eval's `mean_stderr`); bleu and chrf, the sample standard deviation of the corpus score over
`bootstrap_iters` resamples of the docs with replacement (lm-eval's `bootstrap_stderr`, which
uses 100 resamples for these), drawn by numpy's default_rng(BOOTSTRAP_SEED). A resample's score
comes from the docs' sufficient statistics (n-gram matches, lengths) summed, which is how
sacrebleu computes a corpus score and its own bootstrap (`_extract_corpus_statistics`,
`_compute_score_from_stats`): it equals sacrebleu's corpus score of the resampled docs. None
below two docs or with bootstrap_iters < 2.

Per-doc scores (for logged samples): exact_match and rouge_l as above, and sacrebleu's
sentence-level BLEU (effective order) and chrF; the corpus BLEU / chrF is not their mean.
Knows nothing about models, tasks files or the results schema.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastserve.errors import DataError
from fastserve.eval.stats import stderr

__all__ = [
    "BOOTSTRAP_SEED",
    "DEFAULT_METRICS",
    "METRICS",
    "MetricSpec",
    "bootstrap_stderr",
    "corpus_score",
    "exact_match_scores",
    "parse_metric_list",
    "rouge_l_scores",
    "score_outputs",
]

METRICS = ("exact_match", "bleu", "chrf", "rouge_l")
# lm-eval's aggregation of each metric (a metric_list entry may name it; another one is an error)
AGGREGATIONS = {"exact_match": "mean", "bleu": "bleu", "chrf": "chrf", "rouge_l": "mean"}
_BOOL_OPTIONS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "strip")
_LM_EVAL_KEYS = ("metric", "aggregation", "higher_is_better")
BOOTSTRAP_SEED = 1234
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_DIGITS = str.maketrans("", "", string.digits)


@dataclass(frozen=True)
class MetricSpec:
    """One metric_list entry: a metric and (exact_match only) its options."""

    name: str  # one of METRICS
    ignore_case: bool = False
    ignore_punctuation: bool = False
    ignore_numbers: bool = False
    regexes_to_ignore: tuple[str, ...] = ()
    strip: bool = False  # FastServe's: strip leading / trailing whitespace first

    def describe(self) -> dict[str, Any]:
        """The entry as the results record it (the options only for exact_match)."""
        if self.name != "exact_match":
            return {"metric": self.name}
        options = {k: getattr(self, k) for k in _BOOL_OPTIONS}
        return {"metric": self.name, **options, "regexes_to_ignore": list(self.regexes_to_ignore)}


# jsonl tasks and YAML tasks without metric_list: all four, exact match after stripping
DEFAULT_METRICS = (
    MetricSpec("exact_match", strip=True),
    MetricSpec("bleu"),
    MetricSpec("chrf"),
    MetricSpec("rouge_l"),
)


def _spec(item: Any, where: str) -> MetricSpec:
    if isinstance(item, str):
        item = {"metric": item}
    if not isinstance(item, dict) or not isinstance(item.get("metric"), str):
        raise DataError(f"{where}: a metric_list entry needs a 'metric' name, got {item!r:.60}.")
    name = item["metric"]
    if name not in METRICS:
        raise DataError(f"{where}: unknown metric {name!r} (known: {', '.join(METRICS)}).")
    if item.get("aggregation", AGGREGATIONS[name]) != AGGREGATIONS[name]:
        raise DataError(
            f"{where}: metric {name} aggregates by {AGGREGATIONS[name]!r}, "
            f"not {item['aggregation']!r}."
        )
    if item.get("higher_is_better", True) is not True:
        raise DataError(f"{where}: higher is better for metric {name}.")
    options = {k: v for k, v in item.items() if k not in _LM_EVAL_KEYS}
    allowed = (*_BOOL_OPTIONS, "regexes_to_ignore") if name == "exact_match" else ()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = f" (known: {', '.join(allowed)})" if allowed else ""
        raise DataError(f"{where}: metric {name} has no option {unknown[0]!r}{known}.")
    for key in _BOOL_OPTIONS:
        if key in options and not isinstance(options[key], bool):
            raise DataError(f"{where}: {name} option {key} must be true or false.")
    regexes = options.get("regexes_to_ignore", [])
    regexes = [regexes] if isinstance(regexes, str) else regexes
    if not isinstance(regexes, list) or not all(isinstance(r, str) for r in regexes):
        raise DataError(f"{where}: regexes_to_ignore must be a list of regular expressions.")
    for r in regexes:
        try:
            re.compile(r)
        except re.error as e:
            raise DataError(f"{where}: regexes_to_ignore {r!r} is not a regex ({e}).") from None
    options["regexes_to_ignore"] = tuple(regexes)
    return MetricSpec(name, **options)


def parse_metric_list(value: Any, where: str) -> tuple[MetricSpec, ...]:
    """lm-eval's metric_list (entries {"metric": name, options...} or plain names) -> specs;
    DataError naming `where` for an unknown metric or option, a bad value or a repeat."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: metric_list must be a non-empty list of metrics.")
    specs = tuple(_spec(item, where) for item in value)
    names = [s.name for s in specs]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated is not None:
        raise DataError(f"{where}: metric {repeated} is listed twice.")
    return specs


# ---- exact match, ROUGE-L: per doc ---------------------------------------------------------------


def _normalize(text: str, spec: MetricSpec) -> str:
    if spec.strip:
        text = text.strip()
    for regex in spec.regexes_to_ignore:
        text = re.sub(regex, "", text)
    if spec.ignore_case:
        text = text.lower()
    if spec.ignore_punctuation:
        text = text.translate(_PUNCTUATION)
    if spec.ignore_numbers:
        text = text.translate(_DIGITS)
    return text


def exact_match_scores(
    outputs: Sequence[str], references: Sequence[Sequence[str]], spec: MetricSpec
) -> list[float]:
    """Per doc 1.0 when the output equals one of its references after the options, else 0.0."""
    return [
        float(any(_normalize(out, spec) == _normalize(ref, spec) for ref in refs))
        for out, refs in zip(outputs, references)
    ]


def rouge_l_scores(outputs: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per doc 100 x the ROUGE-L F-measure against its best reference (rouge-score)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])
    return [
        100.0 * max(scorer.score(ref, out)["rougeL"].fmeasure for ref in refs)
        for out, refs in zip(outputs, references)
    ]


# ---- BLEU, chrF: corpus scores -------------------------------------------------------------------


def _sacrebleu_metric(name: str, sentence: bool = False):
    from sacrebleu.metrics import BLEU, CHRF

    if name == "bleu":
        return BLEU(effective_order=True) if sentence else BLEU()
    return CHRF()


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per doc reference lists -> sacrebleu's streams (stream j holds every doc's j-th
    reference), padded with None where a doc has fewer references."""
    width = max(len(refs) for refs in references)
    return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


def corpus_score(
    name: str, outputs: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[float, Any, np.ndarray]:
    """sacrebleu's corpus BLEU or chrF (`name`), with the metric object and the per-doc
    sufficient statistics [num_docs, k] that bootstrap_stderr resamples."""
    metric = _sacrebleu_metric(name)
    stats = metric._extract_corpus_statistics(list(outputs), reference_streams(references))
    stats = np.asarray(stats, dtype=np.float64)
    return float(metric._compute_score_from_stats(stats.sum(axis=0)).score), metric, stats


def bootstrap_stderr(
    metric, stats: np.ndarray, iters: int, seed: int = BOOTSTRAP_SEED
) -> float | None:
    """Sample standard deviation of the corpus score over `iters` resamples of the docs."""
    n = len(stats)
    if iters < 2 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    scores = np.empty(iters)
    for i in range(iters):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        scores[i] = metric._compute_score_from_stats(counts @ stats).score
    return float(np.std(scores, ddof=1))


# ---- all of a task's metrics ---------------------------------------------------------------------


def score_outputs(
    outputs: Sequence[str],
    references: Sequence[Sequence[str]],
    specs: Sequence[MetricSpec],
    bootstrap_iters: int = 1000,
    per_doc: bool = False,
) -> tuple[dict[str, float | None], list[dict[str, float]] | None]:
    """({metric: value, metric_stderr: its stderr}, per-doc scores when `per_doc`, else None)."""
    if len(outputs) != len(references) or not outputs:
        raise ValueError("score_outputs needs one reference list per output, and outputs")
    metrics: dict[str, float | None] = {}
    docs: list[dict[str, float]] = [{} for _ in outputs]
    for spec in specs:
        if spec.name in ("exact_match", "rouge_l"):
            if spec.name == "exact_match":
                values = exact_match_scores(outputs, references, spec)
            else:
                values = rouge_l_scores(outputs, references)
            x = np.asarray(values, dtype=np.float64)
            metrics[spec.name], metrics[f"{spec.name}_stderr"] = float(x.mean()), stderr(x)
        else:
            score, metric, stats = corpus_score(spec.name, outputs, references)
            metrics[spec.name] = score
            metrics[f"{spec.name}_stderr"] = bootstrap_stderr(metric, stats, bootstrap_iters)
            if per_doc:
                sentence = _sacrebleu_metric(spec.name, sentence=True)
                pairs = zip(outputs, references)
                values = [sentence.sentence_score(o, list(r)).score for o, r in pairs]
        if per_doc:
            for d, v in zip(docs, values):
                d[spec.name] = float(v)
    return metrics, docs if per_doc else None
