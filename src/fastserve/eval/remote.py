"""Scoring through any OpenAI-compatible server: `/v1/completions` with `echo` + `logprobs`;
generation through `/v1/completions` and `/v1/chat/completions`.

    server = RemoteServer("http://127.0.0.1:8000", api_key=None)   # GET /v1/models
    server.probe([5, 17, 230])                 # echo + logprobs and token-id prompts, or an error
    nll = server.window_nll(stream, windows)   # perplexity windows (perplexity.py)
    results = RemoteScorer(server).score(docs) # log-likelihood requests (loglikelihood.py)
    outputs = RemoteGenerator(server).generate(requests)  # generative tasks (generative.py)

Every prompt is sent with `echo: true, logprobs: 1, max_tokens: 1, temperature: 0` (what
lm-evaluation-harness's local-completions sends); entry i of the choice's `token_logprobs` is
log p(prompt token i | tokens before it) and the generated token's entry (the last) is ignored,
so a prompt may hold max_model_len - 1 tokens. Prompts are token-id lists when the server takes
them (FastServe, vLLM); otherwise (a server that takes only text) log-likelihood prompts are
sent as text and the continuation's tokens are those that start at or after its first
character in the echoed text (a token straddling the boundary is left out: the server's
tokenization is not lm-eval's; `prompt_format` "text" in the results says so). Requests carry
several prompts each and run `concurrency` at a time.

Generation sends one doc per request, `concurrency` at a time, with the request's own settings
(`max_tokens` clipped to the context, `stop`, `temperature`, `top_p`, `seed`; `top_k`, a vLLM
extra, only when set): a plain prompt to /v1/completions (token ids when the server takes them,
see `probe_prompts`), a chat prompt's messages to /v1/chat/completions, where the server applies
its chat template. The generated text and `usage.completion_tokens` come back.

What it does not know: tasks, metrics, the results schema.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fastserve.errors import FastServeError
from fastserve.eval.generative import GenOutput, GenRequest
from fastserve.eval.loglikelihood import (
    LoglikelihoodRequest,
    LoglikelihoodResult,
    greedy_result,
    split_pair,
)
from fastserve.eval.openai_client import auth_headers, error_message, fetch_models
from fastserve.eval.perplexity import Window

__all__ = ["RemoteGenerator", "RemoteScorer", "RemoteServer", "RemoteTokenizer"]

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
PROMPTS_PER_REQUEST = 16
MISSING = (
    "the scoring needs /v1/completions with echo=true and logprobs (the log-probabilities of the "
    "prompt tokens)"
)


@dataclass
class _Echo:
    """The echoed prompt's logprobs of one choice."""

    chosen: list[float | None]  # token_logprobs (entry 0: None)
    best: list[float | None]  # the largest logprob of each position's top_logprobs
    offsets: list[int]  # text_offset of each token
    num_tokens: int  # entries (prompt tokens + the generated token)


