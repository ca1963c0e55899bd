"""`fastserve chat` driven through stdin: replies equal the offline engine's greedy completions of
the chat-templated conversation, in-process and through a real `fastserve serve` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from server_helpers import ServerProcess, make_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MAX_TOKENS = 8
SYSTEM = "answer with the cat"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("chat_cli") / "model")


@pytest.fixture(scope="module")
def offline(model_dir):
    """Greedy replies of the offline engine to a conversation, turn by turn."""
    from fastserve.engine import LLM, SamplingParams

    llm = LLM(str(model_dir), kv_cache_memory="64MiB")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)

    def replies(turns: list[str], system: str | None = None) -> list[str]:
        messages = [{"role": "system", "content": system}] if system else []
        out = []
        for user in turns:
            messages.append({"role": "user", "content": user})
            prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            reply = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
            messages.append({"role": "assistant", "content": reply})
            out.append(reply)
        return out

    return replies


def chat(target: str, stdin: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_API_KEY", None)
    cmd = [sys.executable, "-m", "fastserve", "chat", target, "--temperature", "0"]
    cmd += ["--max-tokens", str(MAX_TOKENS), "--kv-cache-memory", "64MiB", *args]
    return subprocess.run(cmd, input=stdin.encode(), capture_output=True, env=env, timeout=300)


def test_chat_in_process_two_turns_reset_and_exit(model_dir, offline):
    turns = ["the cat sat on a mat", "queue the tokens"]
    r1, r2 = offline(turns, system=SYSTEM)
    assert r1 and r2 and r1 != r2  # a meaningful comparison: non-empty, turn-dependent replies
    stdin = f"{turns[0]}\n{turns[1]}\n\n/reset\n{turns[0]}\n/exit\nnever read\n"
    proc = chat(str(model_dir), stdin, "--system", SYSTEM)
    assert proc.returncode == 0, proc.stderr.decode()
    # stdout holds only prompts and replies: the blank line re-prompts, /reset forgets turn 1-2
    # (the system message stays), /exit stops before the last line
    assert proc.stdout.decode() == f"> {r1}\n> {r2}\n> > > {r1}\n> "
    assert "history cleared" in proc.stderr.decode()
    # without the system message the first reply is a different conversation
    (plain,) = offline(turns[:1])
    proc = chat(str(model_dir), turns[0] + "\n")
    assert proc.returncode == 0 and proc.stdout.decode() == f"> {plain}\n> \n"  # EOF ends it


def test_chat_against_server(model_dir, offline):
    turns = ["blocks cache model", "the server queue"]
    r1, r2 = offline(turns)
    srv = ServerProcess(model_dir, "--kv-cache-memory", "64MiB").wait_ready()
    try:
        proc = chat(srv.base_url, f"{turns[0]}\n{turns[1]}\n")
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout.decode() == f"> {r1}\n> {r2}\n> \n"
        # a server-side error (unknown model) is reported and the chat goes on
        proc = chat(srv.base_url, "hello\n/exit\n", "--model", "no-such-model")
        assert proc.returncode == 0 and "HTTP 404" in proc.stderr.decode()
        assert proc.stdout.decode() == "> > "
    finally:
        assert srv.stop() == 0, srv.log()


def test_chat_user_errors_and_ctrl_c(model_dir, tmp_path):
    proc = chat(str(tmp_path / "missing"), "")
    assert proc.returncode == 2 and b"neither a model directory" in proc.stderr
    proc = chat(str(model_dir), "", "--top-p", "0")
    assert proc.returncode == 2 and b"--top-p" in proc.stderr
    proc = chat("http://127.0.0.1:9", "")
    assert proc.returncode == 2 and b"cannot reach" in proc.stderr
    # Ctrl-C while waiting for input: a clean exit, no traceback. The chat gets the default
    # SIGINT disposition of a terminal even when the suite runs with SIGINT ignored (CI, `&`).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(
        [sys.executable, "-m", "fastserve", "chat", str(model_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    line = p.stderr.readline()  # the banner comes once the engine is up
    assert b"chatting with" in line
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    # it exits on the signal itself, stdin still open (closing it would end the chat by EOF)
    try:
        assert p.wait(timeout=60) == 0
    finally:
        p.kill()  # a no-op once it has exited
    out, err = p.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode()
    assert out == b"> \n"


def test_abandoned_reply_is_aborted_and_frees_kv(model_dir, offline):
    """In-process: leaving a reply early (what Ctrl-C mid-reply does) aborts the request."""
    from fastserve.chat import ChatOptions, EngineChat

    options = ChatOptions(temperature=0.0, max_tokens=MAX_TOKENS, kv_cache_memory="64MiB")
    backend = EngineChat(str(model_dir), options)
    engine = backend.engine.engine
    try:
        backend.params.max_tokens = 500  # long enough to be still running after one piece
        backend.params.ignore_eos = True
        stream = backend.stream([{"role": "user", "content": "the cat"}])
        assert next(stream)
        assert engine.has_unfinished_requests()
        stream.close()
        assert not engine.has_unfinished_requests()
        assert engine.stats().kv_usage == 0.0 and engine.stats().num_running == 0
        # the chat goes on: the next reply is the offline greedy one
        backend.params.max_tokens, backend.params.ignore_eos = MAX_TOKENS, False
        turn = [{"role": "user", "content": "queue the tokens"}]
        assert "".join(backend.stream(turn)) == offline(["queue the tokens"])[0]
    finally:
        backend.close()
