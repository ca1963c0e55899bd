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
        (["eval", model, *data, "--speed-repeats", "2"], "--speed-repeats needs --speed"),
        (["eval", model, "--speed", "--speed-batch-sizes", "0"], "batch size must be"),
        (["eval", model, "--speed", "--speed-prompt-len", "4000"], "exceed the model's context"),
    ]
    for args, message in cases:
        capsys.readouterr()
        argv = args if args[1] == "compare" else [*args, "--output", str(out)]
        assert main(argv) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_generative_task_json_table_and_compare(model_dir, tmp_path, capsys):
    rows = [
        {"prompt": "the cat sat", "reference": "on a mat"},
        {"messages": [{"role": "user", "content": "a queue"}], "references": ["x", "y"]},
    ]
    task = _rows(tmp_path / "gen.jsonl", rows)
    out = tmp_path / "gen.json"
    argv = ["eval", str(model_dir), "--tasks", task, "--gen-kwargs", "max_gen_toks=8"]
    assert main([*argv, "--log-samples", "--bootstrap-iters", "20", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(col in printed for col in ("EM %", "BLEU", "chrF", "ROUGE-L", "gen"))
    (entry,) = load_results(out)["tasks"]
    assert entry["output_type"] == "generate_until" and entry["num_docs"] == 2
    assert [s["references"] for s in entry["samples"]] == [["on a mat"], ["x", "y"]]
    assert all(s["num_tokens"] <= 8 for s in entry["samples"]) and entry["bootstrap_iters"] == 20
    assert set(entry["metrics"]) == {
        f"{m}{s}" for m in ("exact_match", "bleu", "chrf", "rouge_l") for s in ("", "_stderr")
    }
    assert main(["eval", "compare", str(out), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "generative tasks compared against" in printed and "Δ BLEU" in printed


def test_bad_generative_inputs_exit_2_with_one_line_and_no_output(model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    model = str(model_dir)
    (tmp_path / "empty.jsonl").write_text("\n")
    no_ref = _rows(tmp_path / "noref.jsonl", [{"prompt": "a", "reference": "b"}, {"prompt": "c"}])
    ok = _rows(tmp_path / "ok.jsonl", [{"prompt": "the cat", "reference": "sat"}])
    long = _rows(
        tmp_path / "long.jsonl", [{"prompt": "the cat sat on a mat " * 40, "reference": "x"}]
    )
    (tmp_path / "bad.yaml").write_text(
        "data: ok.jsonl\noutput_type: generate_until\ndoc_to_text: prompt\n"
        "doc_to_target: reference\ngeneration_kwargs: {max_new_tokens: 5}\n"
    )
    cases = [
        (["--tasks", str(tmp_path / "empty.jsonl")], "empty.jsonl has no rows"),
        (["--tasks", no_ref], "noref.jsonl:2: a generative row needs exactly one of 'reference'"),
        (["--tasks", str(tmp_path / "bad.yaml")], "unknown generation setting 'max_new_tokens'"),
        (
            ["--tasks", ok, "--gen-kwargs", "max_tokens=5"],
            "unknown generation setting 'max_tokens'",
        ),
        (["--tasks", ok, "--gen-kwargs", "do_sample=false,temperature=1"], "contradicts"),
        (["--tasks", ok, "--bootstrap-iters", "-1"], "bootstrap_iters must be"),
        (["--tasks", long], "task long, doc 1: the prompt has"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["eval", model, *args, "--output", str(out)]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    capsys.readouterr()
    assert main(["eval", "compare", str(out), "--gen-kwargs", "seed=1"]) == 2
    assert "only results files, not --gen-kwargs" in capsys.readouterr().err


def test_speed_alone_json_table_and_compare(model_dir, perturbed_dir, tmp_path, capsys):
    """`--speed` with nothing else: the engine ran the requests asked for (its own counter), the
    JSON's rates are its runs' tokens over their times, and `compare` prints the speed table."""
    speed = ["--speed", "--speed-prompt-len", 8, "--speed-decode-tokens", 5]
    speed += ["--speed-batch-sizes", 1, 3, "--speed-repeats", 2]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for target, out in ((model_dir, a), (perturbed_dir, b)):
        assert main([str(x) for x in ["eval", target, *speed, "--output", out]]) == 0
    printed = capsys.readouterr().out
    assert "ms/step" in printed and "peak RSS" in printed and "GB/s (copy of" in printed
    sp = load_results(a)["speed"]
    assert [x["batch_size"] for x in sp["batches"]] == [1, 3]
    assert sp["settings"]["prompt_len"] == 8 and sp["settings"]["decode_tokens"] == 5
    for batch in sp["batches"]:
        for run in batch["runs"]:
            assert run["output_tokens"] == batch["batch_size"] * 5
            rate = run["decode_tokens_timed"] / run["decode_time_s"]
            assert rate == pytest.approx(run["decode_tokens_per_s"], rel=1e-9)
    assert sp["weights"]["weights_bytes"] > 0 and sp["memory"]["peak_rss_bytes"] > 0
    assert load_results(a)["datasets"] == [] and load_results(a)["tasks"] == []

    assert main(["eval", "compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "speed compared against a.json" in printed and "1.00x" in printed
