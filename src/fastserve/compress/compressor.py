"""compress(): model dir + recipe + calibration data -> compressed model dir the engine serves.

    result = compress("runs/small/model", "w4a16-gptq", "runs/data", "runs/small-w4")
    print(result.time_s, result.layer_errors)

Order of work (every check before any write; the output dir appears complete or not at all):
  1. recipe (preset or YAML) parsed and resolved against the model's config on the meta device:
     unknown types/params, bad bits, group sizes that do not divide in_features -> ConfigError;
     each target gets its own scheme (LayerTarget.scheme: with group_size_fallback, as in the
     int4/int3 presets, a smaller group size or per-channel where the recipe's does not divide);
     with `progress`, one stderr line names the linears that fell back
  2. calibration tokens loaded (DataError when missing, empty or too small); an RTN-only recipe
     needs none, but uses them for the per-layer error report when given
  3. model loaded in float32; layer by layer: each modifier of the recipe, in order, transforms
     the layer's targets (collecting what it needs through hooks on calibration passes), then
     the compressed layer's outputs become the next layer's inputs
  4. saved with `save_model(..., quantization_config=...)` plus `recipe.yaml` (the resolved
     recipe, every parameter spelled out) in one atomic directory write

What it does not know: the algorithms' math (fastserve.compress.quant), file layouts beyond
recipe.yaml (fastserve.model.checkpoint), how the runtime layers compute (fastserve.model).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastserve.compress.calibration import LayerWalker, load_calibration
from fastserve.compress.quant import group_of
from fastserve.compress.quant.awq import awq_quantize_layer, awq_scale_layer
from fastserve.compress.quant.gptq import HessianAccumulator, gptq_quantize
from fastserve.compress.quant.rtn import rtn_layer
from fastserve.compress.quant.smoothquant import smooth_layer
from fastserve.compress.recipe import (
    AWQModifier,
    GPTQModifier,
    LayerTarget,
    Modifier,
    QuantModifier,
    Recipe,
    RTNModifier,
    SmoothQuantModifier,
)
from fastserve.errors import CheckpointError, ConfigError
from fastserve.model.quantized import QuantLinear, QuantScheme, quantization_modules, replace_linear

RECIPE_FILE = "recipe.yaml"


@dataclass
class CompressResult:
    """What a compression did and how well (errors measured on the calibration samples)."""

    recipe: Recipe  # the resolved recipe (also saved as recipe.yaml)
    time_s: float  # wall time of loading, compressing and saving
    num_samples: int  # calibration samples used (0 for an RTN-only recipe without data)
    seq_len: int  # tokens per calibration sample (after capping at the model's context)
    # Per decoder layer: sum ||y - y_float||^2 / sum ||y_float||^2 of the compressed layer's output
    # vs the float layer's on the same inputs (empty when there was no calibration data).
    layer_errors: list[float] = field(default_factory=list)
    # Per GPTQ-quantized linear: its relative output error on the calibration inputs,
    # ||(W - W_q) X||^2 / ||W X||^2.
    linear_errors: dict[str, float] = field(default_factory=dict)
    quantization_config: dict[str, Any] = field(default_factory=dict)  # what config.json records
    out_dir: Path | None = None  # the written model dir (None for compress_model)
    model: nn.Module | None = field(default=None, repr=False)  # the compressed model, in memory


# ---- one layer -----------------------------------------------------------------------------------


def _gptq_layer(
    layer: nn.Module, run: Any, targets: dict[str, QuantScheme], mod: GPTQModifier
) -> dict[str, float]:
    """True-sequential GPTQ: group by group (q/k/v, o, gate/up, down), each group's Hessian taken
    on inputs produced by the already quantized groups before it (one calibration pass per group).
    The linears of a group read the same input, so they share one Hessian; each is quantized with
    its own scheme (`targets`: layer-relative name -> scheme)."""
    errors = {}
    pending = list(dict.fromkeys(group_of(n) for n in targets))
    for group in pending:
        names = [n for n in group.linears if n in targets]
        first = layer.get_submodule(names[0])
        acc = HessianAccumulator(first.in_features, device=first.weight.device)
        handle = first.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0]))
        try:
            run()
        finally:
            handle.remove()
        h = acc.hessian()
        for n in names:
            linear = layer.get_submodule(n)
            try:
                res = gptq_quantize(
                    linear.weight, h, targets[n], mod.block_size, mod.dampening_frac, mod.act_order
                )
            except ValueError as e:
                raise ValueError(f"GPTQ on {n}: {e}") from e
            new = QuantLinear.from_linear(linear, targets[n], res.scale, res.zero, res.q)
            replace_linear(layer, n, new)
            errors[n] = res.error
    return errors


def _apply_modifier(
    mod: Modifier, layer: nn.Module, run: Any, targets: dict[str, Any]
) -> dict[str, float]:
    """Run one modifier on one layer's `targets` (layer-relative name -> its scheme, None for a
    scaling modifier); returns per-linear errors where the method measures them."""
    names = list(targets)
    if isinstance(mod, SmoothQuantModifier):
        smooth_layer(layer, run, names, mod.alpha)
    elif isinstance(mod, AWQModifier):
        awq_scale_layer(layer, run, names, targets, mod.num_grid, mod.duo_scaling)
        awq_quantize_layer(
            layer,
            run,
            names,
            targets,
            mod.clip,
            mod.clip_grid,
            mod.max_shrink,
            mod.clip_max_tokens,
        )
    elif isinstance(mod, GPTQModifier):
        return _gptq_layer(layer, run, targets, mod)
    elif isinstance(mod, RTNModifier):
        rtn_layer(layer, names, targets)
    else:  # pragma: no cover - MODIFIER_TYPES and this dispatch are kept in step
        raise TypeError(f"no implementation for modifier {type(mod).__name__}")
    return {}


def _by_layer(plan: list[list[LayerTarget]], layer_idx: int, i: int) -> dict[str, Any]:
    """Modifier i's targets in layer `layer_idx`: layer-relative name -> its resolved scheme."""
    return {t.local_name: t.scheme for t in plan[i] if t.layer_idx == layer_idx}


