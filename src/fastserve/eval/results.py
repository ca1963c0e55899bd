"""The results JSON of `fastserve eval`: its schema, the facts it records, reading it back.

    results = new_results(target_info, ref_info, settings)      # then fill results["datasets"]
    write_results("results.json", results)                      # atomic
    results = load_results("results.json")                      # DataError unless ours

The schema is documented in docs/formats.md ("Evaluation results"). `format: "fastserve-eval"`
and `format_version` identify it; a reader refuses other formats and other versions. Additions
that an older reader can ignore keep the version (the tasks list, generative tasks' entries and
`settings.generation`); files without them read as before. The model
dir hash is the sha256 of the lines "<sha256 of file>  <name>\\n" over the dir's non-hidden
regular files in sorted name order (what `sha256sum * | sha256sum` prints in the dir, with C
sorting). Knows nothing about how the numbers are computed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from fastserve.errors import DataError
from fastserve.utils.io import atomic_write_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "dir_sha256",
    "load_results",
    "model_files",
    "model_info",
    "new_results",
    "write_results",
]

FORMAT = "fastserve-eval"
FORMAT_VERSION = 1
_CHUNK = 1 << 20
# The quantization_config fields a results file keeps (the per-module schemes are left out).
_QUANT_FIELDS = ("method", "bits", "group_size", "symmetric", "act_bits", "recipe")


def model_files(path: str | Path) -> list[Path]:
    """The non-hidden regular files of a model dir, sorted by name (what dir_sha256 hashes)."""
    return sorted(
        (f for f in Path(path).iterdir() if f.is_file() and not f.name.startswith(".")),
        key=lambda f: f.name.encode("utf-8"),
    )


def dir_sha256(path: str | Path, on_bytes=None) -> str:
    """sha256 of a model dir (see the module docstring); `on_bytes(n)` is called as it reads."""
    lines = []
    for f in model_files(path):
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        lines.append(f"{digest.hexdigest()}  {f.name}\n")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def model_info(path: str | Path, model, sha256: str) -> dict[str, Any]:
    """The "target" / "ref" entry: where the model is, its hash and what kind of model it is."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config")
    return {
        "kind": "dir",
        "path": str(Path(path).expanduser().resolve()),
        "sha256": sha256,
        "weights_bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
        "dtype": str(model.dtype).removeprefix("torch."),
        "max_position_embeddings": model.config.max_position_embeddings,
        "vocab_size": model.config.vocab_size,
        "quantization": None if quant is None else {k: quant.get(k) for k in _QUANT_FIELDS},
    }


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import fastserve

    return {
        "fastserve": fastserve.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def new_results(
    target: dict[str, Any],
    ref: dict[str, Any] | None,
    settings: dict[str, Any],
    tokenizer: dict[str, Any],
) -> dict[str, Any]:
    """A results dict with everything but the datasets and the wall time."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": None,
        "versions": _versions(),
        "host": platform.node(),
        "settings": settings,
        "tokenizer": tokenizer,
        "target": target,
        "ref": ref,
        "datasets": [],
        "tasks": [],
        "speed": None,
    }


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    """Write the results JSON atomically (a reader sees the old file or the whole new one)."""
    atomic_write_json(path, results)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results JSON written by `fastserve eval`; DataError for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"no such results file: {path}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise DataError(f"{path} is not a `fastserve eval` results file.")
    if results.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {results.get('format_version')!r}; this FastServe reads "
            f"{FORMAT_VERSION}."
        )
    if not isinstance(results.get("datasets"), list):
        raise DataError(f"{path} has no datasets list.")
    results.setdefault("tasks", [])  # files written before tasks existed
    results.setdefault("speed", None)  # ... and before --speed
    if not isinstance(results["tasks"], list):
        raise DataError(f"{path} has a tasks entry that is not a list.")
    return results
