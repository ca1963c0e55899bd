"""Tasks scored through the engine: piqa rows against log-likelihoods computed directly with HF
transformers (lm-eval's hf recipe: AutoTokenizer without special tokens, one forward of
context + continuation[:-1], log-softmax, gather), shared contexts (prefix cache) equal to
unshared scoring, and `evaluate(..., tasks=...)`'s results entry."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastserve.cli import main
from fastserve.data.tokenizer import Tokenizer
from fastserve.eval import evaluate
from fastserve.eval.evaluator import task_engine
from fastserve.eval.loglikelihood import (
    EngineScorer,
    LoglikelihoodResult,
    encode_requests,
    prefix_token_id,
    task_metrics,
)
from fastserve.eval.results import write_results
from fastserve.eval.tasks import load_task
from fastserve.model import load_model
from tiny_models import save_tiny_model_dir

NUM_DOCS = 20
SHARED = Path(os.environ.get("FASTSERVE_DATA", Path(__file__).resolve().parents[3] / "shared/data"))


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    """The tiny model with a 1024-token context: no piqa row is cut."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tasks") / "model", 1024)


@pytest.fixture(scope="module")
def piqa_dir(tmp_path_factory):
    """The first NUM_DOCS rows of the local piqa copy (shared/data), as a task-data dir."""
    src = SHARED / "piqa"
    if not (src / "valid.jsonl").is_file():
        pytest.skip(f"no piqa copy at {src}")
    root = tmp_path_factory.mktemp("data")
    (root / "piqa").mkdir()
    for name in ("valid.jsonl", "valid-labels.lst"):
        lines = (src / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (root / "piqa" / name).write_text("".join(lines[:NUM_DOCS]), encoding="utf-8")
    return root


def _docs(model_dir, task):
    tok = Tokenizer.load(model_dir)
    return encode_requests(task.requests(), tok.encode_batch, prefix_token_id(tok), 1024)


def _lm_eval_encode(hf_tok, context: str, continuation: str):
    """lm-eval's HFLM._encode_pair with tok_encode(add_special_tokens=False)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = hf_tok.encode(context + continuation, add_special_tokens=False)
    ctx = hf_tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def test_piqa_equals_hf_transformers(long_dir, piqa_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(long_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(long_dir)
    task = load_task("piqa", piqa_dir)
    docs = _docs(long_dir, task)
    tok = Tokenizer.load(long_dir)
    engine = task_engine(load_model(long_dir), tok, batch_tokens=512, kv_cache_memory="64MiB")
    got = EngineScorer(engine).score(docs)
    want = []
    for (context, conts), reqs, res in zip(task.requests(), docs, got):
        row = []
        for cont, req, r in zip(conts, reqs, res):
            ctx_ids, cont_ids = _lm_eval_encode(hf_tok, context, cont)
            assert req.token_ids == tuple(ctx_ids + cont_ids) and req.start == len(ctx_ids)
            with torch.no_grad():
                logits = hf(torch.tensor([(ctx_ids + cont_ids)[:-1]])).logits[0]
            logprobs = torch.log_softmax(logits[len(ctx_ids) - 1 :].float(), dim=-1)
            target = torch.tensor(cont_ids)
            ll = float(logprobs.gather(1, target[:, None]).double().sum())
            greedy = bool((logprobs.argmax(-1) == target).all())
            # 1e-4 per token: the logits of two float32 implementations, summed in float64
            assert r.logprob == pytest.approx(ll, abs=1e-4 * len(cont_ids))
            assert r.is_greedy == greedy
            row.append(LoglikelihoodResult(ll, greedy))
        want.append(row)
    assert task_metrics(task, got) == task_metrics(task, want)


def test_shared_contexts_equal_unshared_scoring(long_dir, piqa_dir):
    task = load_task("piqa", piqa_dir)
    docs = _docs(long_dir, task)
    tok = Tokenizer.load(long_dir)
    model = load_model(long_dir)
    shared = task_engine(model, tok, batch_tokens=512, kv_cache_memory="64MiB")
    a = EngineScorer(shared).score(docs)
    unshared = task_engine(model, tok, 512, "64MiB", enable_prefix_caching=False)
    flat = [[r] for reqs in docs for r in reqs]  # one doc per request: nothing to share
    b = [x for (x,) in EngineScorer(unshared, max_in_flight=1).score(flat)]
    a_flat = [x for res in a for x in res]
    assert shared.stats().prefix_cache_hits > 0 and unshared.stats().prefix_cache_hits == 0
    for x, y in zip(a_flat, b, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5) and x.is_greedy == y.is_greedy
    total = sum(len(r.token_ids) for reqs in docs for r in reqs)
    assert unshared.stats().num_prompt_tokens == total > shared.stats().num_prompt_tokens


def test_evaluate_with_tasks(long_dir, piqa_dir, tmp_path, capsys):
    (tmp_path / "lambada").mkdir()
    (tmp_path / "lambada" / "lambada_test.jsonl").write_text(
        '{"text": "the cat sat on a mat"}\n{"text": "server tokens queue blocks"}\n'
    )
    shutil.copytree(piqa_dir / "piqa", tmp_path / "piqa")
    r = evaluate(long_dir, tasks=["piqa", "lambada"], task_data=tmp_path, limit=5)
    assert r["datasets"] == [] and [t["name"] for t in r["tasks"]] == ["piqa", "lambada"]
    piqa = r["tasks"][0]
    assert piqa["num_docs"] == 5 and piqa["num_docs_total"] == NUM_DOCS and piqa["truncated"]
    assert piqa["num_requests"] == 10 and piqa["num_cut_requests"] == 0
    assert set(piqa["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    task = load_task("piqa", piqa_dir)
    tok = Tokenizer.load(long_dir)
    docs = encode_requests(task.requests(5), tok.encode_batch, prefix_token_id(tok), 1024)
    engine = task_engine(load_model(long_dir), tok, batch_tokens=512, kv_cache_memory="64MiB")
    assert piqa["metrics"] == task_metrics(task, EngineScorer(engine).score(docs))
    with pytest.raises(Exception, match="no lambada/lambada_test.jsonl"):
        evaluate(long_dir, tasks=["lambada"], task_data=piqa_dir)
    lam = evaluate(long_dir, tasks=["lambada"], task_data=tmp_path)["tasks"][0]
    assert set(lam["metrics"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}
    assert lam["num_docs"] == 2 and np.isfinite(lam["metrics"]["perplexity"])
    write_results(tmp_path / "a.json", r)
    write_results(tmp_path / "b.json", r)
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "tasks compared against a.json" in out and "+0.00" in out and "Δ acc_norm" in out