class RemoteServer:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        concurrency: int = 8,
    ) -> None:
        import httpx

        self.url = url.rstrip("/").removesuffix("/v1")
        card = fetch_models(self.url, api_key, timeout_s=min(timeout_s, 30.0))[0]
        self.model = str(card["id"])
        self.root = card.get("root") if isinstance(card.get("root"), str) else None
        max_len = card.get("max_model_len")
        self.max_model_len = max_len if isinstance(max_len, int) and max_len > 1 else None
        self.concurrency = concurrency
        self.token_prompts = True  # False after probe() when the server takes only text
        self._client = httpx.Client(
            timeout=timeout_s, trust_env=False, headers=auth_headers(api_key)
        )

    def close(self) -> None:
        self._client.close()

    # ---- one request ---------------------------------------------------------------------------

    def _post(self, path: str, payload: dict) -> dict:
        import httpx

        try:
            resp = self._client.post(self.url + path, json=payload)
        except httpx.HTTPError as exc:
            raise FastServeError(f"cannot reach {self.url}: {exc}") from None
        if resp.status_code != 200:
            message = " ".join(error_message(resp.status_code, resp.content).split())
            raise FastServeError(f"POST {self.url}{path}: {message}")
        try:
            return resp.json()
        except ValueError:
            raise FastServeError(
                f"POST {self.url}{path} answered with something not JSON."
            ) from None

    def _echo(self, prompts: list) -> list[_Echo]:
        body = self._post(
            COMPLETIONS,
            {
                "model": self.model,
                "prompt": prompts,
                "echo": True,
                "logprobs": 1,
                "max_tokens": 1,
                "temperature": 0.0,
            },
        )
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise FastServeError(f"{self.url}{COMPLETIONS} did not answer one choice per prompt.")
        out = []
        for c in sorted(choices, key=lambda c: c.get("index", 0)):
            lp = c.get("logprobs") if isinstance(c, dict) else None
            if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
                raise FastServeError(f"{self.url} returned no logprobs: {MISSING}.")
            tops = lp.get("top_logprobs") or [None] * len(lp["token_logprobs"])
            best = [max(t.values()) if isinstance(t, dict) and t else None for t in tops]
            out.append(
                _Echo(
                    lp["token_logprobs"],
                    best,
                    lp.get("text_offset") or [],
                    len(lp["token_logprobs"]),
                )
            )
        return out

    def probe(self, token_ids: list[int], text: str = "The cat sat on the mat") -> None:
        """Check that the server echoes prompt logprobs, and whether it takes token-id prompts;
        FastServeError naming the missing feature otherwise."""
        try:
            (echo,) = self._echo([list(token_ids)])
        except FastServeError as exc:
            if "HTTP 4" not in str(exc):
                raise
            try:  # maybe only token-id prompts are refused
                (echo,) = self._echo([text])
            except FastServeError as exc2:
                raise FastServeError(
                    f"{self.url} refused echo + logprobs scoring ({exc2}); {MISSING}."
                ) from None
            self.token_prompts = False
            self._check_echo(echo, 2)
            return
        self._check_echo(echo, len(token_ids))

    def probe_prompts(self, token_ids: list[int], text: str) -> None:
        """For generation alone (no echo needed): whether /v1/completions takes token-id
        prompts (else text prompts are sent); FastServeError when it takes neither."""
        payload = {"model": self.model, "max_tokens": 1, "temperature": 0.0}
        try:
            self._post(COMPLETIONS, {**payload, "prompt": list(token_ids)})
        except FastServeError as exc:
            if "HTTP 4" not in str(exc):
                raise
            self._post(COMPLETIONS, {**payload, "prompt": text})
            self.token_prompts = False

    def _check_echo(self, echo: _Echo, num_prompt: int) -> None:
        if echo.num_tokens < num_prompt or all(v is None for v in echo.chosen[1:num_prompt]):
            raise FastServeError(
                f"{self.url} does not echo the prompt's logprobs (it returned {echo.num_tokens} "
                f"logprob entries for a prompt of {num_prompt} tokens): {MISSING}."
            )

    # ---- many requests -------------------------------------------------------------------------

    def echo_many(
        self, prompts: list, on_batch: Callable[[int], None] | None = None
    ) -> list[_Echo]:
        batches = [
            prompts[i : i + PROMPTS_PER_REQUEST]
            for i in range(0, len(prompts), PROMPTS_PER_REQUEST)
        ]
        out: list[_Echo] = []
        with ThreadPoolExecutor(self.concurrency) as pool:
            for res in pool.map(self._echo, batches):  # in order
                out.extend(res)
                if on_batch is not None:
                    on_batch(len(res))
        return out

    def window_nll(self, stream: np.ndarray, windows: list[Window], on_window=None) -> np.ndarray:
        """NLL (nats, float64) of the scored tokens of every window, in stream order: window w
        is the prompt s[w.begin : w.begin + w.num_inputs + 1], its last num_scored tokens scored."""
        if not self.token_prompts:
            raise FastServeError(
                f"{self.url} takes only text prompts; perplexity over a URL needs token-id prompts."
            )
        prompts = [stream[w.begin : w.begin + w.num_inputs + 1].tolist() for w in windows]
        echoes = self.echo_many(prompts, on_window)
        parts = []
        for w, p, e in zip(windows, prompts, echoes):
            lps = e.chosen[len(p) - w.num_scored : len(p)]
            if len(lps) != w.num_scored or any(v is None for v in lps):
                raise FastServeError(f"{self.url} echoed too few prompt logprobs: {MISSING}.")
            parts.append(-np.asarray(lps, dtype=np.float64))
        return np.concatenate(parts)


