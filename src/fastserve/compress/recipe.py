"""Compression recipes: an ordered list of modifiers read from YAML or named by a preset.

    recipe = Recipe.load("w4a16-gptq")                  # a preset name ...
    recipe = Recipe.load("examples/recipes/w8a8.yaml")  # ... or a YAML file
    plan = recipe.resolve(model)                        # which linear each modifier touches
    print(recipe.to_yaml())                             # every parameter spelled out

A recipe file (llm-compressor's shape, flattened):

    modifiers:
      - type: SmoothQuant          # SmoothQuant | AWQ | GPTQ | RTN, applied in this order
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

Patterns match full module names (`model.layers.3.mlp.down_proj`); a pattern without a dot also
matches the last name component (`down_proj`). Regexes use `re.match` (anchored at the start), as
llm-compressor does. Only linears inside decoder layers can be compressed (the calibration walks
the layers); lm_head and the embeddings are ignored by default.

Everything a recipe can get wrong is checked here, before any work: unknown modifier types or
parameters, values out of range, group sizes that do not divide a target's in_features (unless
the modifier has group_size_fallback, as the int4/int3 presets do), a linear quantized by two
modifiers, a scaling modifier placed after the one that quantizes its layers. `resolve` gives
each target the scheme it will be quantized with (`LayerTarget.scheme`).

What this module does not know: the algorithms (fastserve.compress.quant), calibration data.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from torch import nn

from fastserve.errors import ConfigError
from fastserve.model.quantized import QuantScheme

DEFAULT_TARGETS = ("Linear",)
DEFAULT_IGNORE = ("lm_head", "re:.*embed_tokens")
MIN_FALLBACK_GROUP_SIZE = 32  # smallest group size group_size_fallback tries before per-channel
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---- modifiers -----------------------------------------------------------------------------------


@dataclass
class Modifier:
    """Fields shared by every modifier: which linears it applies to."""

    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))

    type: ClassVar[str] = ""
    quantizes: ClassVar[bool] = False  # True: replaces its targets by QuantLinear modules

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
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass
class QuantModifier(Modifier):
    """A modifier that ends with quantized weights: the scheme's fields."""

    bits: int = 8  # 8, 4 or 3 (3-bit in the 4-bit container)
    group_size: int | None = None  # None = one scale per output channel; else input columns/group
    symmetric: bool = True  # False: unsigned q with an integer zero point per (row, group)
    act_bits: int | None = None  # 8 = dynamic per-token int8 activations (W8A8), else weight-only
    # True: a target whose in_features group_size does not divide gets a smaller group size
    # (see scheme_for) instead of a ConfigError. The int4/int3 presets set it; recipe files must
    # ask for it, since a user who wrote group_size 128 may rely on it.
    group_size_fallback: bool = False

    quantizes: ClassVar[bool] = True

    @property
    def scheme(self) -> QuantScheme:
        """The scheme as written (what scheme_for gives every target its group size divides)."""
        return QuantScheme(self.bits, self.group_size, self.symmetric, self.act_bits)

    def scheme_for(self, in_features: int) -> QuantScheme:
        """The scheme a linear with `in_features` inputs is quantized with: `scheme`, unless
        group_size_fallback is on and group_size does not divide in_features; then the largest of
        group_size / 2, / 4, ... (integers >= MIN_FALLBACK_GROUP_SIZE) that divides it, else
        per-channel (group_size None). Without the flag `scheme` as is (Recipe.resolve rejects
        it when group_size does not divide in_features)."""
        scheme = self.scheme
        g = scheme.group_size
        if g is None or in_features % g == 0 or not self.group_size_fallback:
            return scheme
        while g % 2 == 0 and g // 2 >= MIN_FALLBACK_GROUP_SIZE:
            g //= 2
            if in_features % g == 0:
                return dataclasses.replace(scheme, group_size=g)
        return dataclasses.replace(scheme, group_size=None)

    def validate(self) -> None:
        super().validate()
        self.scheme.validate()
        _check_bool(self.group_size_fallback, "group_size_fallback")


@dataclass
class RTNModifier(QuantModifier):
    """Round-to-nearest with min/max scales; needs no calibration data."""

    type: ClassVar[str] = "RTN"


@dataclass
class GPTQModifier(QuantModifier):
    """GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian error feedback."""

    block_size: int = 128  # columns per lazy batch update
    dampening_frac: float = 0.01  # added to H's diagonal, times its mean
    act_order: bool = True  # quantize columns by decreasing H diagonal (static groups)

    type: ClassVar[str] = "GPTQ"

    def validate(self) -> None:
        super().validate()
        _check_int(self.block_size, "block_size", 1)
        _check_float(self.dampening_frac, "dampening_frac", 0.0, 1.0, hi_open=False)
        _check_bool(self.act_order, "act_order")


