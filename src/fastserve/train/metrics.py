"""Run records: metrics.jsonl, run.json and the live progress line. Rank 0 only.

metrics.jsonl has one JSON object per logged step:
    {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"[, "val_loss", "val_bpb"]}
where `step` counts optimizer steps done (1-based). On resume the lines past the resumed step are
dropped, so the file reads as one uninterrupted run. Knows nothing about training itself.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fastserve.utils.io import atomic_write_json, atomic_write_text

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


class MetricsLog:
    """Append-only JSON lines; each line is flushed so a crash loses at most the line in flight."""

    def __init__(self, out_dir: str | Path, resume_step: int | None) -> None:
        self.path = Path(out_dir) / METRICS_FILE
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def write_run_info(out_dir: str | Path, info: dict[str, Any]) -> None:
    """run.json: the given facts plus versions, host and git commit (when run from a checkout)."""
    import numpy
    import torch

    import fastserve

    record = {
        **info,
        "versions": {
            "fastserve": fastserve.__version__,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
        "git_commit": _git_commit(),
        "host": platform.node(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(Path(out_dir) / RUN_FILE, record)


class ProgressLine:
    """`train ━━━━━  120/1000 loss 3.412 lr 9.1e-04 42.1k tok/s 0:01:02 eta 0:07:40`.

    Disabled (every method a no-op) when `enabled` is false: non-zero ranks, or progress=False.
    """

    def __init__(self, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=start_step, stats=""
        )
        self._progress.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.enabled:
            stats = f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s / 1000:.1f}k tok/s"
            self._progress.update(self._task, completed=step, stats=stats)

    def print(self, message: str) -> None:
        if self.enabled:
            self._progress.console.print(message)

    def close(self) -> None:
        if self.enabled:
            self._progress.stop()
