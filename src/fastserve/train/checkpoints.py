"""Training checkpoints: atomic save, discovery of the newest complete one, keep-last-K pruning.

Layout (every checkpoint is also a loadable HF model dir):

    out_dir/checkpoints/
      step_000200/            config.json, model.safetensors, generation_config.json, tokenizer
                              files (fastserve.model.save_model) + trainer_state.pt
      step_000400/
      .tmp-step_000600-xyz/   a save or deletion in progress, or crash debris: never counted

`trainer_state.pt` = {format_version, step, optimizer, config, world_size, tokens_seen, elapsed_s},
written with torch.save and read with torch.load(weights_only=True). Only the plain tensors,
numbers and strings of an optimizer state dict go in, so the safe loader reads it all.
Knows nothing about the training loop; it stores what it is given.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastserve.errors import CheckpointError
from fastserve.utils.io import TMP_PREFIX, atomic_dir

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR / f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    """A checkpoint counts only with its state, config and weights all present. atomic_dir makes
    partial dirs impossible under a `step_N` name; this also rejects hand-damaged ones."""
    has_weights = (path / "model.safetensors").is_file() or (
        path / "model.safetensors.index.json"
    ).is_file()
    return has_weights and (path / STATE_FILE).is_file() and (path / "config.json").is_file()


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Any,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    `model` is the plain module (not the DDP or compiled wrapper): its parameter names are the
    HF names save_model writes. `state` adds run facts (config, tokens_seen, ...) to the state file.
    """
    from fastserve.model import save_model

    final = checkpoint_dir(out_dir, step)
    with atomic_dir(final) as tmp:
        # save_model writes its own directory atomically; the outer rename publishes both parts.
        save_model(model, tmp, tokenizer=tokenizer)
        payload = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "optimizer": optimizer.state_dict(),
            **state,
        }
        torch.save(payload, tmp / STATE_FILE)
    prune_checkpoints(out_dir, keep_last)
    return final


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last`, and leftover temp dirs
    (only one writer per out_dir exists, so a temp dir here is debris from a crash).

    A checkpoint is renamed to a temp name before it is deleted: a crash in the middle of the
    deletion then leaves debris, never a half-deleted `step_N` dir that still looks complete."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    debris = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX) and p.is_dir()]
    for path in debris:
        shutil.rmtree(path, ignore_errors=True)
    stale = [path for _, path in list_checkpoints(out_dir)[:-keep_last]]
    for path in stale:
        trash = path.with_name(f"{TMP_PREFIX}{path.name}-pruned")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return stale + debris


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read `trainer_state.pt` of checkpoint dir `path` with the safe (weights_only) unpickler."""
    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}.") from e
    except Exception as e:  # a truncated or foreign file: the unpickler's message is not for users
        raise CheckpointError(f"cannot read {file}: it is corrupt or not a trainer state.") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} is not a FastServe trainer state (format {FORMAT_VERSION}).")
    return state


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Copy the weights of checkpoint dir `path` into `model` (which has its training config);
    a model of another shape -> CheckpointError naming the first bad tensor."""
    from fastserve.model import load_model

    loaded = load_model(path, device="cpu", dtype=torch.float32).state_dict()
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in loaded:
            raise CheckpointError(f"checkpoint {path} has no tensor {name}.")
        if loaded[name].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {path} tensor {name} has shape {tuple(loaded[name].shape)}, "
                f"but the configured model needs {tuple(tensor.shape)}."
            )
    model.load_state_dict({k: loaded[k] for k in own}, strict=True)
