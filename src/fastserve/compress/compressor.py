"""compress(): model dir + recipe + calibration data -> compressed model dir the engine serves.

    result = compress("runs/small/model", "w4a16-gptq", "runs/data", "runs/small-w4")
    print(result.time_s, result.layer_errors)

Order of work (every check before any write; the output dir appears complete or not at all):
  1. recipe (preset or YAML) parsed and resolved against the model's config on the meta device:
     unknown types/params, bad bits, group sizes that do not divide in_features -> ConfigError;
     each target gets its own scheme (LayerTarget.scheme: with group_size_fallback, as in the
     int4/int3 presets, a smaller group size or per-channel where the recipe's does not divide);
     with `progress`, one stderr line names the linears that fell back
  2. calibration tokens loaded (DataError when missing, empty or too small); a data-free recipe
     (RTN, Magnitude) needs none, but uses them for the per-layer error report when given
  3. model loaded in float32; the modifiers' lifecycle (fastserve.compress.modifier): each
     modifier's `initialize` (a structured modifier, always first, shrinks the model there),
     then layer by layer each other modifier of the recipe, in order, transforms the layer's
     targets (`apply_layer`: collecting what it needs through hooks on calibration passes),
     then the compressed layer's outputs become the next layer's inputs; then each modifier's
     `finalize`
  4. saved with `save_model(..., quantization_config=..., sparsity_config=...)` (one summary per
     record kind the recipe's modifiers contribute to) plus `recipe.yaml` (the resolved recipe,
     every parameter spelled out) in one atomic directory write

What it does not know: the algorithms (each modifier's file in quant/ and prune/), file layouts
beyond recipe.yaml (fastserve.model.checkpoint), how the runtime layers compute (fastserve.model).
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
from fastserve.compress.modifier import QUANT_RECORD, SPARSE_RECORD, LayerContext, Session
from fastserve.compress.prune import sparsity_summary
from fastserve.compress.quant import quantization_summary as _quantization_summary
from fastserve.compress.recipe import Recipe
from fastserve.errors import CheckpointError, ConfigError

RECIPE_FILE = "recipe.yaml"
# config.json record -> the summary of it the recipe's modifiers with that record_key make.
RECORD_SUMMARIES = {
    QUANT_RECORD: lambda mods, session, name: _quantization_summary(mods, session.model, name),
    SPARSE_RECORD: sparsity_summary,
}


@dataclass
class CompressResult:
    """What a compression did and how well (errors measured on the calibration samples)."""

    recipe: Recipe  # the resolved recipe (also saved as recipe.yaml)
    time_s: float  # wall time of loading, compressing and saving
    num_samples: int  # calibration samples used (0 for a data-free recipe without data)
    seq_len: int  # tokens per calibration sample (after capping at the model's context)
    # Per decoder layer: sum ||y - y_float||^2 / sum ||y_float||^2 of the compressed layer's output
    # vs the float layer's on the same inputs (empty when there was no calibration data).
    layer_errors: list[float] = field(default_factory=list)
    # Per GPTQ-quantized or SparseGPT-pruned linear: its relative output error on the
    # calibration inputs, ||(W - W_c) X||^2 / ||W X||^2 (the last such modifier's).
    linear_errors: dict[str, float] = field(default_factory=dict)
    quantization_config: dict[str, Any] = field(default_factory=dict)  # what config.json records
    sparsity_config: dict[str, Any] = field(default_factory=dict)  # (empty: nothing pruned)
    # What a structured modifier removed (StructuredPruneModifier.summary: widths before/after,
    # removed layers, block influence, parameter counts); empty without one.
    structure: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None  # the written model dir (None for compress_model)
    model: nn.Module | None = field(default=None, repr=False)  # the compressed model, in memory
    # The in-memory records, {config.json key: summary} (save_model completes them).
    records: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)


def _by_layer(targets: list[Any], layer_idx: int) -> dict[str, Any]:
    """The targets in layer `layer_idx`, by layer-relative name."""
    return {t.local_name: t for t in targets if t.layer_idx == layer_idx}


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
    return any(m.needs_data for m in recipe.modifiers)


def _records(recipe: Recipe, session: Session) -> dict[str, dict[str, Any]]:
    """One summary per record kind the recipe's modifiers contribute to."""
    records = {}
    for key, summarize in RECORD_SUMMARIES.items():
        mods = [m for m in recipe.modifiers if m.record_key == key]
        if mods:
            records[key] = summarize(mods, session, recipe.name)
    return records


