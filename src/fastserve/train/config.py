"""`TrainConfig`: every knob of a training run, with its --help text, and its validation.

The CLI (`fastserve train`) builds one flag per field with the same name and uses the comment
above each field as the help text; `train(cfg)` is the Python entry point. This module knows the
run's numbers only: it does not know the model's context length or the data (the trainer checks
`block_size` against the resolved model config with `check_block_size`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fastserve.errors import ConfigError

DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    # Directory of token shards made by `fastserve data` (meta.json, *.bin, tokenizer.json).
    data_dir: str
    # Run directory: metrics.jsonl, run.json, checkpoints/step_N/, and the final model/.
    out_dir: str
    # Model preset (tiny, small, base) or path to a config.json; vocab_size comes from the data.
    model: str = "small"
    # Model config overrides (key=value on the CLI), e.g. {"num_hidden_layers": 6}.
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Sequences per micro-batch per process.
    batch_size: int = 16
    # Tokens per sequence (at most the model's max_position_embeddings).
    block_size: int = 256
    # Micro-batches per optimizer step; global batch = batch_size * grad_accum * world size.
    grad_accum: int = 1
    # Optimizer steps to run in total (counting steps done before a resume).
    max_steps: int = 1000
    # Peak learning rate, reached at the end of warmup.
    lr: float = 1e-3
    # Learning rate at the end of the cosine decay (at max_steps).
    min_lr: float = 1e-4
    # Steps of linear warmup from ~0 to lr.
    warmup_steps: int = 100
    # AdamW decoupled weight decay, applied to matrices and embeddings (not to norms or biases).
    weight_decay: float = 0.1
    # AdamW beta1 (momentum).
    beta1: float = 0.9
    # AdamW beta2 (second-moment decay).
    beta2: float = 0.95
    # Clip the global gradient norm to this value (0 disables clipping).
    grad_clip: float = 1.0
    # Compute dtype: float32, or bfloat16 autocast (weights and optimizer state stay float32).
    dtype: str = "float32"
    # Evaluate val loss and bits-per-byte every N steps (0: only at the end).
    eval_interval: int = 100
    # Val batches per evaluation (0 disables evaluation).
    eval_iters: int = 20
    # Write a metrics.jsonl line and refresh the progress line every N steps.
    log_interval: int = 10
    # Save a checkpoint every N steps (0: only at the end).
    ckpt_interval: int = 200
    # Keep the newest K checkpoints and delete older ones.
    keep_last: int = 3
    # Seed for weight init and batch sampling (a run is reproducible from its seed).
    seed: int = 1337
    # Device: cpu, cuda or cuda:N (under torchrun each process uses cuda:LOCAL_RANK).
    device: str = "cpu"
    # Compile the model with torch.compile (faster steps after a slow first one).
    compile: bool = False
    # Continue from the newest complete checkpoint in out_dir (starts fresh if there is none).
    resume: bool = False
    # Stop after this many seconds of wall time, saving a checkpoint and the model (None: no limit).
    max_time_s: float | None = None
    # Training-time pruning of the decoder linears (embeddings and lm_head stay dense): none;
    # gradual (magnitude, Zhu & Gupta's cubic schedule); lottery (iterative magnitude pruning with
    # weight rewinding, Frankle & Carbin). Pruned weights stay exactly 0; the final model is sparse.
    prune: str = "none"
    # Rank |w| within each linear (layer: each loses the same fraction) or all together (global).
    prune_scope: str = "layer"
    # gradual: final sparsity s_f, reached at prune_end_step.
    prune_sparsity: float = 0.5
    # gradual: sparsity s_i set at prune_start_step.
    prune_initial_sparsity: float = 0.0
    # gradual: step t0 after which the first mask is set (0: before the first step).
    prune_start_step: int = 0
    # gradual: step at which the sparsity reaches prune_sparsity (None: 3/4 of max_steps).
    prune_end_step: int | None = None
    # gradual: recompute the mask every N steps between prune_start_step and prune_end_step.
    prune_interval: int = 10
    # lottery: pruning rounds; the run trains prune_rounds + 1 segments, pruning between them.
    prune_rounds: int = 3
    # lottery: fraction of the remaining weights pruned after each segment.
    prune_rate_per_round: float = 0.2
    # lottery: step whose weights (and learning rate) every later segment restarts from; needs
    # max_steps - rewind_step divisible by prune_rounds + 1.
    rewind_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}.")
        return cls(**d)

    def validate(self) -> TrainConfig:
        """Raise ConfigError with one sentence for the first bad field; return self when fine."""
        if not self.data_dir:
            raise ConfigError("data_dir is required (a directory made by `fastserve data`).")
        if not self.out_dir:
            raise ConfigError("out_dir is required.")
        for name in ("batch_size", "block_size", "grad_accum", "max_steps", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("warmup_steps", "eval_interval", "eval_iters", "ckpt_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}.")
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(f"keep_last must be at least 1, got {self.keep_last!r}.")
        if self.block_size < 2:
            raise ConfigError(f"block_size must be at least 2, got {self.block_size}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}.")
        if not (0 <= self.min_lr <= self.lr):
            raise ConfigError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr!r}.")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip!r}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise ConfigError(f"max_time_s must be positive when set, got {self.max_time_s!r}.")
        if not isinstance(self.model_overrides, dict):
            raise ConfigError("model_overrides must be a mapping of config field to value.")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}.")
        self._validate_pruning()
        return self

    @property
    def resolved_prune_end_step(self) -> int:
        """prune_end_step, or 3/4 of max_steps when it is None."""
        return self.max_steps * 3 // 4 if self.prune_end_step is None else self.prune_end_step

    def _validate_pruning(self) -> None:
        from fastserve.train.pruning import METHODS, SCOPES

        if self.prune not in METHODS:
            raise ConfigError(f"prune must be one of {', '.join(METHODS)}, got {self.prune!r}.")
        if self.prune_scope not in SCOPES:
            raise ConfigError(
                f"prune_scope must be one of {', '.join(SCOPES)}, got {self.prune_scope!r}."
            )
        for name in ("prune_start_step", "prune_interval", "prune_rounds", "rewind_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}.")
        if self.prune == "gradual":
            s_i, s_f = self.prune_initial_sparsity, self.prune_sparsity
            if not (0 <= s_f < 1):
                raise ConfigError(f"prune_sparsity must be in [0, 1), got {s_f!r}.")
            if not (0 <= s_i <= s_f):
                raise ConfigError(
                    f"prune_initial_sparsity must be in [0, prune_sparsity={s_f}], got {s_i!r}."
                )
            if self.prune_interval < 1:
                raise ConfigError(f"prune_interval must be at least 1, got {self.prune_interval}.")
            start, end = self.prune_start_step, self.resolved_prune_end_step
            if not (isinstance(end, int) and start < end <= self.max_steps):
                raise ConfigError(
                    f"prune=gradual needs prune_start_step < prune_end_step <= max_steps, got "
                    f"{start}, {end}, {self.max_steps}."
                )
        if self.prune == "lottery":
            if self.prune_rounds < 1:
                raise ConfigError(f"prune_rounds must be at least 1, got {self.prune_rounds}.")
            if not (0 < self.prune_rate_per_round < 1):
                raise ConfigError(
                    f"prune_rate_per_round must be in (0, 1), got {self.prune_rate_per_round!r}."
                )
            segments, span = self.prune_rounds + 1, self.max_steps - self.rewind_step
            if span < segments or span % segments:
                fit = self.rewind_step + max(span // segments, 1) * segments
                raise ConfigError(
                    f"prune=lottery trains {segments} segments of equal length after rewind_step: "
                    f"max_steps - rewind_step ({span}) must be a positive multiple of {segments} "
                    f"(e.g. max_steps {fit})."
                )

    def check_block_size(self, max_position_embeddings: int) -> None:
        """block_size is bounded by the model's context; known only once the model is resolved."""
        if self.block_size > max_position_embeddings:
            raise ConfigError(
                f"block_size {self.block_size} is larger than the model's context length "
                f"max_position_embeddings={max_position_embeddings}."
            )


def field_help(cls: type = TrainConfig) -> dict[str, str]:
    """{field name: the comment above it}: the --help text of each CLI flag, kept in one place."""
    helps: dict[str, str] = {}
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
            continue
        m = re.match(r"(\w+)\s*:", text)
        if m and comment:
            helps[m.group(1)] = " ".join(comment)
        comment = []
    return helps
