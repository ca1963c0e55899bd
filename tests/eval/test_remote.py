"""URL targets: a real `fastserve serve` process gives the numbers of the model dir (perplexity
and tasks, through /v1/completions echo + logprobs with token-id prompts; generative tasks
through /v1/completions and /v1/chat/completions); a server without echo logprobs, a server
that is down, a bad task file or a missing data dir -> one `error:` line, exit status 2 and no
--output file; generative tasks need no echo, and a server error is one `error:` line."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from e2e.server_helpers import ServerProcess, free_port, make_model_dir
from fastserve.cli import main
from fastserve.data.tokenizer import Tokenizer
from fastserve.errors import DataError
from fastserve.eval import evaluate
from fastserve.eval.remote import RemoteServer, RemoteTokenizer

pytestmark = pytest.mark.e2e
WINDOW = {"context_len": 48, "stride": 24}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("remote") / "model")
    server = ServerProcess(model_dir, "--policy", "fcfs").wait_ready()
    yield model_dir, server.base_url
    server.stop()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    rows = [
        {"question": "the cat sat", "choices": {"text": ["on a mat", "model"], "label": ["A", "B"]},
         "answerKey": "A"},
        {"question": "server tokens", "choices": {"text": ["queue", "blocks cache", "the"],
         "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"question": "a mat while the", "choices": {"text": ["cat", "cache"], "label": ["A", "B"]},
         "answerKey": "B"},
    ]  # fmt: skip
    (root / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lambada").mkdir()
    texts = ["the cat sat on a mat while the server", "tokens queue blocks cache model"]
    (root / "lambada" / "lambada_test.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts)
    )
    return root


def test_url_target_equals_the_model_dir(served, task_files, text_file, other_tokenizer_dir):
    model_dir, url = served
    args = {"data": [str(text_file)], "tasks": [str(task_files / "arc.jsonl"), "lambada"]}
    args |= {"task_data": task_files, **WINDOW}
    local = evaluate(model_dir, **args)
    remote = evaluate(url, **args)  # the tokenizer: the root dir the server's /v1/models names
    assert remote["target"]["kind"] == "server" and remote["target"]["url"] == url
    assert remote["target"]["prompt_format"] == "token_ids"
    assert remote["target"]["tokenizer"] == str(model_dir)
    (dl,), (dr,) = local["datasets"], remote["datasets"]
    assert dr["num_tokens"] == dl["num_tokens"] and dr["sha256"] == dl["sha256"]
    for key in ("ppl", "nll_mean", "bits_per_byte"):
        assert dr["perplexity"][key] == pytest.approx(dl["perplexity"][key], rel=1e-5), key
    for tl, tr in zip(local["tasks"], remote["tasks"], strict=True):
        assert (tr["name"], tr["num_requests"]) == (tl["name"], tl["num_requests"])
        for key, value in tl["metrics"].items():
            assert tr["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key

    with pytest.raises(DataError, match="tokenizer mismatch"):
        evaluate(url, tasks=[str(task_files / "arc.jsonl")], tokenizer=other_tokenizer_dir)
    server = RemoteServer(url)  # /tokenize: the server's own tokenizer, without special tokens
    texts = ["the cat sat", " on a mat\n", "Question: x\nAnswer:"]
    assert RemoteTokenizer(server).encode_batch(texts) == Tokenizer.load(model_dir).encode_batch(
        texts
    )
    server.close()


class _NoEcho(BaseHTTPRequestHandler):
    """An OpenAI-like server whose completions logprobs cover only the generated token."""

    def log_message(self, *args):
        pass

    def _send(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/chat/completions":
            self._send({"error": {"message": "chat is broken", "type": "server_error"}}, 500)
            return
        lp = {"tokens": ["x"], "token_logprobs": [-0.5], "top_logprobs": [{"x": -0.5}],
              "text_offset": [0]}  # fmt: skip
        self._send({"choices": [{"index": 0, "text": "x", "logprobs": lp}]})


@pytest.fixture
def no_echo_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NoEcho)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _fails(argv, message, out, capsys):
    capsys.readouterr()
    assert main([*map(str, argv), "--output", str(out)]) == 2, argv
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not out.exists()


def test_bad_urls_and_task_inputs_exit_2(no_echo_url, task_files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASTSERVE_DATA", raising=False)
    model_dir = make_model_dir(tmp_path / "model")
    out = tmp_path / "r.json"
    arc = task_files / "arc.jsonl"
    tok = ["--tokenizer", model_dir]
    _fails(
        ["eval", no_echo_url, "--tasks", arc, *tok],
        "does not echo the prompt's logprobs",
        out,
        capsys,
    )
    down = f"http://127.0.0.1:{free_port()}"
    _fails(["eval", down, "--tasks", arc], f"cannot reach {down}", out, capsys)
    _fails(
        ["eval", down, "--ref", model_dir, "--tasks", arc], "--ref needs a model dir", out, capsys
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: rows.jsonl\ndoc_to_text: q\ndoc_to_target: a\nchoices: [a, b]\n")
    _fails(["eval", model_dir, "--tasks", bad], "unknown key 'choices'", out, capsys)
    _fails(
        ["eval", model_dir, "--tasks", "piqa", "--task-data", tmp_path],
        "no piqa/valid.jsonl",
        out,
        capsys,
    )
    _fails(["eval", model_dir, "--tasks", "piqa"], "pass --task-data DIR", out, capsys)


def _gen_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_generative_url_target_equals_the_model_dir(served, tmp_path):
    """Plain prompts through /v1/completions, chat rows (and --apply-chat-template) through
    /v1/chat/completions: the same outputs and metrics as the model dir."""
    model_dir, url = served
    words = "the cat sat on a mat while server tokens queue blocks cache model".split()
    prompts = [" ".join(words[i : i + 3 + i % 4]) for i in range(8)]
    plain_rows = [{"prompt": p, "references": [p, "the cat"]} for p in prompts]
    chat_rows = [{"messages": [{"role": "user", "content": p}], "reference": p} for p in prompts]
    plain = _gen_rows(tmp_path / "plain.jsonl", plain_rows)
    chat = _gen_rows(tmp_path / "chat.jsonl", chat_rows[:4])
    args = {"tasks": [plain, chat], "gen_kwargs": "max_gen_toks=12", "log_samples": True}
    local, remote = evaluate(model_dir, **args), evaluate(url, **args)
    templated = {**args, "tasks": [plain], "apply_chat_template": True, "limit": 3}
    local_t, remote_t = evaluate(model_dir, **templated), evaluate(url, **templated)
    for lr, rr in ((local, remote), (local_t, remote_t)):
        for tl, tr in zip(lr["tasks"], rr["tasks"], strict=True):
            for key in ("output", "num_tokens", "finish_reason"):
                assert [s[key] for s in tr["samples"]] == [s[key] for s in tl["samples"]], key
            assert tr["num_prompt_tokens"] == tl["num_prompt_tokens"]
            assert tr["metrics"] == pytest.approx(tl["metrics"], rel=1e-12, abs=1e-12)
    assert local["tasks"][1]["num_chat_prompts"] == 4
    assert local_t["tasks"][0]["num_chat_prompts"] == 3
    assert remote["tasks"][0]["finish_reasons"] == local["tasks"][0]["finish_reasons"]
    outputs = [s["output"] for s in local["tasks"][0]["samples"]]
    assert len(set(outputs)) >= 6 and remote["target"]["prompt_format"] == "token_ids"


def test_generative_tasks_need_no_echo_and_server_errors_are_one_line(
    no_echo_url, tmp_path, capsys
):
    model_dir = make_model_dir(tmp_path / "model")
    plain = _gen_rows(tmp_path / "p.jsonl", [{"prompt": "the cat", "reference": "x"}] * 3)
    r = evaluate(no_echo_url, tasks=[plain], tokenizer=model_dir, log_samples=True)
    (entry,) = r["tasks"]
    assert [s["output"] for s in entry["samples"]] == ["x"] * 3
    assert entry["metrics"]["exact_match"] == 1.0
    chat = _gen_rows(
        tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "reference": "x"}]
    )
    out = tmp_path / "r.json"
    argv = ["eval", no_echo_url, "--tasks", chat, "--tokenizer", model_dir]
    _fails(argv, f"POST {no_echo_url}/v1/chat/completions: HTTP 500: chat is broken", out, capsys)


def test_url_speed_through_evaluate_and_the_table(served, text_file):
    """`evaluate(URL, speed=...)`: the speed entry is timed over HTTP with the asked settings
    (every request made exactly decode_tokens tokens), beside the perplexity of the same run."""
    from fastserve.eval import evaluate
    from fastserve.eval.tables import results_tables

    _, url = served
    speed = {"prompt_len": 8, "decode_tokens": 4, "batch_sizes": [1, 2], "repeats": 1}
    r = evaluate(url, data=[str(text_file)], speed=speed, **WINDOW)
    sp = r["speed"]
    assert sp["kind"] == "server" and sp["settings"]["batch_sizes"] == [1, 2]
    assert [b["batch_size"] for b in sp["batches"]] == [1, 2]
    for b in sp["batches"]:
        assert [n for run in b["runs"] for n in run["output_tokens"]] == [4] * b["batch_size"]
        assert b["ttft_mean_s"] > 0 and b["decode_tokens_per_s"] > 0
    assert sp["memory"] is None and r["datasets"][0]["perplexity"]["ppl"] > 1
    assert len(results_tables(r)) == 2  # speed, then perplexity
