"""Training-time pruning of the decoder linears: gradual magnitude pruning on Zhu & Gupta's cubic
schedule, and iterative magnitude pruning with weight rewinding (the lottery-ticket procedure of
Frankle & Carbin 2019, with the rewinding of Frankle et al. 2020).

    pruner = build_pruner(cfg, model, optimizer, saved)   # None for prune=none
    lr = lr_at(*pruner.lr_position(step), ...)            # lottery rewinds the LR schedule too
    optimizer.step(); pruner.after_step(step, optimizer)  # pruned weights set back to 0
    state["pruning"] = pruner.state_dict()                # masks (+ rewind weights): checkpoints

What is pruned: the weight of every nn.Linear inside the decoder layers (`model.layers.*`);
embeddings, lm_head, norms and biases stay dense. A mask is True where a weight is pruned; masks
only grow, and after every optimizer step the pruned weights are set to exactly 0 (AdamW's decay
and momentum would move them). `prune_scope` "layer" ranks |w| within each linear (each loses
the same fraction, floor(s * n)); "global" ranks all of them together (floor(s * total)). Ties go
to the lower index; already-pruned weights rank lowest, so they stay pruned.

Steps count completed optimizer steps (step 0 = before training; checkpoint step_N and metrics
line N hold the state after `after_step(N)`).

Gradual (Zhu & Gupta 2017). With t0 = prune_start_step, t1 = prune_end_step, dt = prune_interval:

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3          for t0 <= t <= t1

The mask is recomputed after steps t0, t0 + dt, t0 + 2 dt, ... and t1 (the paper's n * dt is
t1 - t0; t1 need not fall on the grid), to floor(s_t * n) weights. Sparsity is 0 before t0, held
between updates, and s_f from t1 on.

Lottery (iterative magnitude pruning with weight rewinding). With R = prune_rounds, p =
prune_rate_per_round, k = rewind_step and S = (max_steps - k) / (R + 1) (validated to be whole):

    step   0 ....... k ......... T | T ........ T+S | ... | max_steps        T = k + S
           segment 0: LR 0..T      | seg 1: LR k..T | ... | seg R: LR k..T
                     ^ theta_k     ^ after step T, T+S, ...: prune p of the remaining weights,
                       kept          rewind every parameter to theta_k (pruned ones to 0), clear
                                     the AdamW state (as open_lth starts each level afresh)

Every segment after the first restarts the learning-rate schedule (warmup + cosine over T steps)
at position k; batches keep following the global step (each segment sees new data). After R
rounds a linear with n weights keeps n_R (n_{r+1} = n_r - floor(p * n_r)), about (1 - p)^R.

Resume: the masks and theta_k are tensors of `state_dict()`, which goes into trainer_state.pt,
and every schedule is a function of the step, so a resumed run equals the uninterrupted one bit
for bit. Knows nothing about the loop beyond `after_step` and `lr_position`, nor about files.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastserve.errors import ConfigError

METHODS = ("none", "gradual", "lottery")
SCOPES = ("layer", "global")
UNSTRUCTURED = "unstructured"


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder linears (full module names), in module order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("model.layers.")
    }


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's s_t (module docstring): 0 before start, final from end on."""
    if step < start:
        return 0.0
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def is_update_step(step: int, start: int, end: int, interval: int) -> bool:
    return start <= step <= end and ((step - start) % interval == 0 or step == end)


def scheduled_sparsity(
    step: int, initial: float, final: float, start: int, end: int, interval: int
) -> float:
    """The target sparsity in force after `step`: s at the last update step <= step."""
    if step < start or step >= end:
        return cubic_sparsity(step, initial, final, start, end)
    last = start + (step - start) // interval * interval
    return cubic_sparsity(last, initial, final, start, end)


def lowest_k(score: Tensor, k: int) -> Tensor:
    """bool mask of the k lowest entries of a flat score (ties: lower index), O(n)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    threshold = torch.kthvalue(score.cpu(), k).values.to(score.device)
    mask = score < threshold
    ties = torch.nonzero(score == threshold).reshape(-1)
    mask[ties[: k - int(mask.sum())]] = True
    return mask


class MaskedLinears:
    """Masks over the decoder linears, applied after every step (what both methods share)."""

    method: ClassVar[str] = ""

    def __init__(self, model: nn.Module, scope: str) -> None:
        self.model = model
        self.scope = scope
        self.linears = prunable_linears(model)
        self.masks = {
            n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in self.linears.items()
        }
        self.num_weights = sum(m.numel() for m in self.masks.values())
        self.num_pruned = 0

    @property
    def sparsity(self) -> float:
        """Pruned fraction of all decoder-linear weights (exact counts)."""
        return self.num_pruned / self.num_weights

    @torch.no_grad()
    def apply(self) -> None:
        for name, linear in self.linears.items():
            linear.weight.masked_fill_(self.masks[name], 0.0)

    @torch.no_grad()
    def prune_to(self, counts: dict[str, int] | int) -> None:
        """Grow the masks to counts[name] pruned weights per linear (layer scope) or `counts`
        in total (global), by |w|; already-pruned weights rank lowest."""
        scores = {
            n: torch.where(self.masks[n], -1.0, lin.weight.detach().abs().float()).reshape(-1)
            for n, lin in self.linears.items()
        }
        if isinstance(counts, int):
            flat = lowest_k(torch.cat(list(scores.values())), counts)
            chunks = flat.split([s.numel() for s in scores.values()])
            new = dict(zip(scores, chunks))
        else:
            new = {n: lowest_k(s, counts[n]) for n, s in scores.items()}
        for n, mask in new.items():
            self.masks[n] = mask.reshape(self.masks[n].shape)
        self.num_pruned = sum(int(m.sum()) for m in self.masks.values())

    def counts_for(self, sparsity: float) -> dict[str, int] | int:
        """floor(s * n) per linear, or of the total (global)."""
        if self.scope == "global":
            return math.floor(sparsity * self.num_weights + 1e-9)
        return {n: math.floor(sparsity * m.numel() + 1e-9) for n, m in self.masks.items()}

    def lr_position(self, step: int, max_steps: int) -> tuple[int, int]:
        """(schedule position, schedule length) of the step about to run."""
        return step, max_steps

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "masks": {n: m.cpu() for n, m in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method or set(state.get("masks", {})) != set(self.masks):
            raise ConfigError(
                f"the checkpoint was pruned with prune={state.get('method')!r} on other linears "
                f"or another method than prune={self.method!r}; resume with its options."
            )
        for n, m in state["masks"].items():
            self.masks[n] = m.to(self.masks[n].device)
        self.num_pruned = sum(int(m.sum()) for m in self.masks.values())

    def sparsity_config(self) -> dict[str, Any] | None:
        """save_model's sparsity_config for the final model dir (None while nothing is pruned)."""
        if not self.num_pruned:
            return None
        modules = {n: {"structure": UNSTRUCTURED} for n in self.masks}
        return {"method": f"train-{self.method}", "scope": self.scope, "modules": modules}


