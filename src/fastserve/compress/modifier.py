"""The Modifier protocol: one compression algorithm as a small object with a lifecycle, as
llm-compressor's modifiers are. Each lives in its own file beside its math (quant/gptq.py,
prune/wanda.py, ...); recipe.py parses them, compressor.py runs them.

Public dataclass fields are the recipe parameters (what recipe.yaml spells out); what a run
computes lives in private attributes set in `initialize`, so one Recipe can run many times.

    lifecycle (compressor.compress_model)           what the modifier does
    ------------------------------------------------------------------------------------------
    recipe.resolve(model)   -> check_targets        check its resolved targets against the model
                                                    (meta device: names and shapes only) and
                                                    the modifiers before it (ResolveState)
    initialize(session, targets)                    once per run, before the layer walk (whole-
                                                    model work: global magnitude thresholds,
                                                    OWL's per-layer sparsities)
    apply_layer(ctx)        per decoder layer       register calibration hooks, run ctx.run()
                            holding its targets     passes, transform the layer; returns errors
    finalize(session, targets)                      after the last layer (checks, clean-up)
    record_key                                      the config.json record it contributes to;
                                                    the compressor summarizes each record from
                                                    its modifiers (quant.quantization_summary,
                                                    prune.sparsity_summary); None: no record
                                                    (weight sharing: its SharedLinear modules
                                                    announce their record to save_model)

A modifier that `reshapes` (structured pruning: prune/structured.py) changes the model's config.
It must come first in a recipe, does all its work in `initialize`, is never walked, and
`reshape_config(config, where)` tells `Recipe.resolve` the config that the modifiers after it
are resolved on.

What it does not know: the algorithms (each modifier's file), how layers are walked
(calibration.py), files (fastserve.model.checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from fastserve.errors import ConfigError
from fastserve.model.quantized import QuantScheme

DEFAULT_TARGETS = ("Linear",)
DEFAULT_IGNORE = ("lm_head", "re:.*embed_tokens")
QUANT_RECORD = "quantization_config"
SPARSE_RECORD = "sparsity_config"


@dataclass
class LayerTarget:
    """One linear a modifier applies to (the contract between recipe and compressor)."""

    name: str  # full module name, e.g. model.layers.3.mlp.down_proj
    layer_idx: int  # decoder layer index
    local_name: str  # name inside the layer, e.g. mlp.down_proj
    in_features: int
    # What a quantizing modifier quantizes it with: modifier.scheme_for(in_features), so its
    # group size may be smaller than the modifier's (group_size_fallback). None otherwise.
    scheme: QuantScheme | None = None


@dataclass
class ResolveState:
    """What the modifiers resolved so far claim (recipe order): full name -> modifier index."""

    quantized_by: dict[str, int] = field(default_factory=dict)
    pruned_by: dict[str, int] = field(default_factory=dict)
    # Weight-shared linears (share/kmeans.py): no later modifier may touch them.
    shared_by: dict[str, int] = field(default_factory=dict)


@dataclass
class Session:
    """Run-wide state one compress_model call shares among its modifiers."""

    model: nn.Module  # the model being compressed (float32, on CPU between layers)
    input_ids: Tensor | None  # calibration tokens [N, L]; None for a data-free recipe
    device: torch.device  # where layers are processed
    plan: list[list[LayerTarget]]  # each modifier's targets, recipe order
    # Pruned linears: full name -> mask structure ("unstructured" or "N:M"). Their zeros are the
    # mask: later modifiers keep them (GPTQ pins them to the zero code; RTN/AWQ keep 0 exactly).
    sparse: dict[str, str] = field(default_factory=dict)
    # Full name -> number of weights its pruning modifier zeroed (checked after the walk).
    num_pruned: dict[str, int] = field(default_factory=dict)


@dataclass
class LayerContext:
    """What a modifier sees of one decoder layer."""

    layer: nn.Module  # the decoder layer, on the session's device
    layer_idx: int
    targets: dict[str, LayerTarget]  # this modifier's targets in the layer, by layer-relative name
    run: Callable[[], None] | None  # one calibration pass of the layer (None without data)
    session: Session

    @property
    def schemes(self) -> dict[str, QuantScheme | None]:
        return {n: t.scheme for n, t in self.targets.items()}

    def full_name(self, local_name: str) -> str:
        return self.targets[local_name].name


class Modifier(Protocol):
    """The lifecycle every recipe modifier implements (module docstring)."""

    type: ClassVar[str]  # the recipe's `type:`
    quantizes: ClassVar[bool]  # replaces its targets by QuantLinear modules
    prunes: ClassVar[bool]  # zeroes weights of its targets (recorded in sparsity_config)
    shares: ClassVar[bool]  # leaves at most 2^bits distinct values per target (SharedLinear)
    needs_data: ClassVar[bool]  # needs calibration tokens
    reshapes: ClassVar[bool]  # changes the model's config (module docstring)
    record_key: ClassVar[str | None]  # QUANT_RECORD, SPARSE_RECORD or None (no record)
    targets: list[str]
    ignore: list[str]

    def validate(self) -> None: ...

    def to_dict(self) -> dict[str, Any]: ...

    def check_targets(
        self, targets: list[LayerTarget], where: str, state: ResolveState, index: int
    ) -> None: ...

    def initialize(self, session: Session, targets: list[LayerTarget]) -> None: ...

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]: ...

    def finalize(self, session: Session, targets: list[LayerTarget]) -> None: ...


@dataclass
class ModifierBase:
    """Fields shared by every modifier (which linears it applies to) and lifecycle defaults."""

    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    type: ClassVar[str] = ""
    quantizes: ClassVar[bool] = False
    prunes: ClassVar[bool] = False
    shares: ClassVar[bool] = False
    needs_data: ClassVar[bool] = True
    reshapes: ClassVar[bool] = False
    record_key: ClassVar[str | None] = QUANT_RECORD

    def validate(self) -> None:
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"{name} must be a list of name patterns, got {value!r}")
            for p in value:
                if p.startswith("re:"):
                    try:
                        re.compile(p[3:])
                    except re.error as e:
                        raise ValueError(f"bad regex {p!r} in {name}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """{"type", every recipe parameter}: the public fields only, in declaration order."""
        params = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": self.type, **params}

    def check_targets(
        self, targets: list[LayerTarget], where: str, state: ResolveState, index: int
    ) -> None:
        """Default: the targets must still be float (a scaling or pruning modifier)."""
        for t in targets:
            if t.name in state.quantized_by:
                raise ConfigError(
                    f"{where}: {t.name} is quantized by modifier "
                    f"{state.quantized_by[t.name] + 1}, which runs first; put {self.type} before it"
                )

    def initialize(self, session: Session, targets: list[LayerTarget]) -> None:
        pass

    def apply_layer(self, ctx: LayerContext) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} does not implement apply_layer")

    def finalize(self, session: Session, targets: list[LayerTarget]) -> None:
        pass


# ---- parameter checks (ValueError naming the field; the recipe adds the modifier) ----------------


def check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_float(value: Any, name: str, lo: float, hi: float, hi_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")
