"""`EngineConfig`: the serving engine's knobs, with vLLM's names where vLLM has one.

    engine = LLMEngine.from_model_dir("runs/small/model", EngineConfig(policy="fcfs"))
    llm = LLM("runs/small/model", kv_cache_memory="512MiB", max_num_seqs=32)

Memory sizes accept bytes or strings like "2GiB", "512MiB", "1.5GB". Knows nothing about requests.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from fastserve.engine.scheduler import SchedulerConfig

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_bytes(value: str | int | float, name: str = "size") -> int:
    """'2GiB' -> 2147483648; ints pass through. ValueError naming `name` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size like '2GiB' or a byte count, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{name} must be a size like '2GiB', '512MiB' or '1GB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class EngineConfig:
    # Scheduling policy: "mlfq" (skip-join multi-level feedback queue, preemptive), "fcfs"
    # (continuous batching in arrival order) or "priority" (by request priority, then arrival).
    policy: str = "mlfq"
    # KV cache budget on the device, e.g. "2GiB"; ignored when num_kv_blocks is set.
    kv_cache_memory: str | int = "1GiB"
    # Exact number of device KV blocks (overrides kv_cache_memory); small values force preemption.
    num_kv_blocks: int | None = None
    # Tokens per KV block.
    block_size: int = 16
    # Host-tier (swap) KV budget, e.g. "1GiB"; 0 disables swapping (preemption recomputes).
    swap_space: str | int = "512MiB"
    # Exact number of host KV blocks (overrides swap_space).
    num_host_blocks: int | None = None
    # Preempted requests: "recompute" (drop KV, redo the prefill) or "swap" (to the host tier).
    preemption_mode: str = "swap"
    # At most this many sequences run in one step.
    max_num_seqs: int = 64
    # At most this many tokens (prefill chunks + decodes) are computed in one step.
    max_num_batched_tokens: int = 512
    # Longest sequence (prompt + output); default: the model's max_position_embeddings.
    max_model_len: int | None = None
    # Share the KV of identical prompt prefixes (full blocks) between requests.
    enable_prefix_caching: bool = True
    # MLFQ: number of queues; quanta double per level starting at mlfq_base_quantum_s.
    mlfq_num_queues: int = 4
    # MLFQ: quantum of the top queue in seconds (None: 8 decode steps of the profiled cost model).
    mlfq_base_quantum_s: float | None = None
    # MLFQ: a request waiting longer than this is promoted to the top queue.
    starvation_limit_s: float = 5.0
    # Proactive swapping starts when free device blocks fall under this fraction.
    swap_out_threshold: float = 0.1
    # Decode attention through the fused CPU paged-attention kernel (built on first use; the
    # gather-based path otherwise, and always on CUDA).
    fused_attention: bool = True
    # Torch device ("cpu", "cuda", "cuda:N") and weights dtype (None: the checkpoint's).
    device: str = "cpu"
    dtype: str | None = None
    # Seed of the generator used by sampled requests that have no seed of their own.
    seed: int = 0

    def __post_init__(self) -> None:
        # the scheduling fields are validated where they are defined (SchedulerConfig)
        self.scheduler_config(self.max_model_len or self.max_num_batched_tokens)
        parse_bytes(self.kv_cache_memory, "kv_cache_memory")
        parse_bytes(self.swap_space, "swap_space")
        for name in ("block_size", "num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_host_blocks is not None and self.num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {self.num_host_blocks}")

    def scheduler_config(self, max_model_len: int, swap: bool = True) -> SchedulerConfig:
        """The scheduler's share of these options; `swap=False` when there is no host tier."""
        return SchedulerConfig(
            policy=self.policy,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=max_model_len,
            preemption_mode=self.preemption_mode if swap else "recompute",
            mlfq_num_queues=self.mlfq_num_queues,
            mlfq_base_quantum_s=self.mlfq_base_quantum_s,
            starvation_limit_s=self.starvation_limit_s,
            swap_out_threshold=self.swap_out_threshold,
        )

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)