class RemoteScorer:
    """The `Scorer` of loglikelihood.py over a RemoteServer. With text prompts it needs each
    doc's (context, continuations) strings, as Task.requests gives them."""

    def __init__(self, server: RemoteServer, pairs: list[tuple[str, list[str]]] | None = None):
        self.server = server
        self.pairs = pairs

    def _texts(self, d: int, j: int) -> tuple[str, str]:
        if self.pairs is None:
            raise FastServeError(f"{self.server.url} takes only text prompts; no texts were given.")
        context, conts = self.pairs[d]
        return split_pair(context, conts[j])

    def score(self, docs, on_doc=None):
        flat = [(d, j, r) for d, reqs in enumerate(docs) for j, r in enumerate(reqs)]
        if self.server.token_prompts:
            prompts = [list(r.token_ids) for _, _, r in flat]
        else:
            prompts = ["".join(self._texts(d, j)) for d, j, _ in flat]
        ends = list(itertools.accumulate(len(reqs) for reqs in docs))
        state = {"prompts": 0, "docs": 0}

        def on_batch(num_prompts: int) -> None:  # batches come back in order
            state["prompts"] += num_prompts
            while state["docs"] < len(ends) and ends[state["docs"]] <= state["prompts"]:
                state["docs"] += 1
                if on_doc is not None:
                    on_doc()

        echoes = self.server.echo_many(prompts, on_batch)
        results: list[list] = [[None] * len(reqs) for reqs in docs]
        for (d, j, r), e in zip(flat, echoes):
            cont = None if self.server.token_prompts else self._texts(d, j)[1]
            results[d][j] = self._result(r, e, cont)
        return results

    def _result(self, r: LoglikelihoodRequest, e: _Echo, cont: str | None) -> LoglikelihoodResult:
        if self.server.token_prompts:
            positions = range(r.start, len(r.token_ids))
        else:  # tokens starting at or after the continuation's first character
            num_prompt = e.num_tokens - 1
            end = e.offsets[num_prompt] if len(e.offsets) > num_prompt else None
            if end is None:
                raise FastServeError(f"{self.server.url} returned no text_offset for text prompts.")
            begin = end - len(cont)
            positions = [i for i in range(1, num_prompt) if e.offsets[i] >= begin]
        chosen = [e.chosen[i] for i in positions]
        best = [e.best[i] if e.best[i] is not None else e.chosen[i] for i in positions]
        if any(v is None for v in chosen):
            raise FastServeError(f"{self.server.url} echoed too few prompt logprobs: {MISSING}.")
        return greedy_result(chosen, best)


class RemoteGenerator:
    """The `Generator` of generative.py over a RemoteServer (the module docstring)."""

    def __init__(self, server: RemoteServer) -> None:
        self.server = server

    def _payload(self, req: GenRequest) -> tuple[str, dict]:
        p = req.params
        body = {
            "model": self.server.model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
        }
        if p.stop:
            body["stop"] = list(p.stop)
        if p.top_k:
            body["top_k"] = p.top_k
        if p.seed is not None:
            body["seed"] = p.seed
        if req.messages is not None:
            return CHAT_COMPLETIONS, {**body, "messages": [dict(m) for m in req.messages]}
        prompt = list(req.token_ids) if self.server.token_prompts else req.text
        return COMPLETIONS, {**body, "prompt": prompt}

    def _one(self, req: GenRequest) -> GenOutput:
        path, payload = self._payload(req)
        body = self.server._post(path, payload)
        choices = body.get("choices") if isinstance(body, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            raise FastServeError(f"{self.server.url}{path} answered without a choice.")
        if path == CHAT_COMPLETIONS:
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = choice.get("text")
        if text is None and choice.get("finish_reason") == "length":
            text = ""  # a chat answer cut before any text
        if not isinstance(text, str):
            raise FastServeError(f"{self.server.url}{path} returned no generated text.")
        usage = body.get("usage")
        num = usage.get("completion_tokens") if isinstance(usage, dict) else None
        num = num if isinstance(num, int) and not isinstance(num, bool) else 0
        return GenOutput(text, num, str(choice.get("finish_reason")))

    def generate(self, requests, on_done=None):
        out = []
        with ThreadPoolExecutor(self.server.concurrency) as pool:
            for res in pool.map(self._one, requests):  # in order
                out.append(res)
                if on_done is not None:
                    on_done()
        return out


class RemoteTokenizer:
    """encode_batch through the server's POST /tokenize (FastServe, vLLM), without special
    tokens: the tokenizer of a URL target given no --tokenizer dir."""

    def __init__(self, server: RemoteServer) -> None:
        self.server = server

    def _one(self, text: str) -> list[int]:
        return self._tokenize({"prompt": text, "add_special_tokens": False})

    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[None, list[int]]:
        """A chat prompt's token ids, rendered by the server's chat template (the text stays
        unknown here)."""
        return None, self._tokenize({"messages": messages, "add_generation_prompt": True})

    def _tokenize(self, fields: dict) -> list[int]:
        payload = {"model": self.server.model, **fields}
        try:
            body = self.server._post("/tokenize", payload)
        except FastServeError as exc:
            if "HTTP 404" in str(exc) or "HTTP 405" in str(exc):
                raise FastServeError(
                    f"{self.server.url} has no /tokenize; pass --tokenizer DIR (the model dir "
                    "whose tokenizer.json the server uses)."
                ) from None
            raise
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise FastServeError(f"POST {self.server.url}/tokenize did not return token ids.")
        return tokens

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        with ThreadPoolExecutor(self.server.concurrency) as pool:
            return list(pool.map(self._one, texts))
