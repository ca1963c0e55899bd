"""Serving engine: continuous batching over a paged KV cache with preemptive scheduling.

request.py     SamplingParams, Request, RequestOutput (vLLM's shapes)
kv_cache.py    block pool, block tables, prefix cache, host swap tier (bookkeeping only)
scheduler.py   what runs each step (policies.py: fcfs, skip-join MLFQ, priority)
runner.py      KV tensors, batch inputs, model forward (attention.py: paged attention)
sampler.py     logits processors, seeded sampling, logprobs
detokenizer.py incremental text and stop strings
engine.py      LLMEngine: schedule -> run -> sample -> postprocess
llm.py         LLM offline API;  async_engine.py: AsyncEngine for streaming servers
"""

from fastserve.engine.async_engine import AsyncEngine
from fastserve.engine.config import EngineConfig
from fastserve.engine.engine import EngineStats, LLMEngine
from fastserve.engine.llm import LLM
from fastserve.engine.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
]
