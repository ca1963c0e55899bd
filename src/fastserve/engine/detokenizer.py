"""Incremental detokenization with stop strings, for streaming.

    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["\\n\\n"], min_tokens=0)
    delta = detok.add([token_id])       # new text, possibly ""
    if detok.stop_hit is not None: ...  # finish with stop_reason = detok.stop_hit
    delta = detok.flush()               # when the request finishes for another reason

Invariants (checked by the tests):
- the concatenated deltas equal `.text`, and, when no stop string hit and after `flush()`,
  `tokenizer.decode(output_ids, skip_special_tokens)`;
- a delta never ends inside a UTF-8 character: while the decoded text ends in U+FFFD (an
  incomplete byte sequence) it is held back until the next token completes it (or `flush()`);
- no emitted delta ever contains the start of a stop-string match: the longest suffix of the
  text that is a proper prefix of some stop string is held back (< len(longest stop) chars);
- a stop string is found across any number of tokens; the text is cut at its start (or its end
  with include_stop_str_in_output) and `stop_hit` is set; later tokens are ignored. Stop strings
  only match once more than `min_tokens` tokens were generated (vLLM's rule).

Decoding uses vLLM's two offsets over prompt tail + output ids, so each token costs a decode of a
few tokens, not of the whole output. What it does not know: token-level stops (eos, stop ids,
lengths; see request.check_stop), sampling, and requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastserve.data.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode puts for an incomplete byte sequence
_PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output (vLLM's initial offset)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.stop_hit: str | None = None  # the stop string that matched, once one has
        self.num_output_tokens = 0
        # Context tokens from the prompt so tokenizers whose decode depends on the previous
        # token (sentencepiece's leading space) decode the first output token as in the full
        # text. Dropped when the prompt tail does not decode cleanly (it ends mid-character),
        # so the output's text is never shifted by a character that belongs to the prompt.
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if _REPLACEMENT in self._decode(context):
            context = []
        self._ids: list[int] = context  # context + output ids
        # _ids[_prefix:_read] decodes to text already appended to _text; _ids[_read:] is pending.
        self._prefix = 0
        self._read = len(context)
        self._text = ""  # all complete-character output text decoded so far (cut at a stop)
        self._num_emitted = 0  # _text[:_num_emitted] has been returned as deltas

    @classmethod
    def from_request(cls, tokenizer: Tokenizer, request) -> IncrementalDetokenizer:
        """Built from a `fastserve.engine.request.Request`'s prompt and sampling params."""
        p = request.sampling_params
        return cls(
            tokenizer,
            request.prompt_token_ids,
            skip_special_tokens=p.skip_special_tokens,
            stop=p.stop,
            include_stop_str_in_output=p.include_stop_str_in_output,
            min_tokens=p.min_tokens,
        )

    @property
    def text(self) -> str:
        """The output text so far, held-back text included (stop string cut off if hit)."""
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Feed new output tokens; return the text that is now safe to emit ("" if none).
        `final=True` also releases held-back text (the request is finishing)."""
        for token_id in token_ids:
            if self.stop_hit is not None:
                break
            self._ids.append(int(token_id))
            self.num_output_tokens += 1
            old_len = len(self._text)
            self._decode_pending(force=False)
            if self.stop and self.num_output_tokens > self.min_tokens:
                self._check_stop(old_len)
        if final:
            return self.flush()
        return self._emit()

    def flush(self) -> str:
        """Release everything held back (a trailing incomplete character decodes as U+FFFD, as
        in `tokenizer.decode`); call once when the request finishes."""
        if self.stop_hit is None:
            self._decode_pending(force=True)
        delta = self._text[self._num_emitted :]
        self._num_emitted = len(self._text)
        return delta

    def _decode_pending(self, force: bool) -> None:
        if self._read == len(self._ids):
            return
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and (force or not new_text.endswith(_REPLACEMENT)):
            self._text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _check_stop(self, old_len: int) -> None:
        """Find the earliest stop-string match that ends in the text added after old_len."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            # A match ending after old_len starts at or after old_len - len(s) + 1.
            i = self._text.find(s, max(0, old_len - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.stop_hit = s
            self._text = self._text[: i + len(s) if self.include_stop_str_in_output else i]

    def _held_back(self) -> int:
        """Chars at the end of _text that could begin a stop-string match."""
        if self.stop_hit is not None or not self.stop:
            return 0
        text, best = self._text, 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self) -> str:
        end = max(len(self._text) - self._held_back(), self._num_emitted)
        delta = self._text[self._num_emitted : end]
        self._num_emitted = end
        return delta
