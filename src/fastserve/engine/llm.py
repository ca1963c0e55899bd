"""`LLM`: the offline API, shaped like vLLM's.

    from fastserve import LLM, SamplingParams
    llm = LLM("runs/small/model", policy="fcfs", kv_cache_memory="512MiB")
    outs = llm.generate(["def main(", "import os"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].outputs[0].text, outs[0].outputs[0].finish_reason)

Prompts are strings or lists of token ids (used exactly as given: no BOS is added). Returns one
`RequestOutput` per prompt, in order. A prompt that cannot be served (longer than the context) gets
an output with finish_reason "error" and its message; the other prompts are served as usual.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fastserve.engine.config import EngineConfig
from fastserve.engine.engine import LLMEngine
from fastserve.engine.request import CompletionOutput, RequestOutput, SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str, **engine_options) -> None:
        self.engine = LLMEngine.from_model_dir(model, EngineConfig.from_kwargs(**engine_options))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; one output per prompt, in the order given."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params)} entries for {len(prompts)} prompts"
                )
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts")

        results: dict[str, RequestOutput] = {}
        order = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            request_id = f"offline-{next(self._ids)}"
            order.append(request_id)
            try:
                self.engine.add_request(
                    request_id, prompt, p, priority=priority[i] if priority else 0
                )
            except ValueError as exc:  # this prompt only: report it, serve the others
                results[request_id] = _error_output(request_id, prompt, p, str(exc))

        with Progress(
            TextColumn("generate"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tok_s]}"),
            TimeElapsedColumn(),
            disable=not use_tqdm,
            transient=True,
        ) as bar:
            task = bar.add_task("generate", total=len(prompts), tok_s="")
            bar.advance(task, len(results))
            t0, start = time.perf_counter(), self.engine.num_generation_tokens
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[out.request_id] = out
                        bar.advance(task)
                produced = self.engine.num_generation_tokens - start
                rate = produced / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, tok_s=f"{rate:,.0f} tok/s")
        return [results[rid] for rid in order]


def _error_output(request_id: str, prompt: Prompt, params: SamplingParams, message: str):
    ids = prompt if isinstance(prompt, list) else []
    return RequestOutput(
        request_id=request_id,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=ids,
        prompt_logprobs=None,
        outputs=[
            CompletionOutput(
                index=i,
                text="",
                token_ids=[],
                cumulative_logprob=None,
                logprobs=None,
                finish_reason="error",
                stop_reason=message,
            )
            for i in range(params.n)
        ],
        finished=True,
        metrics=None,
    )