def _progress(enabled: bool, total: int):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from fastserve.utils.console import err_console

    return Progress(
        "[bold]compress[/bold] {task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


# ---- in memory -----------------------------------------------------------------------------------


def needs_calibration(recipe: Recipe) -> bool:
    return any(not isinstance(m, RTNModifier) for m in recipe.modifiers)


def compress_model(
    model: nn.Module,
    recipe: Recipe | str,
    input_ids: Tensor | None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> CompressResult:
    """Compress a LlamaForCausalLM in place (layer by layer, see the module docstring).

    `input_ids` [N, L] are the calibration tokens (None only for RTN-only recipes). Computation
    happens in the model's dtype; decoder layers visit `device` one at a time. `progress`: a
    progress bar and a line naming the linears whose group size fell back, on stderr.
    """
    start = time.perf_counter()
    recipe = Recipe.load(recipe)
    plan = recipe.resolve(model)
    note = recipe.fallback_note(plan)
    if progress and note:
        from rich.markup import escape

        from fastserve.utils.console import err_console

        err_console.print(f"[yellow]compress[/yellow] {escape(note)}")
    num_layers = len(model.model.layers)
    layer_errors: list[float] = []
    linear_errors: dict[str, float] = {}
    if input_ids is None:
        if needs_calibration(recipe):
            raise ConfigError(f"recipe {recipe.name!r} needs calibration data (--calib)")
        for idx in range(num_layers):
            layer = model.model.layers[idx]
            for i in range(len(recipe.modifiers)):
                targets = _by_layer(plan, idx, i)
                rtn_layer(layer, list(targets), targets)
        return CompressResult(recipe, time.perf_counter() - start, 0, 0, model=model)

    walker = LayerWalker(model, input_ids, device=device)
    with _progress(progress, num_layers) as bar:
        task = bar.add_task("layers", total=num_layers) if bar else None
        for idx in range(num_layers):
            layer = walker.layer(idx)
            reference = copy.deepcopy(layer)
            for i, mod in enumerate(recipe.modifiers):
                targets = _by_layer(plan, idx, i)
                if targets:
                    errs = _apply_modifier(
                        mod, layer, lambda layer=layer: walker.run_all(layer), targets
                    )
                    linear_errors.update({f"model.layers.{idx}.{n}": e for n, e in errs.items()})
            layer_errors.append(walker.advance(layer, reference))
            model.model.layers[idx] = layer.to("cpu")
            if bar:
                bar.update(task, advance=1, description=f"layer {idx} err {layer_errors[-1]:.2e}")
    return CompressResult(
        recipe,
        time.perf_counter() - start,
        int(input_ids.shape[0]),
        int(input_ids.shape[1]),
        layer_errors=layer_errors,
        linear_errors=linear_errors,
        model=model,
    )


def _distinct(values: set[Any]) -> Any:
    """One value when all agree, else the sorted list of the distinct ones (None last)."""
    if len(values) == 1:
        return next(iter(values))
    return sorted(v for v in values if v is not None) + ([None] if None in values else [])


def quantization_summary(recipe: Recipe, model: nn.Module) -> dict[str, Any]:
    """The recipe-level fields of config.json's quantization_config (save_model adds the
    per-module schemes): method, bits, group_size, symmetric, act_bits, ignore, recipe.

    bits ... act_bits summarize the schemes the quantized linears actually have: the value when
    they all agree, else the sorted list of the distinct values (None, e.g. per-channel, last),
    so a preset whose group size fell back on some linears says group_size [64, null]."""
    schemes = list(quantization_modules(model).values()) or [
        m.scheme for m in recipe.modifiers if isinstance(m, QuantModifier)
    ]
    summary: dict[str, Any] = {"method": "+".join(m.type.lower() for m in recipe.modifiers)}
    for key in ("bits", "group_size", "symmetric", "act_bits"):
        summary[key] = _distinct({getattr(s, key) for s in schemes})
    summary["ignore"] = [
        n for n, m in model.named_modules() if type(m) is nn.Linear
    ]  # linears left in floating point
    summary["recipe"] = recipe.name
    return summary


# ---- model dir -> model dir ----------------------------------------------------------------------


def _check_out(model_dir: Path, out: Path) -> None:
    if out.resolve() == model_dir.resolve():
        raise ConfigError(f"--out {out} is the input model dir; choose another directory")
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())
    ):
        raise ConfigError(f"refusing to overwrite {out}: it exists and is not a model directory")


