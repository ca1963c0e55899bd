"""Two real gloo processes under torchrun train exactly like one process with the same global
batch: 2 ranks x grad_accum 2 read the windows 1 rank x grad_accum 4 reads (see batches.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_config

from fastserve.model import load_model
from fastserve.train import train
from fastserve.train.checkpoints import list_checkpoints
from fastserve.train.metrics import read_metrics

SCRIPT = Path(__file__).with_name("ddp_train.py")


@pytest.mark.e2e
@pytest.mark.slow
def test_two_process_ddp_matches_single_process(shard_dir, tmp_path):
    common = dict(max_steps=6, warmup_steps=2, eval_interval=3, eval_iters=3, ckpt_interval=3)
    single = tiny_config(shard_dir, tmp_path / "single", grad_accum=4, **common)
    train(single, progress=False)

    ddp = tiny_config(shard_dir, tmp_path / "ddp", grad_accum=2, **common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(SCRIPT), json.dumps(ddp.to_dict())],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = read_metrics(single.out_dir), read_metrics(ddp.out_dir)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert two[0]["loss"] != two[1]["loss"]  # the steps did train
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["tokens_per_step"] == 4 * 32 * 4
    assert [s for s, _ in list_checkpoints(ddp.out_dir)] == [3, 6]  # rank 0 saved, once
    w1, w2 = load_model(tmp_path / "single" / "model"), load_model(tmp_path / "ddp" / "model")
    for (name, a), b in zip(w1.state_dict().items(), w2.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
