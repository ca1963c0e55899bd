"""`fastserve.eval.evaluate`: the results dict on dense and compressed dirs, with and without a
reference, and every bad input as one FastServeError before any weights are loaded."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from e2e.server_helpers import free_port
from fastserve.data.tokenizer import Tokenizer
from fastserve.errors import CheckpointError, ConfigError, DataError, FastServeError
from fastserve.eval import evaluate
from fastserve.eval.datasets import load_data
from fastserve.eval.evaluator import score_tokens
from fastserve.eval.results import FORMAT, FORMAT_VERSION
from fastserve.model import load_model

WINDOW = {"context_len": 32, "stride": 16, "batch_size": 4}


def test_dense_dir_results(model_dir, text_file):
    r = evaluate(model_dir, data=[str(text_file)], **WINDOW)
    assert (r["format"], r["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert r["versions"]["torch"] == torch.__version__ and r["wall_time_s"] > 0
    assert r["settings"] == {**WINDOW, "limit": None, "device": "cpu", "dtype": None}
    assert r["ref"] is None and r["target"]["quantization"] is None
    lines = "".join(
        f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n"
        for f in sorted(model_dir.iterdir())
    )
    assert r["target"]["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    tokenizer = Tokenizer.load(model_dir)
    assert r["tokenizer"]["fingerprint"] == tokenizer.fingerprint

    (d,) = r["datasets"]
    data = load_data(str(text_file), tokenizer)
    assert d["sha256"] == data.sha256 and d["num_tokens"] == data.num_scored
    assert d["fidelity"] is None
    nll = score_tokens(load_model(model_dir), data.tokens, 32, 16).nll
    assert d["perplexity"]["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-9)
    assert d["perplexity"]["bits_per_byte"] == pytest.approx(
        nll.sum() / np.log(2) / data.num_bytes, rel=1e-9
    )


def test_default_window_is_the_model_context(model_dir, text_file):
    r = evaluate(model_dir, data=str(text_file), limit=50)
    assert (r["settings"]["context_len"], r["settings"]["stride"]) == (128, 64)
    assert r["datasets"][0]["num_tokens"] == 50 and r["datasets"][0]["truncated"]


def test_fidelity_against_a_perturbed_reference(model_dir, perturbed_dir, text_file):
    r = evaluate(perturbed_dir, ref=model_dir, data=[str(text_file)], **WINDOW)
    f = r["datasets"][0]["fidelity"]
    assert r["ref"]["path"] == str(model_dir.resolve())
    assert f["kld_mean"] > 0 and f["kld_max"] >= f["kld_p99"] > 0
    assert f["ref_ppl"] == pytest.approx(
        evaluate(model_dir, data=[str(text_file)], **WINDOW)["datasets"][0]["perplexity"]["ppl"],
        rel=1e-6,
    )


def test_compressed_dir_evaluates_against_its_source(model_dir, compressed_dir, text_file):
    r = evaluate(compressed_dir, ref=model_dir, data=[str(text_file)], **WINDOW)
    assert r["target"]["quantization"]["method"] == "rtn"
    assert r["target"]["quantization"]["bits"] == 8
    f = r["datasets"][0]["fidelity"]
    assert 0 < f["kld_mean"] < 0.01 and f["same_top_pct"] > 90
    assert abs(f["ln_ppl_ratio"]) < 0.01


def test_bad_inputs_are_one_clear_error(model_dir, other_tokenizer_dir, text_file, tmp_path):
    data = [str(text_file)]
    cases = [
        (dict(target=f"http://127.0.0.1:{free_port()}", data=data), FastServeError, "reach"),
        (dict(target=model_dir, ref="https://x", data=data), ConfigError, "is a URL"),
        (dict(target="https://x", ref=model_dir, data=data), ConfigError, "--ref needs"),
        (dict(target=tmp_path / "nope", data=data), CheckpointError, "does not exist"),
        (dict(target=tmp_path, data=data), CheckpointError, "not a model dir"),
        (dict(target=model_dir, ref=other_tokenizer_dir, data=data), DataError, "tokenizer"),
        (dict(target=model_dir, data=data, context_len=129), ConfigError, "longer than"),
        (dict(target=model_dir, data=data, context_len=8, stride=9), ConfigError, "stride"),
        (dict(target=model_dir, data=data, batch_size=0), ConfigError, "batch_size"),
        (dict(target=model_dir, data=data, limit=0), ConfigError, "limit"),
        (dict(target=model_dir, data=data, device="tpu"), ConfigError, "device"),
        (dict(target=model_dir, data=[]), ConfigError, "nothing to evaluate"),
        (dict(target=model_dir, data=[str(tmp_path / "x.txt")]), DataError, "no such file"),
    ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            evaluate(**kwargs)
