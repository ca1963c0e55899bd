"""`fastserve eval` end to end: the results JSON, `eval compare`'s table (as processes), and
bad inputs as one `error:` line on stderr, status 2 and no --output file (one as a process, the
others through `fastserve.cli.main`, the same code without the process start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from e2e.server_helpers import free_port
from fastserve.cli import main
from fastserve.eval.results import load_results

pytestmark = pytest.mark.e2e
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}


def fastserve(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastserve", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)


def test_eval_writes_json_and_compare_prints_the_table(
    model_dir, perturbed_dir, text_file, tmp_path
):
    window = ["--context-len", 32, "--stride", 16, "--batch-size", 4]
    a, b = tmp_path / "dense.json", tmp_path / "perturbed.json"
    argv = ["eval", model_dir, "--data", text_file, *window, "--output", a]
    assert main([str(x) for x in argv]) == 0
    run = fastserve(
        "eval", perturbed_dir, "--ref", model_dir, "--data", text_file, *window, "--output", b
    )
    assert run.returncode == 0, run.stderr
    assert "bits/byte" in run.stdout and "KLD mean" in run.stdout and "same top %" in run.stdout
    results = load_results(b)
    assert json.loads(b.read_text())["datasets"][0]["fidelity"]["kld_mean"] > 0
    assert results["settings"]["context_len"] == 32 and results["ref"] is not None

    run = fastserve("eval", "compare", a, b)
    assert run.returncode == 0, run.stderr
    ppl_a = load_results(a)["datasets"][0]["perplexity"]["ppl"]
    ppl_b = results["datasets"][0]["perplexity"]["ppl"]
    assert "Δ PPL" in run.stdout and f"{100 * (ppl_b / ppl_a - 1):+.2f}%" in run.stdout
    assert "dense.json" in run.stdout and "perturbed.json" in run.stdout


def test_bad_input_in_a_process_exits_2_with_one_line(model_dir, tmp_path):
    out = tmp_path / "r.json"
    missing = tmp_path / "missing.txt"
    run = fastserve("eval", model_dir, "--data", missing, "--output", out)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: no such file or directory: {missing}"]
    assert not out.exists()


def test_bad_inputs_exit_2_with_one_line_and_no_output(
    model_dir, other_tokenizer_dir, text_file, tmp_path, capsys
):
    out = tmp_path / "r.json"
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.json").write_text("{}")
    data = ["--data", str(text_file)]
    model = str(model_dir)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cases = [
        (["eval", model, "--data", str(tmp_path / "empty.txt")], "is empty"),
        (["eval", model, *data, "--context-len", "4096"], "longer than"),
        (["eval", model, "--ref", str(other_tokenizer_dir), *data], "tokenizer mismatch"),
        (["eval", str(tmp_path / "no-model"), *data], "does not exist"),
        (["eval", down, *data], f"cannot reach {down}"),
        (["eval", model, "extra", *data], "takes one TARGET"),
        (["eval", model], "nothing to evaluate"),
        (["eval", model, "--tasks", str(tmp_path / "t.yaml")], "no such task file"),
        (["eval", "compare", str(tmp_path / "bad.json")], "not a `fastserve eval` results file"),
        (["eval", "compare"], "needs results files"),
        (["eval", "compare", str(tmp_path / "bad.json"), "--ref", model], "only results files"),
    ]
    for args, message in cases:
        capsys.readouterr()
        argv = args if args[1] == "compare" else [*args, "--output", str(out)]
        assert main(argv) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
