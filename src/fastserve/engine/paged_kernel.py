"""The fused CPU paged-attention kernel (csrc/paged_attention.cpp): build once, load, call.

    from fastserve.engine import paged_kernel
    if paged_kernel.available():
        out = paged_kernel.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens)

The C++ source is compiled on first use with torch's cpp_extension (g++ and ninja, -O3
-march=native) into torch's extension cache (~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR) and loaded from there afterwards (`make setup` builds it). Decode rows read
their K/V in place from the block pool with an online softmax, so a step no longer copies every
decode's whole context out of the pool before attention (attention.py's gather path, which stays
the reference and the fallback: CUDA, float64, no compiler, or FASTSERVE_NO_KERNELS=1).

What it does not know: block accounting, requests, the model. Inputs are plain tensors.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_lock = threading.Lock()
_module = None
_tried = False


def load(verbose: bool = False):
    """The compiled extension module, building it if needed; None when it cannot be built
    (a warning says why) or when FASTSERVE_NO_KERNELS is set."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("FASTSERVE_NO_KERNELS"):
            return None
        try:
            from torch.utils.cpp_extension import load as build

            # ninja from the virtual environment when it is not on PATH
            bindir = str(Path(sys.executable).parent)
            if bindir not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
            _module = build(
                name="fastserve_paged_attention_v3",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=verbose,
            )
        except Exception as exc:  # no compiler, no ninja, a read-only cache ...
            warnings.warn(
                f"the fused paged-attention kernel could not be built ({exc}); the engine uses "
                "the slower gather-based attention",
                RuntimeWarning,
                stacklevel=2,
            )
            _module = None
        return _module


def available() -> bool:
    return load() is not None


def supports(q: Tensor) -> bool:
    """Whether the kernel can serve these queries (CPU, a supported dtype, kernel built)."""
    return q.device.type == "cpu" and q.dtype in DTYPES and available()


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale) v of one query token per request over its paged context.

    q [nd, H, D]; caches [num_blocks, bs, Hkv, D]; block_tables [nd, nb] int64 (rows padded
    with any valid block id); seq_lens [nd] int64. Returns [nd, H, D] in q's dtype.
    """
    module = load()
    if module is None:
        raise RuntimeError("the fused paged-attention kernel is not available")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return module.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
