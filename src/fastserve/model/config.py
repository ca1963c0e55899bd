"""Model configuration: a Llama-family decoder described with HF `LlamaConfig` field names.

`ModelConfig` is the one contract between a model dir's `config.json`, the presets, the CLI
`key=value` overrides and `LlamaForCausalLM`. Use it as

    cfg = resolve_config("small", vocab_size=4096)          # preset + overrides
    cfg = resolve_config("path/to/config.json")             # HF config.json or our own dump
    cfg = ModelConfig.preset("tiny", **parse_overrides(["num_hidden_layers=4"]))

What it knows: the architectures that are the same network up to names and defaults: HF `llama`,
`mistral` without a sliding window (or one covering the whole context) and `qwen2` (q/k/v biases).
RoPE scaling types `linear` and `llama3`, read from both transformers spellings (v4:
`rope_theta` + `rope_scaling`; v5: `rope_parameters`) and written in both.
What it does not know: sliding-window attention, other RoPE types (dynamic, yarn, longrope),
partial rotary, MLP biases, activations other than SiLU, and Llama's own `attention_bias` (which
also puts a bias on o_proj); those raise `ConfigError` instead of loading as a different network.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve.errors import ConfigError

ROPE_TYPES = ("linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)

# Presets differ only in size. Parameter counts (embeddings included, untied):
# tiny ~0.62M at vocab 4096, small ~5.0M at vocab 4096, base ~31.5M at vocab 8192.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "small": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    ),
    "base": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    ),
}


@dataclass
class ModelConfig:
    """Shape and numerics of a Llama-family decoder. Defaults are the `tiny` preset."""

    vocab_size: int = 4096  # rows of embed_tokens and lm_head
    hidden_size: int = 64  # residual stream width
    intermediate_size: int = 176  # SwiGLU inner width
    num_hidden_layers: int = 2  # decoder blocks
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int | None = 2  # K/V heads (GQA); None -> num_attention_heads
    head_dim: int | None = None  # per-head width; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 256  # context length: generation never goes past it
    rms_norm_eps: float = 1e-5  # epsilon inside RMSNorm's rsqrt
    rope_theta: float = 10000.0  # RoPE base wavelength
    # None, {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # bias on q/k/v projections only (Qwen2 style), never on o_proj
    mlp_bias: bool = False  # must stay False: kept so HF configs can be checked against it
    tie_word_embeddings: bool = False  # lm_head.weight is model.embed_tokens.weight
    bos_token_id: int | None = None  # written to config.json and generation_config.json
    eos_token_id: int | list[int] | None = None  # a list when several tokens end a sequence
    pad_token_id: int | None = None
    initializer_range: float = 0.02  # std of the normal init (see LlamaForCausalLM.init_weights)
    hidden_act: str = "silu"  # must stay "silu" (SwiGLU)
    torch_dtype: str = "float32"  # dtype the weights are stored in; load_model's default dtype

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _positive_int(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named preset (`tiny`, `small`, `base`) with `overrides` applied."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from our own field names; an unknown key raises ConfigError naming it."""
        check_keys(d)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Our own field names (JSON-serialisable); `from_dict(to_dict())` is the identity."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`; a derived head_dim is re-derived when the head layout changes."""
        check_keys(changes)
        derived = self.head_dim == self.hidden_size // self.num_attention_heads
        reshaped = {"hidden_size", "num_attention_heads"} & changes.keys()
        if derived and reshaped and "head_dim" not in changes:
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    # ---- validation ---------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ConfigError with one sentence for the first inconsistency found."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError("rms_norm_eps and rope_theta must be positive")
        if not self.initializer_range >= 0:
            raise ConfigError(f"initializer_range must be >= 0, got {self.initializer_range}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.mlp_bias:
            raise ConfigError("mlp_bias=true is not supported")
        if self.torch_dtype not in DTYPES:
            raise ConfigError(
                f"torch_dtype must be one of {', '.join(DTYPES)}, got {self.torch_dtype!r}"
            )
        _validate_rope_scaling(self.rope_scaling)
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for name, ids in (("bos", [self.bos_token_id]), ("eos", eos), ("pad", [self.pad_token_id])):
            for i in ids:
                if i is not None and not (isinstance(i, int) and 0 <= i < self.vocab_size):
                    raise ConfigError(
                        f"{name}_token_id {i!r} is outside the vocabulary (size {self.vocab_size})"
                    )

    # ---- HF config.json -----------------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` dict, readable by transformers v4 and v5 alike.

        v4 reads `rope_theta` + `rope_scaling`; v5 reads `rope_scaling` when it is not null (and
        fills `rope_theta` from the top level), else `rope_parameters`. Both spellings carry the
        same values, so either reader builds the same RoPE. A model with q/k/v biases is written as
        `qwen2`: HF Llama's `attention_bias` would also expect a bias on o_proj.
        """
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        d: dict[str, Any] = {}
        if self.attention_bias:
            d.update(
                model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False
            )
        else:
            d.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False)
        d.update(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling is not None else None,
            rope_parameters=rope_parameters,
            mlp_bias=False,
            hidden_act=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
            attention_dropout=0.0,
            use_cache=True,
            torch_dtype=self.torch_dtype,  # v4 name
            dtype=self.torch_dtype,  # v5 name
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read an HF `config.json` dict (llama, mistral, qwen2; v4 or v5 spelling)."""
        model_type = d.get("model_type")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ConfigError(
                f"unsupported architecture {model_type!r} (supported: llama, mistral, qwen2)"
            )
        max_pos = d.get("max_position_embeddings", 2048)
        window = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        if model_type in ("mistral", "qwen2") and window is not None and window < max_pos:
            raise ConfigError(
                f"sliding-window attention (window {window} < context {max_pos}) is not supported"
            )
        if model_type == "llama" and d.get("attention_bias", False):
            raise ConfigError(
                "llama configs with attention_bias=true (bias on o_proj) are not supported"
            )
        theta, scaling = _read_rope(d)
        head_dim = d.get("head_dim")
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        return cls(
            vocab_size=d.get("vocab_size", 32000),
            hidden_size=d.get("hidden_size", 4096),
            intermediate_size=d.get("intermediate_size", 11008),
            num_hidden_layers=d.get("num_hidden_layers", 32),
            num_attention_heads=d.get("num_attention_heads", 32),
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=model_type == "qwen2",
            mlp_bias=d.get("mlp_bias", False),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            initializer_range=d.get("initializer_range", 0.02),
            hidden_act=d.get("hidden_act", "silu"),
            torch_dtype=str(dtype).removeprefix("torch."),
        )


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _validate_rope_scaling(s: dict[str, Any] | None) -> None:
    if s is None:
        return
    if not isinstance(s, dict) or s.get("rope_type") not in ROPE_TYPES:
        got = s.get("rope_type") if isinstance(s, dict) else s
        raise ConfigError(f"rope_scaling type {got!r} is not supported (supported: {ROPE_TYPES})")
    keys = ("factor",) if s["rope_type"] == "linear" else LLAMA3_ROPE_KEYS
    for k in keys:
        if not isinstance(s.get(k), (int, float)) or not s[k] > 0:
            raise ConfigError(f"rope_scaling {s['rope_type']} needs a positive number {k!r}")
    if s["rope_type"] == "llama3" and not s["high_freq_factor"] > s["low_freq_factor"]:
        raise ConfigError("rope_scaling llama3 needs high_freq_factor > low_freq_factor")


def _read_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either spelling; a non-null v4 `rope_scaling` wins (as in
    transformers v5)."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    params = dict(params)
    if params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(
            "partial rotary embeddings (partial_rotary_factor != 1) are not supported"
        )
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    scaling = {"rope_type": rope_type, **params}
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    _validate_rope_scaling(scaling)
    return theta, scaling


def check_keys(d: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key that is not a ModelConfig field."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in d:
        if key not in fields:
            raise ConfigError(f"unknown model config key {key!r}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse CLI `key=value` strings; values are JSON (ints, floats, true/false/null, dicts),
    Python's True/False/None, or else plain strings. Unknown keys raise ConfigError naming them."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        raw = raw.strip()
        if raw in ("True", "False", "None"):
            value: Any = {"True": True, "False": False, "None": None}[raw]
        else:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        out[key] = value
    check_keys(out)
    return out


def resolve_config(spec: str, **overrides: Any) -> ModelConfig:
    """A preset name, or a path to a JSON config (HF config.json, our own `to_dict()` dump, or a
    directory holding config.json), with `overrides` (ModelConfig field names) applied."""
    check_keys(overrides)
    if spec in PRESETS:
        return ModelConfig.preset(spec, **overrides)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON config file"
        )
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read model config {path}: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"model config {path} is not a JSON object")
    cfg = ModelConfig.from_hf_dict(d) if "model_type" in d else ModelConfig.from_dict(d)
    return cfg.replace(**overrides) if overrides else cfg
