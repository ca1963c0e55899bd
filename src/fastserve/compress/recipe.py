"""Compression recipes: an ordered list of modifiers read from YAML or named by a preset.

    recipe = Recipe.load("w4a16-gptq")                  # a preset name ...
    recipe = Recipe.load("examples/recipes/w8a8.yaml")  # ... or a YAML file
    plan = recipe.resolve(model)                        # which linear each modifier touches
    print(recipe.to_yaml())                             # every parameter spelled out

A recipe file (llm-compressor's shape, flattened):

    modifiers:
      - type: SmoothQuant          # SmoothQuant | AWQ | GPTQ | RTN | SparseGPT | Wanda |
                                   # Magnitude, applied in this order
        alpha: 0.5
      - type: RTN
        bits: 8
        act_bits: 8                # dynamic per-token int8 activations (W8A8)
        targets: [Linear]          # "Linear" = every linear; "re:<regex>" or an fnmatch pattern
        ignore: [lm_head]          # same pattern kinds; ignore wins over targets
      - type: GPTQ                 # (another example)
        bits: 4
        group_size: 128
        group_size_fallback: true  # a linear whose in_features 128 does not divide gets 64 or
                                   # 32 if one divides it, else one scale per output channel
      - type: SparseGPT            # (pruning: before the modifier that quantizes its linears)
        sparsity: 0.5
        mask_structure: "2:4"      # or unstructured (the default)
      - type: KMeans               # (weight sharing: 2^bits values per tensor, stored as Deep
        bits: 4                    #  Compression; the last modifier of its linears)

A `Structured` modifier (smaller dense widths: prune/structured.py) must come first; the
modifiers after it are resolved on the smaller model it makes (its `reshape_config`).

Patterns match full module names (`model.layers.3.mlp.down_proj`); a pattern without a dot also
matches the last name component (`down_proj`). Regexes use `re.match` (anchored at the start), as
llm-compressor does. Only linears inside decoder layers can be compressed (the calibration walks
the layers); lm_head and the embeddings are ignored by default.

Everything a recipe can get wrong is checked here, before any work: unknown modifier types or
parameters, values out of range, group sizes that do not divide a target's in_features (unless
the modifier has group_size_fallback, as the int4/int3 presets do), a linear quantized or pruned
by two modifiers, a scaling or pruning modifier placed after the one that quantizes its layers,
an N:M structure whose M does not divide a target's in_features, a structured modifier that is
not first or whose widths fall below one unit, a modifier after the weight-sharing one of its
linears. Each modifier checks its own
targets (`check_targets`, fastserve.compress.modifier); `resolve` gives each target the scheme it
will be quantized with (`LayerTarget.scheme`).

What this module does not know: the algorithms (fastserve.compress.quant, .prune), calibration
data.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from fastserve.compress.modifier import (
    DEFAULT_IGNORE,
    DEFAULT_TARGETS,
    QUANT_RECORD,
    LayerTarget,
    Modifier,
    ModifierBase,
    ResolveState,
)
from fastserve.compress.prune import PruneModifier
from fastserve.compress.prune.magnitude import MagnitudeModifier
from fastserve.compress.prune.sparsegpt import SparseGPTModifier
from fastserve.compress.prune.structured import StructuredPruneModifier
from fastserve.compress.prune.wanda import WandaModifier
from fastserve.compress.quant import MIN_FALLBACK_GROUP_SIZE, QuantModifier
from fastserve.compress.quant.awq import AWQModifier
from fastserve.compress.quant.gptq import GPTQModifier
from fastserve.compress.quant.rtn import RTNModifier
from fastserve.compress.quant.smoothquant import SmoothQuantModifier
from fastserve.compress.share.kmeans import KMeansModifier
from fastserve.errors import ConfigError

__all__ = [  # the modifiers, importable from here as before they moved beside their math
    "DEFAULT_IGNORE",
    "DEFAULT_TARGETS",
    "MIN_FALLBACK_GROUP_SIZE",
    "MODIFIER_TYPES",
    "PRESETS",
    "SHARING_PRESETS",
    "SPARSE_PRESETS",
    "STRUCTURED_PRESETS",
    "AWQModifier",
    "GPTQModifier",
    "KMeansModifier",
    "LayerTarget",
    "MagnitudeModifier",
    "Modifier",
    "ModifierBase",
    "PruneModifier",
    "QuantModifier",
    "Recipe",
    "RTNModifier",
    "SmoothQuantModifier",
    "SparseGPTModifier",
    "StructuredPruneModifier",
    "WandaModifier",
]

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

MODIFIER_TYPES: dict[str, type[ModifierBase]] = {
    m.type: m
    for m in (
        SmoothQuantModifier,
        AWQModifier,
        GPTQModifier,
        RTNModifier,
        SparseGPTModifier,
        WandaModifier,
        MagnitudeModifier,
        StructuredPruneModifier,
        KMeansModifier,
    )
}


def modifier_from_dict(d: Any, index: int) -> Modifier:
    """One `modifiers:` entry -> a validated Modifier; ConfigError naming entry and problem."""
    where = f"recipe modifier {index + 1}"
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping with a 'type', got {d!r}")
    d = dict(d)
    kind = d.pop("type", None)
    if kind not in MODIFIER_TYPES:
        raise ConfigError(
            f"{where} has unknown type {kind!r}; use one of {', '.join(MODIFIER_TYPES)}"
        )
    cls = MODIFIER_TYPES[kind]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where} ({kind}) has unknown parameter(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed)}"
        )
    for key in ("targets", "ignore"):
        if isinstance(d.get(key), str):
            d[key] = [d[key]]
    try:
        modifier = cls(**d)
        modifier.validate()
    except ValueError as e:
        raise ConfigError(f"{where} ({kind}): {e}") from None
    return modifier


# ---- presets -------------------------------------------------------------------------------------

# Groups of 128 where they fit; a linear whose in_features 128 does not divide (FastServe's own
# small/base MLP widths 688/1376) falls back to 64, 32 or per-channel (QuantModifier.scheme_for).
_W4 = {"bits": 4, "group_size": 128, "symmetric": False, "group_size_fallback": True}
PRESETS: dict[str, list[dict[str, Any]]] = {
    "w8a16": [{"type": "RTN", "bits": 8}],
    "w4a16": [{"type": "RTN", **_W4}],
    "w4a16-gptq": [{"type": "GPTQ", **_W4}],
    "w4a16-awq": [{"type": "AWQ", **_W4}],
    "w3a16-gptq": [{"type": "GPTQ", **_W4, "bits": 3}],
    "w8a8": [{"type": "SmoothQuant", "alpha": 0.5}, {"type": "RTN", "bits": 8, "act_bits": 8}],
}
# Pruning presets (docs/compress.md "Pruning"); Recipe.load knows both tables.
SPARSE_PRESETS: dict[str, list[dict[str, Any]]] = {
    "sparse50-wanda": [{"type": "Wanda", "sparsity": 0.5}],
    "sparse50-sparsegpt": [{"type": "SparseGPT", "sparsity": 0.5}],
    "2of4-sparsegpt": [{"type": "SparseGPT", "sparsity": 0.5, "mask_structure": "2:4"}],
}
# Structured pruning to a smaller dense model (docs/compress.md "Structured pruning"): 30% of the
# MLP channels of every layer, and 30% of the KV groups where the kept query heads still divide
# hidden_size (transformers requires it; on FastServe's tiny/small/base presets they do not, so
# no head goes there).
STRUCTURED_PRESETS: dict[str, list[dict[str, Any]]] = {
    "struct30": [{"type": "Structured", "mlp_sparsity": 0.3, "head_sparsity": 0.3}],
}
# Deep Compression (docs/compress.md "Deep Compression"): prune 50%, then 4-bit k-means weight
# sharing of every linear and of the embedding and head, stored entropy-coded. SparseGPT rather
# than Wanda: its OBS update rebuilds each layer's output from the kept weights, and k-means
# (no retraining) cannot repair what pruning broke: on the compress test model the two layers'
# output errors are 0.28 / 0.11 after SparseGPT + KMeans against 0.73 / 0.17 after Wanda + KMeans,
# for the same archive size (both are 50% unstructured). The embedding and head are included
# because they would otherwise stay float and dominate the archive (3.5x instead of 9.5x the
# float32 bytes there; 42% of the parameters of the `small` preset).
SHARING_PRESETS: dict[str, list[dict[str, Any]]] = {
    "deep-compression": [
        {"type": "SparseGPT", "sparsity": 0.5},
        {"type": "KMeans", "bits": 4, "include_embeddings": True},
    ],
}
_ALL_PRESETS = {**PRESETS, **SPARSE_PRESETS, **STRUCTURED_PRESETS, **SHARING_PRESETS}


# ---- recipe --------------------------------------------------------------------------------------


@dataclass
class Recipe:
    modifiers: list[Modifier]
    name: str = "custom"  # preset name or file stem; recorded in quantization_config

    @classmethod
    def from_dict(cls, d: Any, name: str = "custom") -> Recipe:
        if not isinstance(d, dict) or "modifiers" not in d:
            raise ConfigError("a recipe must be a mapping with a 'modifiers:' list")
        extra = sorted(set(d) - {"modifiers", "name"})
        if extra:
            raise ConfigError(f"unknown recipe key(s) {', '.join(extra)}; use modifiers and name")
        mods = d["modifiers"]
        if not isinstance(mods, list) or not mods:
            raise ConfigError("the recipe's 'modifiers:' must be a non-empty list")
        recipe = cls([modifier_from_dict(m, i) for i, m in enumerate(mods)], d.get("name", name))
        if not isinstance(recipe.name, str):
            raise ConfigError(f"recipe name must be a string, got {recipe.name!r}")
        mods = recipe.modifiers
        if not any(m.quantizes or m.prunes or m.reshapes or m.shares for m in mods):
            raise ConfigError(
                "the recipe quantizes nothing and prunes nothing: add an RTN, GPTQ or AWQ "
                "modifier, a SparseGPT, Wanda, Magnitude or Structured one, or KMeans"
            )
        for i, m in enumerate(mods):
            if m.reshapes and i > 0:
                raise ConfigError(
                    f"recipe modifier {i + 1} ({m.type}) must be the first modifier: it changes "
                    "the model's widths, and the modifiers after it run on the smaller model"
                )
        if any(m.record_key == QUANT_RECORD for m in mods) and not any(m.quantizes for m in mods):
            raise ConfigError("the recipe quantizes nothing: add an RTN, GPTQ or AWQ modifier")
        return recipe

    @classmethod
    def preset(cls, name: str) -> Recipe:
        if name not in _ALL_PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(_ALL_PRESETS)}")
        return cls.from_dict({"modifiers": _ALL_PRESETS[name]}, name=name)

    @classmethod
    def load(cls, spec: str | Path | Recipe) -> Recipe:
        """A Recipe, a preset name, or a path to a YAML recipe file."""
        if isinstance(spec, Recipe):
            return spec
        if str(spec) in _ALL_PRESETS:
            return cls.preset(str(spec))
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"recipe {str(spec)!r} is neither a preset ({', '.join(_ALL_PRESETS)}) nor a file"
            )
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read recipe {path}: {e}") from None
        return cls.from_dict(d, name=path.stem)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "modifiers": [m.to_dict() for m in self.modifiers]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- resolution against a model --------------------------------------------------------------

    def resolve(self, model: nn.Module) -> list[list[LayerTarget]]:
        """The linears each modifier applies to, in module order; ConfigError when the recipe
        cannot run on this model. `model` may live on the meta device (only names and shapes).
        After a reshaping modifier the rest are resolved on the smaller model it makes."""
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        plan: list[list[LayerTarget]] = []
        state = ResolveState()
        for i, mod in enumerate(self.modifiers):
            where = f"recipe modifier {i + 1} ({mod.type})"
            names = [n for n in linears if _matches(n, mod.targets) and not _matches(n, mod.ignore)]
            if not names:
                raise ConfigError(f"{where}: targets {mod.targets} match no linear layer")
            targets = []
            for n in names:
                m = _LAYER_RE.match(n)
                if m is None:
                    raise ConfigError(
                        f"{where}: {n} is outside the decoder layers; only decoder-layer linears "
                        "can be compressed (add it to ignore)"
                    )
                targets.append(LayerTarget(n, int(m.group(1)), m.group(2), linears[n].in_features))
                if n in state.shared_by:
                    raise ConfigError(
                        f"{where}: {n} is weight-shared by modifier {state.shared_by[n] + 1}, "
                        f"which must be the last to touch it; put {mod.type} before it"
                    )
            mod.check_targets(targets, where, state, i)
            plan.append(targets)
            if mod.reshapes:
                from fastserve.model.llama import LlamaForCausalLM

                with torch.device("meta"):
                    smaller = LlamaForCausalLM(mod.reshape_config(model.config, where))
                linears = {n: m for n, m in smaller.named_modules() if isinstance(m, nn.Linear)}
        return plan

    def fallback_note(self, plan: list[list[LayerTarget]]) -> str | None:
        """One line naming the linears of `plan` (by their name inside a layer) whose group size
        fell back from their modifier's (group_size_fallback), and a structured modifier's note
        (fewer KV groups removed than asked); None when there is neither."""
        parts = []
        for mod, targets in zip(self.modifiers, plan):
            if mod.reshapes and mod.resolve_note():
                parts.append(mod.resolve_note())
            if not isinstance(mod, QuantModifier):
                continue
            moved: dict[str, list[str]] = {}
            for t in targets:
                if t.scheme is not None and t.scheme.group_size != mod.group_size:
                    g = t.scheme.group_size
                    to = "per-channel" if g is None else f"group_size {g}"
                    names = moved.setdefault(to, [])
                    if t.local_name not in names:
                        names.append(t.local_name)
            if moved:
                to_text = "; ".join(f"{to} for {', '.join(names)}" for to, names in moved.items())
                parts.append(
                    f"{mod.type} group_size {mod.group_size} does not divide every "
                    f"in_features: {to_text}"
                )
        return " | ".join(parts) if parts else None


def _matches(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p == "Linear":
            return True
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p) or ("." not in p and fnmatch.fnmatchcase(name, "*." + p)):
            return True
    return False
