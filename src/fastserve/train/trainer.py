"""The training loop: token shards in, an HF-format model dir out.

    train(TrainConfig(data_dir="data/", out_dir="runs/a", model="tiny", max_steps=200))
    torchrun --nproc_per_node 2 -m fastserve train --data_dir data/ --out_dir runs/a ...

One optimizer step = grad_accum micro-batches per process, each forward/backward in the compute
dtype, gradients averaged over processes (DDP) on the last micro-batch, clipped, AdamW step with
the scheduled learning rate, then the pruning masks (cfg.prune; train/pruning.py) re-applied.
`step` counts completed optimizer steps; checkpoint step_N holds the state after N steps, and
metrics line N describes step N.

Invariants a resumed or distributed run relies on:
- batches are a pure function of (seed, step, global micro-batch index) (see batches.py) and the
  learning rate a pure function of step, so N steps + resume + M steps == N + M steps exactly;
- only rank 0 writes files; every rank takes the same branches at the same steps (logging, eval
  and stop decisions), because each of those may run a collective.
Knows nothing about model internals (it needs logits from `model(input_ids)`) or tokenization.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastserve.errors import ConfigError
from fastserve.eval.perplexity import bits_per_byte, token_nll
from fastserve.train import checkpoints as ckpt
from fastserve.train import distributed as dist_utils
from fastserve.train.batches import BatchSampler
from fastserve.train.config import TrainConfig
from fastserve.train.metrics import MetricsLog, ProgressLine, write_run_info
from fastserve.train.optim import build_optimizer, lr_at, set_lr
from fastserve.train.pruning import build_pruner

__all__ = ["TrainConfig", "TrainResult", "train"]


@dataclass
class TrainResult:
    final_dir: Path  # out_dir/model: HF-format model dir with tokenizer and generation config
    steps: int  # optimizer steps completed, counting steps before a resume
    last_train_loss: float | None  # train loss of the last step (None if no step ran)
    last_val_loss: float | None  # mean val loss of the last evaluation (None if eval disabled)
    val_bpb: float | None  # bits per byte of that evaluation
    tokens_per_s: float  # global training throughput of this invocation, first step excluded
    stop_reason: str  # "max_steps", "max_time" (max_time_s spent) or "signal" (SIGINT/SIGTERM)


class _StopSignals:
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second one interrupts now."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        # Under torchrun, Ctrl-C reaches each worker as SIGINT and then as SIGTERM from the
        # agent: only a repeated SIGINT (a second Ctrl-C) abandons the checkpoint.
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT == self.received:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _load_data(cfg: TrainConfig):
    from fastserve.data.shards import ShardMeta, TokenShards, check_tokenizer
    from fastserve.data.tokenizer import Tokenizer

    meta = ShardMeta.load(cfg.data_dir)
    tokenizer = Tokenizer.load(cfg.data_dir)
    check_tokenizer(meta, tokenizer)
    train_shards = TokenShards(cfg.data_dir, "train")
    val_shards = TokenShards(cfg.data_dir, "val") if cfg.eval_iters > 0 else None
    for shards in (train_shards, val_shards):
        if shards is not None:
            shards.num_windows(cfg.block_size)  # too few tokens -> DataError now, not at step N
    return meta, tokenizer, train_shards, val_shards


def _build_model(cfg: TrainConfig, vocab_size: int, tokenizer) -> nn.Module:
    from fastserve.model import LlamaForCausalLM, resolve_config

    overrides = {
        "vocab_size": vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **cfg.model_overrides,
    }
    model_config = resolve_config(cfg.model, **overrides)
    if model_config.vocab_size < vocab_size:
        raise ConfigError(
            f"model vocab_size {model_config.vocab_size} is smaller than the data's vocabulary "
            f"({vocab_size} tokens)."
        )
    cfg.check_block_size(model_config.max_position_embeddings)
    model = LlamaForCausalLM(model_config)
    model.init_weights(cfg.seed)
    return model


def _check_device(cfg: TrainConfig, device: str) -> None:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device} was asked for, but CUDA is not available here.")
        if cfg.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"dtype bfloat16 is not supported on {device}; use float32.")


@torch.no_grad()
def _evaluate(model, sampler: BatchSampler, eval_iters: int, env, device, autocast) -> float:
    """Mean val loss over eval batches 0..eval_iters-1, split across ranks (i % world == rank)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(env.rank, eval_iters, env.world_size):
        x, y = sampler.eval_batch(i)
        with autocast():
            logits = model(x)
        total += token_nll(logits, y, reduction="mean")
    model.train(was_training)
    return dist_utils.all_reduce_sum(total).item() / eval_iters