@dataclass
class AWQModifier(QuantModifier):
    """AWQ (Lin et al. 2023): activation-aware per-channel scales, clipping search, then RTN."""

    num_grid: int = 20  # alpha = i / num_grid for i < num_grid: the scale exponent grid
    duo_scaling: bool = True  # s = mean|x|^alpha / mean|w|^(1-alpha) (False: mean|x|^alpha)
    clip: bool = True  # search a per-(row, group) clipping ratio by output error
    clip_grid: int = 20  # clipping ratios 1 - i / clip_grid ...
    max_shrink: float = 0.5  # ... down to 1 - max_shrink
    clip_max_tokens: int = 4096  # calibration tokens (evenly spaced) used by the clip search

    type: ClassVar[str] = "AWQ"

    def validate(self) -> None:
        super().validate()
        _check_int(self.num_grid, "num_grid", 1)
        _check_bool(self.duo_scaling, "duo_scaling")
        _check_bool(self.clip, "clip")
        _check_int(self.clip_grid, "clip_grid", 1)
        _check_float(self.max_shrink, "max_shrink", 0.0, 1.0)
        _check_int(self.clip_max_tokens, "clip_max_tokens", 1)


@dataclass
class SmoothQuantModifier(Modifier):
    """SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights (fold into
    the RMSNorms before q/k/v and gate/up). Changes no dtype; a quantizing modifier follows."""

    alpha: float = 0.5  # migration strength: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

    type: ClassVar[str] = "SmoothQuant"

    def validate(self) -> None:
        super().validate()
        _check_float(self.alpha, "alpha", 0.0, 1.0, hi_open=False)


MODIFIER_TYPES: dict[str, type[Modifier]] = {
    m.type: m for m in (SmoothQuantModifier, AWQModifier, GPTQModifier, RTNModifier)
}


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_float(value: Any, name: str, lo: float, hi: float, hi_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")


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
    modifier = cls(**d)
    try:
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


# ---- recipe --------------------------------------------------------------------------------------


@dataclass
class LayerTarget:
    """One linear a modifier applies to (the contract between recipe and compressor)."""

    name: str  # full module name, e.g. model.layers.3.mlp.down_proj
    layer_idx: int  # decoder layer index
    local_name: str  # name inside the layer, e.g. mlp.down_proj
    in_features: int
    # What a quantizing modifier quantizes it with: modifier.scheme_for(in_features), so its
    # group size may be smaller than the modifier's (group_size_fallback). None for SmoothQuant.
    scheme: QuantScheme | None = None


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
        if not any(m.quantizes for m in recipe.modifiers):
            raise ConfigError("the recipe quantizes nothing: add an RTN, GPTQ or AWQ modifier")
        return recipe

    @classmethod
    def preset(cls, name: str) -> Recipe:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict({"modifiers": PRESETS[name]}, name=name)

    @classmethod
    def load(cls, spec: str | Path | Recipe) -> Recipe:
        """A Recipe, a preset name, or a path to a YAML recipe file."""
        if isinstance(spec, Recipe):
            return spec
        if str(spec) in PRESETS:
            return cls.preset(str(spec))
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"recipe {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
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
        cannot run on this model. `model` may live on the meta device (only names and shapes)."""
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        plan: list[list[LayerTarget]] = []
        quantized_by: dict[str, int] = {}
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
            if isinstance(mod, QuantModifier):
                for t in targets:
                    t.scheme = mod.scheme_for(t.in_features)
                    try:
                        t.scheme.validate(t.in_features)
                    except ValueError as e:
                        raise ConfigError(f"{where}: {t.name}: {e}") from None
                    if t.name in quantized_by:
                        raise ConfigError(
                            f"{where}: {t.name} is already quantized by modifier "
                            f"{quantized_by[t.name] + 1}"
                        )
                    quantized_by[t.name] = i
            else:  # a scaling modifier must see float weights
                for t in targets:
                    if t.name in quantized_by:
                        raise ConfigError(
                            f"{where}: {t.name} is quantized by modifier "
                            f"{quantized_by[t.name] + 1}, which runs first; "
                            f"put {mod.type} before it"
                        )
            plan.append(targets)
        return plan

    def fallback_note(self, plan: list[list[LayerTarget]]) -> str | None:
        """One line naming the linears of `plan` (by their name inside a layer) whose group size
        fell back from their modifier's (group_size_fallback); None when none did."""
        parts = []
        for mod, targets in zip(self.modifiers, plan):
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