class GradualPruner(MaskedLinears):
    """Zhu & Gupta's gradual magnitude pruning (module docstring)."""

    method = "gradual"

    def __init__(
        self,
        model: nn.Module,
        scope: str,
        initial: float,
        final: float,
        start: int,
        end: int,
        interval: int,
    ) -> None:
        super().__init__(model, scope)
        self.initial, self.final = initial, final
        self.start, self.end, self.interval = start, end, interval

    def target(self, step: int) -> float:
        args = (self.initial, self.final, self.start, self.end, self.interval)
        return scheduled_sparsity(step, *args)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        if is_update_step(step, self.start, self.end, self.interval):
            self.prune_to(self.counts_for(self.target(step)))
        self.apply()


class LotteryPruner(MaskedLinears):
    """Iterative magnitude pruning with weight rewinding (module docstring)."""

    method = "lottery"

    def __init__(
        self,
        model: nn.Module,
        scope: str,
        rounds: int,
        rate: float,
        rewind_step: int,
        max_steps: int,
    ) -> None:
        super().__init__(model, scope)
        self.rate, self.rewind_step = rate, rewind_step
        self.segment = (max_steps - rewind_step) // (rounds + 1)
        self.first_end = rewind_step + self.segment  # T
        self.boundaries = {self.first_end + r * self.segment for r in range(rounds)}
        self.rewind: dict[str, Tensor] | None = None  # theta_k, every parameter

    def lr_position(self, step: int, max_steps: int) -> tuple[int, int]:
        if step < self.first_end:
            return step, self.first_end
        return self.rewind_step + (step - self.first_end) % self.segment, self.first_end

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        if step == self.rewind_step and self.rewind is None:
            self.rewind = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        if step in self.boundaries:
            if self.scope == "global":
                counts: dict[str, int] | int = self.num_pruned + math.floor(
                    self.rate * (self.num_weights - self.num_pruned) + 1e-9
                )
            else:
                counts = {
                    n: int(m.sum()) + math.floor(self.rate * int((~m).sum()) + 1e-9)
                    for n, m in self.masks.items()
                }
            self.prune_to(counts)
            for n, p in self.model.named_parameters():
                p.copy_(self.rewind[n])
            if optimizer is not None:
                optimizer.state.clear()  # a fresh AdamW for the next segment
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        rewind = None if self.rewind is None else {n: t.cpu() for n, t in self.rewind.items()}
        return {**super().state_dict(), "rewind": rewind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        params = dict(self.model.named_parameters())
        saved = state.get("rewind")
        self.rewind = (
            None if saved is None else {n: t.to(params[n].device) for n, t in saved.items()}
        )


def build_pruner(
    cfg: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any] | None,
) -> MaskedLinears | None:
    """The pruner cfg (a validated TrainConfig) asks for, at step 0 of a fresh run (`saved`
    None) or restored from a checkpoint's `state["pruning"]`; None for prune=none."""
    if cfg.prune == "none":
        if saved is not None:
            raise ConfigError(
                f"the checkpoint was trained with prune={saved.get('method')!r}; resume it with "
                "the same pruning options."
            )
        return None
    if cfg.prune == "gradual":
        pruner: MaskedLinears = GradualPruner(
            model,
            cfg.prune_scope,
            cfg.prune_initial_sparsity,
            cfg.prune_sparsity,
            cfg.prune_start_step,
            cfg.resolved_prune_end_step,
            cfg.prune_interval,
        )
    else:
        pruner = LotteryPruner(
            model,
            cfg.prune_scope,
            cfg.prune_rounds,
            cfg.prune_rate_per_round,
            cfg.rewind_step,
            cfg.max_steps,
        )
    if saved is None:
        pruner.after_step(0, optimizer)
    else:
        pruner.load_state_dict(saved)
    return pruner
