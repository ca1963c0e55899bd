"""Which token windows each micro-batch reads: a pure function of (seed, step, index).

    global micro-batch index  g = rank * grad_accum + j        (j = micro-step on this rank)

    step s, world 2, grad_accum 2:   rank 0 -> g = 0, 1    rank 1 -> g = 2, 3
    step s, world 1, grad_accum 4:   rank 0 -> g = 0, 1, 2, 3          (the same four windows)

Micro-batch g of step s draws from a generator seeded by (seed, s, g), so (a) resuming at step s
needs no saved RNG state, and (b) N processes with grad_accum a read exactly the windows that one
process with grad_accum N*a reads. Eval batch i uses (seed, EVAL, i): the same val windows at every
evaluation and for any world size. Knows nothing about the model; window sampling itself is
`TokenShards.get_batch`.
"""

from __future__ import annotations

import numpy as np
import torch

_TRAIN, _EVAL = 0, 1  # stream tags: train and eval seeds never collide


def batch_seed(seed: int, stream: int, step: int, index: int) -> int:
    """A 64-bit seed mixing all four numbers (SplitMix via numpy's SeedSequence)."""
    words = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, stream, step, index]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


class BatchSampler:
    """Deterministic batches from a `TokenShards` split (duck typed: needs get_batch)."""

    def __init__(
        self, shards, batch_size: int, block_size: int, seed: int, device: str = "cpu"
    ) -> None:
        self.shards = shards
        self.device = device  # batches land here (pinned + non-blocking copy on CUDA)
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed

    def _batch(self, stream: int, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(batch_seed(self.seed, stream, step, index))
        return self.shards.get_batch(self.batch_size, self.block_size, g, device=self.device)

    def train_batch(self, step: int, global_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors [batch_size, block_size] for micro-batch `global_index` of `step`."""
        return self._batch(_TRAIN, step, global_index)

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(_EVAL, 0, index)