def compress(
    model_dir: str | Path,
    recipe: Recipe | str | Path,
    calib: str | Path | Tensor | None,
    out: str | Path,
    num_samples: int = 128,
    seq_len: int = 512,
    device: torch.device | str = "cpu",
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
) -> CompressResult:
    """Compress the model dir `model_dir` with `recipe` (preset name, YAML path or Recipe) on
    `calib` (shard dir, text file/dir, builtin:stdlib, token tensor [N, L], or None for an
    RTN-only recipe) and write the result to `out` (see the module docstring).

    `dtype` is the saved model's float dtype (embeddings, norms, head, activations); None keeps
    the source checkpoint's. Quantized weights and their float32 scales are stored as they are.
    """
    start = time.perf_counter()
    from fastserve.data.tokenizer import Tokenizer
    from fastserve.model.checkpoint import load_config, load_model, parse_dtype, save_model
    from fastserve.model.llama import LlamaForCausalLM

    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    recipe = Recipe.load(recipe)
    config = load_config(model_dir)
    _check_out(model_dir, out)
    with torch.device("meta"):
        recipe.resolve(LlamaForCausalLM(config))  # all recipe errors before any work
    out_dtype = parse_dtype(dtype, config.torch_dtype)
    seq_len = min(seq_len, config.max_position_embeddings)
    tokenizer = Tokenizer.load(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    if calib is None and needs_calibration(recipe):
        raise ConfigError(f"recipe {recipe.name!r} needs calibration data (--calib)")
    ids = None if calib is None else load_calibration(calib, tokenizer, num_samples, seq_len, seed)

    model = load_model(model_dir, device="cpu", dtype=torch.float32)
    result = compress_model(model, recipe, ids, device=device, progress=progress)
    model.to(out_dtype)
    summary = quantization_summary(recipe, model)
    gen_path = model_dir / "generation_config.json"
    try:
        gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {gen_path}: {e}") from None
    from fastserve.utils.io import atomic_dir

    with atomic_dir(out) as tmp:
        save_model(
            model, tmp, tokenizer=tokenizer, generation_config=gen, quantization_config=summary
        )
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    result.time_s = time.perf_counter() - start
    result.quantization_config = summary
    result.out_dir = out
    return result
