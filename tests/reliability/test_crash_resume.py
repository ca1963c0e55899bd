"""Crash and resume: `fastserve train` as real processes, killed with SIGKILL at random points and
resumed with --resume until it finishes, must end bit-identical to one uninterrupted run.

After every kill: each `step_N` dir on disk is a complete, loadable checkpoint (writes and
deletions are atomic), and the resumed process starts from the newest one, so a kill loses at
most one checkpoint interval of steps. Kill points are seeded: step targets spread over the run,
each followed by a random delay so kills also land inside checkpoint saves, prunes and evals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_settings import report, scale

from fastserve.model import load_model
from fastserve.train import TrainConfig
from fastserve.train.checkpoints import (
    CHECKPOINTS_DIR,
    checkpoint_dir,
    is_complete,
    list_checkpoints,
    load_trainer_state,
)
from fastserve.train.metrics import METRICS_FILE, RUN_FILE, read_metrics
from fastserve.utils.io import TMP_PREFIX
from train.conftest import synthetic_text  # the trainer tests' corpus (no fixture: other dir)
from train.train_helpers import tiny_config

ROUNDS = scale(2, 6)
KILLS_PER_ROUND = scale(3, 6)
MAX_STEPS = scale(120, 400)
CKPT_INTERVAL = 10
WAIT_S = 120  # per process: a run that neither progresses nor exits in this time is a failure


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    from fastserve.data import prepare_data

    root = tmp_path_factory.mktemp("crash_data")
    (root / "corpus").mkdir()
    for i in range(4):
        (root / "corpus" / f"doc{i}.txt").write_text(synthetic_text(300, seed=i))
    prepare_data(
        [str(root / "corpus")], root / "shards", vocab_size=320, split="tail", progress=False
    )
    return root / "shards"


def train_command(cfg: TrainConfig) -> list[str]:
    """`python -m fastserve train` with one flag per field that differs from the default."""
    argv = [sys.executable, "-m", "fastserve", "train"]
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name == "model_overrides":
            argv += [a for k, v in value.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        elif isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def start(cfg: TrainConfig, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
    with open(log, "ab") as out:
        return subprocess.Popen(
            train_command(cfg), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
        )


def logged_steps(out_dir: Path) -> list[int]:
    """Steps of metrics.jsonl, skipping a line torn by a kill (or being written right now)."""
    try:
        lines = (out_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            steps.append(json.loads(line)["step"])
    return steps


def metrics_inode(out_dir: Path) -> int | None:
    """MetricsLog rewrites the file atomically when a process starts: a new inode = a new run."""
    try:
        return (out_dir / METRICS_FILE).stat().st_ino
    except FileNotFoundError:
        return None


def wait_for_step(proc: subprocess.Popen, out_dir: Path, step: int, old_inode: int | None) -> bool:
    """Wait until this process has logged `step` (True) or has exited (False)."""
    deadline = time.monotonic() + WAIT_S
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"no step {step} after {WAIT_S} s"
        inode = metrics_inode(out_dir)
        if inode is not None and inode != old_inode:
            steps = logged_steps(out_dir)
            if steps and steps[-1] >= step:
                return True
        time.sleep(0.003)
    return False


def check_checkpoints(out_dir: Path) -> int:
    """Every `step_N` dir is complete and loads (state and weights); return how many there are."""
    root = out_dir / CHECKPOINTS_DIR
    dirs = [p for p in root.iterdir() if not p.name.startswith(TMP_PREFIX)] if root.is_dir() else []
    listed = list_checkpoints(out_dir)
    assert sorted(p.name for p in dirs) == [p.name for _, p in listed]  # no half-written step dir
    for step, path in listed:
        assert is_complete(path)
        assert load_trainer_state(path)["step"] == step
        load_model(path)
    return len(listed)


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]


def test_sigkill_at_random_points_then_resume_is_exact(shard_dir, tmp_path):
    def config(out: Path, **overrides) -> TrainConfig:
        return tiny_config(
            shard_dir,
            out,
            max_steps=MAX_STEPS,
            eval_interval=2 * CKPT_INTERVAL,
            ckpt_interval=CKPT_INTERVAL,
            keep_last=2,
            **overrides,
        )

    reference = tmp_path / "reference"
    proc = start(config(reference), tmp_path / "reference.log")
    assert proc.wait(timeout=WAIT_S) == 0, (tmp_path / "reference.log").read_text()
    expected_weights = (reference / "model" / "model.safetensors").read_bytes()
    expected_metrics = without_timing(read_metrics(reference))
    assert [r["step"] for r in expected_metrics] == list(range(1, MAX_STEPS + 1))

    rng = random.Random(20240611)
    kills = checked = steps_lost_max = 0
    for round_index in range(ROUNDS):
        out, log = tmp_path / f"round{round_index}", tmp_path / f"round{round_index}.log"
        targets = sorted(rng.sample(range(1, MAX_STEPS), KILLS_PER_ROUND))
        resume_step: int | None = None  # the checkpoint the next process must start from
        for target in [*targets, None]:
            old_inode = metrics_inode(out)
            proc = start(config(out, resume=resume_step is not None), log)
            if target is not None and wait_for_step(proc, out, target, old_inode):
                time.sleep(rng.uniform(0, 0.05))  # a step, an eval, a save or a prune
                proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=WAIT_S)
            assert metrics_inode(out) != old_inode, log.read_text()  # it started and logged
            if resume_step is not None:
                run = json.loads((out / RUN_FILE).read_text())
                expected = str(checkpoint_dir(out, resume_step)) if resume_step else None
                assert run["resumed_from"] == expected  # restarted from the newest checkpoint
            if rc == 0:
                break  # finished (a late target can come after the end of the run)
            assert rc == -signal.SIGKILL, log.read_text()
            kills += 1
            checked += check_checkpoints(out)
            listed = list_checkpoints(out)
            resume_step = listed[-1][0] if listed else 0
            steps = logged_steps(out)
            lost = (steps[-1] if steps else 0) - resume_step
            assert 0 <= lost <= CKPT_INTERVAL, (steps[-1:], resume_step)
            steps_lost_max = max(steps_lost_max, lost)

        checked += check_checkpoints(out)
        assert (out / "model" / "model.safetensors").read_bytes() == expected_weights
        assert without_timing(read_metrics(out)) == expected_metrics  # no torn or repeated line

    assert kills >= ROUNDS  # every round really crashed at least once
    report(
        "crash_resume",
        rounds=ROUNDS,
        kills=kills,
        steps_lost_max=steps_lost_max,
        checkpoints_checked=checked,
        identical=True,
    )
