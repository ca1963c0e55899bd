"""The CLI as a user runs it: real `python -m fastserve` processes, data -> train -> generate.

Also torchrun: `torchrun --nproc_per_node 2 -m fastserve train` on CPU (gloo), checked against a
single-process run with the same global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 300):
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastserve", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fastserve {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _corpus(root: Path) -> Path:
    rng = random.Random(0)
    words = "alpha beta gamma delta server token model batch cache queue".split()
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
        (corpus / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    (corpus / "skip.bin").write_bytes(b"\x00\x01\x02binary")
    return corpus


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    corpus = _corpus(root)
    out = root / "shards"
    proc = run_cli("data", str(corpus), "--out", str(out), "--vocab-size", "300")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 300
    assert meta["splits"]["train"]["num_tokens"] > 0 and meta["splits"]["val"]["num_tokens"] > 0
    assert "skip.bin" in proc.stdout + proc.stderr  # the binary file is reported as skipped
    return out


TRAIN_ARGS = [
    "--model",
    "tiny",
    "--batch-size",
    "4",
    "--block-size",
    "32",
    "--warmup-steps",
    "2",
    "--eval-interval",
    "4",
    "--eval-iters",
    "2",
    "--log-interval",
    "1",
    "--ckpt-interval",
    "4",
]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_data_train_generate(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_cli(
        "train",
        "--data",
        str(shards),
        "--out",
        str(run),
        "--max-steps",
        "8",
        *TRAIN_ARGS,
        "--set",
        "num_hidden_layers=1",
    )
    model_dir = run / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == 300
    assert (model_dir / "tokenizer.json").exists() and (model_dir / "model.safetensors").exists()
    assert sorted(_losses(run)) == list(range(1, 9))

    # resume to 12 steps continues from the step-8 checkpoint
    run_cli(
        "train",
        "--data",
        str(shards),
        "--out",
        str(run),
        "--max-steps",
        "12",
        "--resume",
        *TRAIN_ARGS,
        "--set",
        "num_hidden_layers=1",
    )
    assert sorted(_losses(run)) == list(range(1, 13))

    greedy = [
        run_cli(
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "alpha beta",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
        ).stdout
        for _ in range(2)
    ]
    assert greedy[0] == greedy[1] and greedy[0].startswith("alpha beta")
    assert len(greedy[0].strip()) > len("alpha beta")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["data", "/no/such/path", "--out", "{tmp}/x"], "no such file"),
        (["data", "hf:some/dataset", "--out", "{tmp}/x"], "fastserve-llm[hf]"),
        (["data", "{shards}/meta.json", "--out", "{tmp}/x", "--vocab-size", "100"], "259"),
        (["train", "--data", "{tmp}/missing", "--out", "{tmp}/run"], "{tmp}/missing"),
        (["generate", "--model", "{tmp}", "--prompt", "x"], "config.json"),
        (
            ["train", "--data", "{shards}", "--out", "{tmp}/r", "--model", "nosuchpreset"],
            "nosuchpreset",
        ),
        (
            [
                "train",
                "--data",
                "{shards}",
                "--out",
                "{tmp}/r",
                "--model",
                "tiny",
                "--set",
                "no_such_field=3",
            ],
            "no_such_field",
        ),
        (
            [
                "train",
                "--data",
                "{shards}",
                "--out",
                "{tmp}/r",
                "--model",
                "tiny",
                "--block-size",
                "100000",
            ],
            "block_size",
        ),
    ],
)
def test_user_errors_are_one_clear_line(args, needle, shards: Path, tmp_path: Path) -> None:
    fill = lambda s: s.format(tmp=tmp_path, shards=shards)  # noqa: E731
    proc = run_cli(*map(fill, args), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fill(needle) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, whatever the terminal width
    assert not (tmp_path / "x").exists()


def parser_tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for `parser` and every subcommand below it, at every level, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parser_tree(sub, (*path, name))


def undocumented(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """What `text` (the parser's --help) leaves out: options, positionals or subcommands missing
    from it, and arguments without a help string of their own."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            missing += [f"{n}: no help" for n in action.choices if not (helps.get(n) or "").strip()]
            missing += [f"{n}: not listed" for n in action.choices if n not in text]
            continue
        names = action.option_strings or [action.metavar or action.dest]
        if action.help == argparse.SUPPRESS or not (action.help or "").strip():
            missing.append(f"{names[0]}: no help")
        missing += [f"{n}: not in the help text" for n in names if n not in text]
    return missing


def test_every_command_has_help(capsys, monkeypatch) -> None:
    from fastserve.cli import build_parser, main

    assert run_cli("--help").stdout.startswith("usage: fastserve")  # the real entry point
    monkeypatch.setenv("COLUMNS", "200")  # what run_cli sets: argparse wraps to it
    tree = list(parser_tree(build_parser()))
    paths = [path for path, _ in tree]
    assert ("bench", "serve") in paths and len(paths) >= 10  # the walk reaches nested commands
    texts = {}
    for path, parser in tree:  # in process: `python -m fastserve` is main(), ~1 s a start
        with pytest.raises(SystemExit) as exited:
            main([*path, "--help"])
        assert exited.value.code == 0, path
        texts[path] = text = capsys.readouterr().out
        prog = " ".join(("fastserve", *path))
        assert parser.prog == prog and text.startswith(f"usage: {prog}"), prog
        assert undocumented(parser, text) == [], prog
    # every TrainConfig field is reachable from the CLI, with help text
    from fastserve.train.config import TrainConfig, field_help

    helps = field_help(TrainConfig)
    for name in TrainConfig.__dataclass_fields__:
        assert helps.get(name), f"no help for {name}"
        flag = {"data_dir": "--data", "out_dir": "--out", "model_overrides": "--set"}.get(
            name, "--" + name.replace("_", "-")
        )
        assert flag in texts[("train",)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_ddp_matches_single_process(shards: Path, tmp_path: Path) -> None:
    common = [*TRAIN_ARGS, "--max-steps", "4", "--eval-iters", "0"]
    single = tmp_path / "single"
    run_cli("train", "--data", str(shards), "--out", str(single), "--grad-accum", "2", *common)
    ddp = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "fastserve", "train", "--data", str(shards), "--out", str(ddp),
        "--grad-accum", "1", *common,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(re.findall(r"^model ", proc.stdout, re.M)) == 1  # only rank 0 reports
    single_losses, ddp_losses = _losses(single), _losses(ddp)
    assert sorted(ddp_losses) == [1, 2, 3, 4]
    for step, loss in single_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5)
    run_info = json.loads((ddp / "run.json").read_text())
    assert run_info["world_size"] == 2


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The main job on a slice of builtin:stdlib, the tiny preset, a few seconds of training."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--train-seconds", "4", "--model", "tiny"]
    proc = run_cli(*args, "--max-bytes", "300000")
    assert "val bits per byte" in proc.stdout and "sample" in proc.stdout
    assert (out / "train" / "model" / "model.safetensors").exists()
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 4096 and meta["stats"]["max_bytes"] == 300000
    # a second run reuses the shards and starts a fresh training run
    proc = run_cli(*args, "--max-bytes", "300000")
    assert "reusing shards" in proc.stdout
