"""What a model costs in memory, and what the memory can deliver: the bytes of its tensors, the
bytes one decode step must read, the process's RSS, the last-level cache and a measured copy
bandwidth (`fastserve eval --speed`, eval/speed.py).

    decode_read_bytes(model, batch_size=16, context_len=160)["total_bytes"]
    measure_bandwidth("cpu")["gb_per_s"]

What this module does not know: the engine, timing of models, results files.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "bandwidth_buffer_bytes",
    "current_rss_bytes",
    "decode_read_bytes",
    "kernel_cache_bytes",
    "kv_read_bytes",
    "last_level_cache_bytes",
    "measure_bandwidth",
    "memory_stats",
    "peak_rss_bytes",
    "sync",
    "weights_bytes",
]

MIN_BANDWIDTH_BUFFER = 256 * 2**20
MAX_BANDWIDTH_BUFFER = 2 * 2**30  # each of src and dst; also at most 1/8 of available memory
LLC_MULTIPLE = 4  # the copied buffer is at least this many times the last-level cache
GB = 1e9  # GB/s are decimal, as memory bandwidth is quoted


# ---- bytes ------------------------------------------------------------------------------------


def weights_bytes(model) -> int:
    """Bytes of the model's tensors as loaded: parameters and buffers (packed int weights, their
    scales and zero points included), each tensor once (a tied lm_head is the embedding).
    Kernel-layout copies that quantized layers build on first use are not included."""
    seen: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def kv_read_bytes(config, kv_dtype, batch_size: int, context_len: float) -> int:
    """K and V of every layer for `context_len` positions of `batch_size` sequences:
    2 x layers x kv_heads x head_dim x element size x context x batch."""
    import torch

    elem = torch.empty((), dtype=kv_dtype).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return round(per_token * elem * context_len * batch_size)


def decode_read_bytes(model, batch_size: int, context_len: float, kv_dtype=None) -> dict[str, int]:
    """What one decode step of `batch_size` sequences must read at least, by part:

      weights_bytes         every tensor of the model once (linears with their scales and zero
                            points, norms, lm_head) except the embedding table
      embedding_rows_bytes  the batch_size rows of the embedding gathered for the new tokens
                            (a tied table is read whole as the lm_head, in weights_bytes)
      kv_bytes              the K/V of `context_len` positions per sequence (`kv_read_bytes`)
      total_bytes           their sum

    Activations and the K/V written for the new tokens are not counted (small next to these)."""
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    table = embed.numel() * embed.element_size()
    weights = weights_bytes(model) - (0 if tied else table)
    rows = batch_size * embed.shape[1] * embed.element_size()
    kv = kv_read_bytes(model.config, kv_dtype or model.dtype, batch_size, context_len)
    return {
        "weights_bytes": weights,
        "embedding_rows_bytes": rows,
        "kv_bytes": kv,
        "total_bytes": weights + rows + kv,
    }


def kernel_cache_bytes(model) -> int:
    """Bytes of the kernel-layout weight copies quantized layers hold (built on first use)."""
    import torch

    total = 0
    for m in model.modules():
        for value in getattr(m, "_kernel_cache", {}).values():
            parts = value if isinstance(value, tuple | list) else (value,)
            total += sum(t.numel() * t.element_size() for t in parts if torch.is_tensor(t))
    return total


# ---- memory ----------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """The process's peak resident set size over its whole lifetime so far (getrusage
    ru_maxrss: KiB on Linux, bytes on macOS), not just during a measurement."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
    """Resident set size now (/proc/self/statm); None where there is no /proc."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_stats(device) -> dict[str, Any]:
    """Peak (process lifetime) and current RSS; on CUDA the peak and current allocated bytes
    since the caller's `torch.cuda.reset_peak_memory_stats`."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    rss = current_rss_bytes()
    return {
        # the kernel's two counters are approximate by a few pages: the peak is at least now
        "peak_rss_bytes": max(peak_rss_bytes(), rss or 0),
        "rss_bytes": rss,
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "cuda_allocated_bytes": torch.cuda.memory_allocated(device) if cuda else None,
    }


# ---- bandwidth -------------------------------------------------------------------------------


def _parse_cache_size(text: str) -> int:
    """'32768K' / '16M' / '1024' (sysfs cache sizes) -> bytes."""
    text = text.strip().upper()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def last_level_cache_bytes(device="cpu") -> int | None:
    """The largest cache level's size: CPU from /sys/devices/system/cpu/cpu0/cache/index*/
    (a shared L3 reports its whole size), CUDA the device's L2; None when unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or None
    best: tuple[int, int] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and (best is None or (level, size) > best):
            best = (level, size)
    return None if best is None else best[1]


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def bandwidth_buffer_bytes(llc_bytes: int | None, available_bytes: int | None = None) -> int:
    """Size of each of the copy's two buffers: max(256 MiB, 4 x the last-level cache), at most
    2 GiB and 1/8 of the available memory (never under 64 MiB)."""
    size = max(MIN_BANDWIDTH_BUFFER, LLC_MULTIPLE * (llc_bytes or 0))
    size = min(size, MAX_BANDWIDTH_BUFFER)
    if available_bytes is not None:
        size = min(size, max(64 * 2**20, available_bytes // 8))
    return size


def measure_bandwidth(device="cpu", buffer_bytes: int | None = None, repeats: int = 5) -> dict:
    """Memory bandwidth in GB/s: the best of `repeats` timed `dst.copy_(src)` of `buffer_bytes`
    (default `bandwidth_buffer_bytes`) after one untimed copy; bytes moved = read + write."""
    import torch

    device = torch.device(device)
    llc = last_level_cache_bytes(device)
    if buffer_bytes is None:
        available = None if device.type == "cuda" else _available_memory_bytes()
        buffer_bytes = bandwidth_buffer_bytes(llc, available)
    n = max(1, int(buffer_bytes) // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)  # written: its pages are mapped
    dst = torch.empty_like(src)
    best = float("inf")
    for k in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if k:  # the first copy maps dst's pages
            best = min(best, time.perf_counter() - t0)
    moved = 2 * n * 4
    del src, dst
    return {
        "gb_per_s": moved / best / GB,
        "buffer_bytes": n * 4,
        "bytes_per_copy": moved,
        "best_copy_s": best,
        "repeats": repeats,
        "llc_bytes": llc,
        "method": "best of repeats of dst.copy_(src), bytes = read + write",
    }


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