def compress_model(
    model: nn.Module,
    recipe: Recipe | str,
    input_ids: Tensor | None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> CompressResult:
    """Compress a LlamaForCausalLM in place (layer by layer, see the module docstring).

    `input_ids` [N, L] are the calibration tokens (None only for data-free recipes: RTN,
    Magnitude). Computation happens in the model's dtype; decoder layers visit `device` one at a
    time. `progress`: a progress bar and a line naming the linears whose group size fell back,
    on stderr.
    """
    start = time.perf_counter()
    recipe = Recipe.load(recipe)
    plan = recipe.resolve(model)
    note = recipe.fallback_note(plan)
    if progress and note:
        from rich.markup import escape

        from fastserve.utils.console import err_console

        err_console.print(f"[yellow]compress[/yellow] {escape(note)}")
    if input_ids is None and needs_calibration(recipe):
        raise ConfigError(f"recipe {recipe.name!r} needs calibration data (--calib)")
    session = Session(model, input_ids, torch.device(device), plan)
    for mod, targets in zip(recipe.modifiers, plan):
        mod.initialize(session, targets)
    layer_errors: list[float] = []
    linear_errors: dict[str, float] = {}

    def apply(layer: nn.Module, idx: int, run: Any) -> None:
        for mod, targets in zip(recipe.modifiers, plan):
            if mod.reshapes:
                continue  # done in initialize
            layer_targets = _by_layer(targets, idx)
            if layer_targets:
                ctx = LayerContext(layer, idx, layer_targets, run, session)
                errs = mod.apply_layer(ctx)
                linear_errors.update({f"model.layers.{idx}.{n}": e for n, e in errs.items()})

    num_layers = len(model.model.layers)  # after a structured modifier's initialize
    if all(mod.reshapes for mod in recipe.modifiers):
        pass  # nothing to walk
    elif input_ids is None:
        for idx in range(num_layers):
            apply(model.model.layers[idx], idx, None)
    else:
        walker = LayerWalker(model, input_ids, device=device)
        with _progress(progress, num_layers) as bar:
            task = bar.add_task("layers", total=num_layers) if bar else None
            for idx in range(num_layers):
                layer = walker.layer(idx)
                reference = copy.deepcopy(layer)
                apply(layer, idx, lambda layer=layer: walker.run_all(layer))
                layer_errors.append(walker.advance(layer, reference))
                model.model.layers[idx] = layer.to("cpu")
                if bar:
                    err = layer_errors[-1]
                    bar.update(task, advance=1, description=f"layer {idx} err {err:.2e}")
    for mod, targets in zip(recipe.modifiers, plan):
        mod.finalize(session, targets)
    records = _records(recipe, session)
    structure = next((m.summary() for m in recipe.modifiers if m.reshapes), {})
    return CompressResult(
        recipe,
        time.perf_counter() - start,
        0 if input_ids is None else int(input_ids.shape[0]),
        0 if input_ids is None else int(input_ids.shape[1]),
        layer_errors=layer_errors,
        linear_errors=linear_errors,
        quantization_config=records.get(QUANT_RECORD, {}),
        sparsity_config=records.get(SPARSE_RECORD, {}),
        structure=structure,
        model=model,
        records=records,
    )


def quantization_summary(recipe: Recipe, model: nn.Module) -> dict[str, Any]:
    """config.json's quantization_config fields for `model` compressed by `recipe` (see
    fastserve.compress.quant.quantization_summary)."""
    mods = [m for m in recipe.modifiers if m.record_key == QUANT_RECORD]
    return _quantization_summary(mods, model, recipe.name)


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
    `calib` (shard dir, text file/dir, builtin:stdlib, token tensor [N, L], or None for a
    data-free recipe: RTN, Magnitude) and write the result to `out` (see the module docstring).

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
    gen_path = model_dir / "generation_config.json"
    try:
        gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {gen_path}: {e}") from None
    from fastserve.utils.io import atomic_dir

    with atomic_dir(out) as tmp:
        save_model(
            model,
            tmp,
            tokenizer=tokenizer,
            generation_config=gen,
            quantization_config=result.records.get(QUANT_RECORD),
            sparsity_config=result.records.get(SPARSE_RECORD),
        )
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    result.time_s = time.perf_counter() - start
    result.out_dir = out
    return result