def _accumulate_gradients(
    train_model: nn.Module,
    sampler: BatchSampler,
    step: int,
    grad_accum: int,
    rank: int,
    autocast,
) -> torch.Tensor:
    """Forward/backward `grad_accum` micro-batches of `step` into .grad; return their mean loss
    (a device tensor: reading it is a sync, left to the logging steps). Gradients equal those of
    the mean loss over the whole global batch once DDP has averaged them on the last micro-step.
    """
    loss_sum = None
    for j in range(grad_accum):
        x, y = sampler.train_batch(step, rank * grad_accum + j)
        with dist_utils.maybe_no_sync(train_model, sync=j == grad_accum - 1):
            with autocast():
                logits = train_model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / grad_accum).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return loss_sum / grad_accum


def _resume(cfg: TrainConfig, model: nn.Module, optimizer) -> tuple[Path | None, dict]:
    """Load the newest complete checkpoint into model and optimizer when cfg.resume says so;
    return (its path, its trainer state). A fresh run must not overwrite an existing one."""
    if not cfg.resume:
        if ckpt.list_checkpoints(cfg.out_dir):
            raise ConfigError(
                f"{cfg.out_dir} already has checkpoints; resume it (--resume) "
                "or choose another out_dir."
            )
        return None, {}
    path = ckpt.latest_checkpoint(cfg.out_dir)
    if path is None:
        return None, {}
    state = ckpt.load_trainer_state(path)
    ckpt.load_model_weights(model, path)
    optimizer.load_state_dict(state["optimizer"])
    return path, state


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) training as `cfg` says; under torchrun every process calls this."""
    cfg.validate()
    _check_device(cfg, cfg.device)
    owns_process_group = not torch.distributed.is_initialized()
    env = dist_utils.init_distributed(cfg.device)
    try:
        return _train(cfg, env, progress and env.is_main)
    finally:
        if owns_process_group:
            dist_utils.destroy_distributed()


def _train(cfg: TrainConfig, env: dist_utils.DistributedEnv, show: bool) -> TrainResult:
    device = env.device_for(cfg.device)
    out_dir = Path(cfg.out_dir)
    meta, tokenizer, train_shards, val_shards = _load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, meta.vocab_size, tokenizer).to(device)
    optimizer = build_optimizer(
        model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device=device
    )

    resume_from, state = _resume(cfg, model, optimizer)
    pruner = build_pruner(cfg, model, optimizer, state.get("pruning"))  # None: no pruning
    start_step, tokens_seen = int(state.get("step", 0)), int(state.get("tokens_seen", 0))
    elapsed_before_s = float(state.get("elapsed_s", 0.0))

    train_model = dist_utils.wrap_ddp(model, env, device)
    if cfg.compile:
        train_model = torch.compile(train_model)
    device_type = torch.device(device).type
    if cfg.dtype == "bfloat16":
        autocast = functools.partial(torch.autocast, device_type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    train_sampler = BatchSampler(train_shards, cfg.batch_size, cfg.block_size, cfg.seed, device)
    val_sampler = BatchSampler(val_shards, cfg.batch_size, cfg.block_size, cfg.seed, device)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * env.world_size

    metrics = None
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(
            out_dir,
            {
                "config": cfg.to_dict(),
                "model_config": model.config.to_hf_dict(),
                "num_parameters": model.num_parameters(),
                "world_size": env.world_size,
                "device": device,
                "tokens_per_step": tokens_per_step,
                "data": {
                    "vocab_size": meta.vocab_size,
                    "train_tokens": train_shards.num_tokens,
                    "val_tokens": val_shards.num_tokens if val_shards else None,
                },
                "resumed_from": str(resume_from) if resume_from else None,
            },
        )
        metrics = MetricsLog(out_dir, resume_step=start_step if resume_from else None)
    line = ProgressLine(cfg.max_steps, start_step, enabled=show)
    line.print(
        f"model {cfg.model}: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{env.world_size} process(es) on {device}, {tokens_per_step} tokens per step"
        + (f", resumed from {resume_from}" if resume_from else "")
    )

    def save_checkpoint(step: int, elapsed_s: float) -> None:
        if env.is_main:
            state = {
                "config": cfg.to_dict(),
                "world_size": env.world_size,
                "tokens_seen": tokens_seen,
                "elapsed_s": elapsed_s,
            }
            if pruner is not None:
                state["pruning"] = pruner.state_dict()
            path = ckpt.save_checkpoint(
                out_dir, step, model, optimizer, tokenizer, state, cfg.keep_last
            )
            line.print(f"saved checkpoint {path}")
        dist_utils.barrier()

    def evaluate() -> tuple[float, float]:
        loss = _evaluate(model, val_sampler, cfg.eval_iters, env, device, autocast)
        bpb = bits_per_byte(loss, val_shards.bytes_per_token)
        line.print(f"step {step}: val loss {loss:.4f}, {bpb:.4f} bits/byte")
        return loss, bpb

    step = start_step
    last_loss = last_val = last_bpb = None
    last_ckpt_step = start_step if resume_from else -1
    stop_reason = "max_steps"
    # Throughput clocks: eval and checkpoint time (pause_s) is not training time.
    t_start = t_log = time.perf_counter()
    t_first, tokens_at_first, step_at_log, pause_s = None, 0, start_step, 0.0
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(line.close)
        if metrics is not None:
            cleanup.callback(metrics.close)
        signals = cleanup.enter_context(_StopSignals())
        while step < cfg.max_steps:
            position = pruner.lr_position(step, cfg.max_steps) if pruner else (step, cfg.max_steps)
            lr = lr_at(position[0], cfg.lr, cfg.min_lr, cfg.warmup_steps, position[1])
            set_lr(optimizer, lr)
            loss = _accumulate_gradients(
                train_model, train_sampler, step, cfg.grad_accum, env.rank, autocast
            )
            step += 1
            tokens_seen += tokens_per_step

            # Every rank must take the same branches below (they run collectives).
            time_up = cfg.max_time_s is not None and time.perf_counter() - t_start >= cfg.max_time_s
            interrupted = signals.received is not None
            if env.enabled:
                time_up = dist_utils.any_rank(time_up, device)
                interrupted = dist_utils.any_rank(interrupted, device)
            stopping = step >= cfg.max_steps or time_up or interrupted
            log_now = stopping or step % cfg.log_interval == 0
            periodic_eval = cfg.eval_interval > 0 and step % cfg.eval_interval == 0
            eval_now = cfg.eval_iters > 0 and not interrupted and (stopping or periodic_eval)

            if cfg.grad_clip > 0:
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            elif log_now:
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if pruner is not None:
                pruner.after_step(step, optimizer)

            if t_first is None:
                if device_type == "cuda":
                    torch.cuda.synchronize(device)
                t_first, tokens_at_first = time.perf_counter(), tokens_seen
            record: dict[str, float] = {"step": step}
            if log_now:
                last_loss = dist_utils.all_reduce_mean(loss).item()
                now = time.perf_counter()
                tokens_per_s = (step - step_at_log) * tokens_per_step / max(now - t_log, 1e-9)
                record.update(
                    loss=last_loss,
                    lr=lr,
                    grad_norm=float(grad_norm),
                    tokens_per_s=tokens_per_s,
                    elapsed_s=elapsed_before_s + now - t_start,
                )
                if pruner is not None:
                    record["sparsity"] = pruner.sparsity
                line.update(step, last_loss, lr, tokens_per_s)
            t_pause = time.perf_counter()
            if eval_now:
                last_val, last_bpb = evaluate()
                record.update(val_loss=last_val, val_bpb=last_bpb)
            if metrics is not None and len(record) > 1:
                metrics.write(record)
            if stopping or (cfg.ckpt_interval > 0 and step % cfg.ckpt_interval == 0):
                save_checkpoint(step, elapsed_before_s + time.perf_counter() - t_start)
                last_ckpt_step = step
            if log_now or eval_now:
                t_log, step_at_log = time.perf_counter(), step
            pause_s += time.perf_counter() - t_pause
            if stopping:
                if interrupted:
                    stop_reason = "signal"
                elif step < cfg.max_steps:
                    stop_reason = "max_time"
                break

        t_end = time.perf_counter()
        if step == start_step and cfg.eval_iters > 0:  # resumed at max_steps: nothing to train
            last_val, last_bpb = evaluate()
        if last_ckpt_step != step:
            save_checkpoint(step, elapsed_before_s + t_end - t_start)
        final_dir = out_dir / "model"
        if env.is_main:
            from fastserve.model import save_model

            sparse = pruner.sparsity_config() if pruner is not None else None
            save_model(model, final_dir, tokenizer=tokenizer, sparsity_config=sparse)
            line.print(f"saved model {final_dir} ({stop_reason} at step {step})")
        dist_utils.barrier()

    if t_first is not None and step - start_step > 1:
        train_s = t_end - t_first - pause_s
        tokens_per_s = (tokens_seen - tokens_at_first) / max(train_s, 1e-9)
    else:
        tokens_per_s = (step - start_step) * tokens_per_step / max(t_end - t_start, 1e-9)
    return TrainResult(
        final_dir=final_dir,
        steps=step,
        last_train_loss=last_loss,
        last_val_loss=last_val,
        val_bpb=last_bpb,
        tokens_per_s=tokens_per_s,
        stop_reason=stop_reason,
    )
