"""Log-likelihood tasks without a model: how documents become (context, continuations) and
requests (lm-eval's conventions), and the metrics on hand-made rows with known answers, scored
by a stub that looks up each continuation's log-likelihood in a table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fastserve.errors import DataError
from fastserve.eval.loglikelihood import (
    LoglikelihoodResult,
    encode_requests,
    run_task,
    split_pair,
)
from fastserve.eval.tasks import Doc, Task, lambada_doc, load_task
from tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class TableScorer:
    """Scores a request by the text of its continuation tokens: table[text] = (ll, greedy)."""

    def __init__(self, tok, table: dict[str, tuple[float, bool]]):
        self.tok, self.table = tok, table
        self.seen: list[str] = []

    def score(self, docs, on_doc=None):
        out = []
        for reqs in docs:
            row = []
            for r in reqs:
                text = self.tok.decode(list(r.token_ids[r.start :]), skip_special_tokens=False)
                self.seen.append(text)
                row.append(LoglikelihoodResult(*self.table[text]))
            out.append(row)
            if on_doc is not None:
                on_doc()
        return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _score(task, tok, table, limit=None):
    docs = encode_requests(task.requests(limit), tok.encode_batch, tok.bos_token_id, 128)
    return run_task(task, TableScorer(tok, table), docs)


def _arc(q, texts, key):
    return {"question": q, "choices": {"text": texts, "label": list("ABCD")[: len(texts)]},
            "answerKey": key}  # fmt: skip


def test_arc_jsonl_with_known_answers(tok, tmp_path):
    path = _jsonl(
        tmp_path / "mini_arc.jsonl",
        [
            _arc("the cat", ["sat", "on a mat"], "A"),  # acc 1, acc_norm 0
            _arc("a mat", ["cat", "model"], "B"),  # acc 0, acc_norm 1
            _arc("queue", ["tokens", "blocks", "cache"], "C"),  # acc 1, acc_norm 1
            _arc("server", ["the", "a"], "B"),  # acc 0, acc_norm 0
        ],
    )
    table = {
        " sat": (-2.0, True), " on a mat": (-2.5, False),
        " cat": (-3.0, False), " model": (-4.0, True),
        " tokens": (-9.0, False), " blocks": (-8.0, False), " cache": (-1.0, True),
        " the": (-1.0, True), " a": (-1.2, False),
    }  # fmt: skip
    task = load_task(str(path))
    assert (task.name, task.output_type, len(task.docs)) == ("mini_arc", "multiple_choice", 4)
    assert task.requests(1) == [("Question: the cat\nAnswer:", [" sat", " on a mat"])]
    entry = _score(task, tok, table)
    m = entry["metrics"]
    acc, acc_norm = np.array([1, 0, 1, 0.0]), np.array([0, 1, 1, 0.0])
    assert m["acc"] == 0.5 and m["acc_norm"] == 0.5
    assert m["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / 2, rel=1e-12)
    assert m["acc_norm_stderr"] == pytest.approx(np.std(acc_norm, ddof=1) / 2, rel=1e-12)
    assert entry["num_docs"] == 4 and entry["num_requests"] == 9 and not entry["truncated"]
    assert _score(task, tok, table, limit=2)["metrics"]["acc"] == 0.5


def test_hellaswag_rows_are_preprocessed_as_lm_eval_does(tmp_path):
    row = {"ctx_a": "A man sits.", "ctx_b": "he [header] talks", "activity_label": "Talking",
           "endings": ["and  waves.", "[title] leaves"], "label": "1"}  # fmt: skip
    task = load_task(str(_jsonl(tmp_path / "hs.jsonl", [row])))
    assert task.docs == [Doc("Talking: A man sits. He talks", ("and waves.", " leaves"), 1)]


def test_lambada_last_word_and_cloze_metrics(tok, tmp_path):
    assert lambada_doc("the cat sat\n\non a mat") == Doc("the cat sat\n\non a", (" mat",), 0)
    assert lambada_doc('he said "cache."') == Doc("he said", (' "cache."',), 0)
    assert lambada_doc("model") == Doc("", (" model",), 0)  # empty context: the prefix token
    d = tmp_path / "data" / "lambada"
    d.mkdir(parents=True)
    texts = ["the cat sat on a mat", "a model queue\nof tokens", "server blocks cache"]
    _jsonl(d / "lambada_test.jsonl", [{"text": t} for t in texts])
    task = load_task("lambada", tmp_path / "data")
    assert task.requests() == [
        ("the cat sat on a", [" mat"]),
        ("a model queue\nof", [" tokens"]),
        ("server blocks", [" cache"]),
    ]
    table = {" mat": (-1.0, True), " tokens": (-3.0, False), " cache": (-0.5, True)}
    m = _score(task, tok, table)["metrics"]
    assert m["acc"] == pytest.approx(2 / 3)
    assert m["perplexity"] == pytest.approx(math.exp(4.5 / 3), rel=1e-12)
    se = np.std([-1.0, -3.0, -0.5], ddof=1) / math.sqrt(3)
    assert m["perplexity_stderr"] == pytest.approx(m["perplexity"] * se, rel=1e-12)


def test_encoding_follows_lm_eval(tok):
    # trailing whitespace of the context moves to the continuation
    assert split_pair("Answer: ", "cat") == ("Answer:", " cat")
    [[r]] = encode_requests([("the cat ", ["sat"])], tok.encode_batch, 0, 128)
    ctx = tok.encode("the cat")
    assert r.token_ids[: r.start] == tuple(ctx)
    assert r.token_ids[r.start :] == tuple(tok.encode("the cat sat")[len(ctx) :])
    # empty context -> the prefix token; too long -> cut from the left, the continuation kept
    [[e], [cut]] = encode_requests(
        [("", [" mat"]), (("the cat sat on a mat " * 20).strip(), [" queue"])],
        tok.encode_batch,
        7,
        16,
    )
    assert e.token_ids[: e.start] == (7,) and e.token_ids[e.start :] == tuple(tok.encode(" mat"))
    assert len(cut.token_ids) == 16 and cut.truncated
    assert cut.token_ids[cut.start :] == tuple(tok.encode(" queue"))
    with pytest.raises(DataError, match="does not fit the model's context"):
        encode_requests([("the", [" cat sat on a mat" * 9])], tok.encode_batch, 0, 16, "t")


def _yaml_task(tmp_path, extra: str = "") -> str:
    _jsonl(
        tmp_path / "rows.jsonl",
        [
            {"q": f"question {i}", "good": f"yes {i}", "bad": f"no {i}", "label": 0}
            for i in range(6)
        ],
    )
    path = tmp_path / "mine.yaml"
    path.write_text(
        'task: mine\ndata: rows.jsonl\ndoc_to_text: "Q: {{q}}\\nA:"\n'
        "doc_to_choice: '{{[good, bad]}}'\ndoc_to_target: label\n" + extra,
        encoding="utf-8",
    )
    return str(path)


def test_yaml_task_with_fewshot_examples(tmp_path):
    task = load_task(_yaml_task(tmp_path, "num_fewshot: 2\nfewshot_seed: 3\n"))
    assert task.docs[1] == Doc("Q: question 1\nA:", ("yes 1", "no 1"), 0)
    reqs = task.requests()
    for i, (context, conts) in enumerate(reqs):
        examples, own = context.rsplit("\n\n", 1)[0].split("\n\n"), context.rsplit("\n\n", 1)[1]
        assert own == f"Q: question {i}\nA:" and conts == [f" yes {i}", f" no {i}"]
        assert len(examples) == 2 and f"question {i}\n" not in context.rsplit("\n\n", 1)[0]
        assert all(
            e.startswith("Q: question ") and e.split("A: ")[1].startswith("yes") for e in examples
        )
    assert task.requests() == reqs  # the seed fixes the examples
    assert load_task(_yaml_task(tmp_path, "fewshot_seed: 4\nnum_fewshot: 2\n")).requests() != reqs
    (tmp_path / "cloze.yaml").write_text(
        "data: rows.jsonl\noutput_type: loglikelihood\ndoc_to_text: q\ndoc_to_target: ' {{good}}'\n"
    )
    cloze = load_task(str(tmp_path / "cloze.yaml"))
    assert (cloze.name, cloze.output_type) == ("cloze", "loglikelihood")
    assert cloze.requests(1) == [("question 0", [" yes 0"])]


def test_bad_task_files_and_data_dirs(tmp_path):
    bad_key = _yaml_task(tmp_path, "doc_to_txt: oops\n")
    with pytest.raises(DataError, match="unknown key 'doc_to_txt'"):
        load_task(bad_key)
    (tmp_path / "t2.yaml").write_text(
        "data: rows.jsonl\ndoc_to_text: '{{nope}}'\ndoc_to_choice: '{{[good, bad]}}'\n"
        "doc_to_target: label\n"
    )
    with pytest.raises(DataError, match=r"rows.jsonl:1: cannot render"):
        load_task(str(tmp_path / "t2.yaml"))
    with pytest.raises(DataError, match="pass --task-data DIR"):
        load_task("piqa", None)
    with pytest.raises(DataError, match="no piqa/valid.jsonl under --task-data"):
        load_task("piqa", tmp_path)
    with pytest.raises(DataError, match="unknown task 'nope'"):
        load_task("nope")
    (tmp_path / "odd.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(DataError, match="unknown shape"):
        load_task(str(tmp_path / "odd.jsonl"))
    task = Task("t", "multiple_choice", "-", "-", [Doc("x", ("a", "b"), 0)], num_fewshot=1)
    with pytest.raises(DataError, match="num_fewshot 1 needs that many examples"):
        task.requests()
