"""Rich tables of eval results: one results dict, or several compared against the first.

    console.print(*results_tables(results))
    console.print(*compare_tables([a, b, c], labels=["a.json", "b.json", "c.json"]))

Log-likelihood tasks (acc, acc_norm, cloze perplexity) and generative tasks (exact match, BLEU,
chrF, ROUGE-L) get a table each. Rows of a comparison pair datasets by their sha256 and number of
scored tokens (the same data, the same --limit), tasks by name, data sha256, number of docs and
shots; a dataset or task the first result lacks gets no deltas. Knows only the results schema
(results.py), nothing about models.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

__all__ = [
    "compare_gen_table",
    "compare_table",
    "compare_tables",
    "compare_tasks_table",
    "gen_tasks_table",
    "results_tables",
    "tasks_table",
]

_KLD_ROWS = ("max", "p99_9", "p99", "p95", "p90", "median")
GENERATE_UNTIL = "generate_until"
# the generative metrics: (results key, column); exact_match is a fraction (shown as %), the
# others are on sacrebleu's 0-100 scale
_GEN_COLUMNS = (("exact_match", "EM %"), ("bleu", "BLEU"), ("chrf", "chrF"), ("rouge_l", "ROUGE-L"))


def _is_gen(task: dict[str, Any]) -> bool:
    return task.get("output_type") == GENERATE_UNTIL


def _ll_tasks(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in results.get("tasks", []) if not _is_gen(t)]


def _gen_tasks(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in results.get("tasks", []) if _is_gen(t)]


def _table(title: str) -> Table:
    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pm(value: float | None, err: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + ("" if err is None else f" ± {err:.{digits}f}")


def _title(results: dict[str, Any]) -> str:
    s, target = results["settings"], results["target"]
    window = f"context {s['context_len']}, stride {s['stride']}; " if results["datasets"] else ""
    if target.get("kind") == "server":
        what = f"{target['url']} (model {target['model']}, {target['prompt_format']} prompts; "
    else:
        quant = target.get("quantization")
        kind = f", {quant['method']} {quant['bits']}-bit" if quant else ""
        what = f"{target['path']} ({target['weights_bytes'] / 2**20:.2f} MiB of weights{kind}; "
    return f"{what}{window}{results['wall_time_s']:.1f} s)"


def _pct(value: float | None, err: float | None) -> str:
    return "-" if value is None else _pm(100 * value, None if err is None else 100 * err, 2)


def _ppl(value: float | None, err: float | None) -> str:
    """A cloze perplexity: fixed point up to 1e5, then 4 significant digits."""
    if value is None or value < 1e5:
        return _pm(value, err, 3)
    return f"{value:.3e}" + ("" if err is None else f" ± {err:.2e}")


def _task_name(t: dict[str, Any]) -> str:
    shots = f" ({t['num_fewshot']}-shot)" if t["num_fewshot"] else ""
    return t["name"] + shots + (" (cut)" if t["truncated"] else "")


def tasks_table(results: dict[str, Any], title: str) -> Table:
    """A row per log-likelihood task: acc and acc_norm (%, ± stderr), the cloze perplexity,
    docs/s."""
    table = _table(title)
    table.add_column("task", overflow="fold", min_width=8)
    for col in ("docs", "acc %", "acc_norm %", "PPL", "docs/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for t in _ll_tasks(results):
        m = t["metrics"]
        table.add_row(
            _task_name(t),
            f"{t['num_docs']:,}",
            _pct(m["acc"], m["acc_stderr"]),
            _pct(m.get("acc_norm"), m.get("acc_norm_stderr")),
            _ppl(m.get("perplexity"), m.get("perplexity_stderr")),
            f"{t['docs_per_s']:,.1f}",
        )
    return table


def gen_tasks_table(results: dict[str, Any], title: str) -> Table:
    """A row per generative task: exact match (%), BLEU, chrF, ROUGE-L (0-100), each ± its
    stderr ("-" for a metric the task does not compute), generated tokens per second."""
    table = _table(title)
    table.add_column("task", overflow="fold", min_width=8)
    for col in ("docs", *(c for _, c in _GEN_COLUMNS), "gen tok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for t in _gen_tasks(results):
        m = t["metrics"]
        em = _pct(m.get("exact_match"), m.get("exact_match_stderr"))
        scores = [_pm(m.get(k), m.get(f"{k}_stderr"), 2) for k, _ in _GEN_COLUMNS[1:]]
        rate = f"{t['generated_tokens_per_s']:,.0f}"
        table.add_row(_task_name(t), f"{t['num_docs']:,}", em, *scores, rate)
    return table


def _task_tables(results: dict[str, Any], title: str | None) -> list[Table]:
    """The log-likelihood and the generative tasks tables (those with rows); `title` (None:
    "tasks" / "generative tasks") goes to the first."""
    tables = []
    if _ll_tasks(results):
        tables.append(tasks_table(results, title or "tasks"))
    if _gen_tasks(results):
        gen_title = title if not tables and title else "generative tasks"
        tables.append(gen_tasks_table(results, gen_title))
    return tables


def results_tables(results: dict[str, Any]) -> list[Table]:
    """The speed table (--speed), the perplexity table (a row per dataset), when a reference was
    evaluated the fidelity table (a row per statistic, a column per dataset, as llama.cpp prints
    them), and the tasks tables (log-likelihood, generative); each only when it has rows."""
    speed = []
    if results.get("speed"):
        from fastserve.eval.speed import speed_table

        speed = [speed_table(results["speed"])]
    if not results["datasets"]:
        tasks = _task_tables(results, _title(results))
        return speed + tasks if speed or tasks else [tasks_table(results, _title(results))]
    ppl = _table(_title(results))
    ppl.add_column("dataset", overflow="fold", min_width=8)
    for col in ("tokens", "bytes", "PPL", "bits/byte", "tok/s"):
        ppl.add_column(col, justify="right", no_wrap=True)
    for d in results["datasets"]:
        p = d["perplexity"]
        ppl.add_row(
            d["name"] + (" (cut)" if d["truncated"] else ""),
            f"{d['num_tokens']:,}",
            f"{d['num_bytes']:,}",
            _pm(p["ppl"], p["ppl_stderr"], 3),
            _num(p["bits_per_byte"]),
            f"{d['tokens_per_s']:,.0f}",
        )
    tables = [ppl]
    if results.get("ref"):
        fid = _table(f"fidelity vs {results['ref']['path']}")
        fid.add_column("statistic")
        for d in results["datasets"]:
            fid.add_column(_short(d["name"]), justify="right", no_wrap=True)
        stats = [d["fidelity"] for d in results["datasets"]]
        rows = [
            ("PPL(ref)", lambda f: _pm(f["ref_ppl"], f["ref_ppl_stderr"])),
            ("ln(PPL/PPL(ref))", lambda f: _pm(f["ln_ppl_ratio"], f["ln_ppl_ratio_stderr"], 6)),
            ("KLD mean", lambda f: _pm(f["kld_mean"], f["kld_mean_stderr"], 6)),
            *[(f"KLD {q}", lambda f, q=q: _num(f[f"kld_{q}"], 6)) for q in _KLD_ROWS],
            (
                "RMS Δp %",
                lambda f: _pm(100 * f["delta_p_rms"], _scaled(f["delta_p_rms_stderr"]), 3),
            ),
            ("same top %", lambda f: _pm(f["same_top_pct"], f["same_top_pct_stderr"], 3)),
        ]
        for name, cell in rows:
            fid.add_row(name, *[cell(f) for f in stats])
        tables.append(fid)
    return speed + tables + _task_tables(results, None)


def _short(path: str) -> str:
    """The last component of a path (a table cell; the JSON keeps the path as given)."""
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def _scaled(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _delta_pct(value: float, base: float | None) -> str:
    if base is None or base == 0:
        return "-"
    return f"{100 * (value / base - 1):+.2f}%"


def compare_table(results: list[dict[str, Any]], labels: list[str]) -> Table:
    """One row per (result, dataset); deltas against the first result's same dataset."""
    table = _table(f"compared against {labels[0]}")
    cols = ("result", "dataset", "PPL", "Δ PPL", "bits/byte", "Δ bpb", "KLD mean", "same top %")
    for col in cols[:2]:
        table.add_column(col, overflow="fold", min_width=8)
    for col in cols[2:]:
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    base = {(d["sha256"], d["num_tokens"]): d["perplexity"] for d in results[0]["datasets"]}
    window = [(r["settings"]["context_len"], r["settings"]["stride"]) for r in results]
    if len(set(window)) > 1:
        table.caption = "note: context_len / stride differ between these results: " + ", ".join(
            f"{label} {c}/{s}" for label, (c, s) in zip(labels, window)
        )
    for label, r in zip(labels, results):
        for d in r["datasets"]:
            p, f = d["perplexity"], d.get("fidelity")
            b = base.get((d["sha256"], d["num_tokens"]))
            bpb = p["bits_per_byte"]
            table.add_row(
                label,
                _short(d["name"]),
                _num(p["ppl"], 3),
                _delta_pct(p["ppl"], b and b["ppl"]),
                _num(bpb),
                "-" if bpb is None else _delta_pct(bpb, b and b["bits_per_byte"]),
                "-" if not f else _num(f["kld_mean"], 6),
                "-" if not f else f"{f['same_top_pct']:.2f}",
            )
    return table


def _delta_points(value: float | None, base: float | None) -> str:
    return _delta(value, base, 100.0)


def _delta(value: float | None, base: float | None, scale: float = 1.0) -> str:
    if value is None or base is None:
        return "-"
    return f"{scale * (value - base):+.2f}"


def compare_tasks_table(results: list[dict[str, Any]], labels: list[str]) -> Table:
    """One row per (result, task); accuracy changes in points against the first result's same
    task (same name, data sha256 and number of docs), the perplexity change in %."""
    table = _table(f"tasks compared against {labels[0]}")
    cols = ("result", "task", "acc %", "Δ acc", "acc_norm %", "Δ acc_norm", "PPL", "Δ PPL")
    for col in cols[:2]:
        table.add_column(col, overflow="fold", min_width=8)
    for col in cols[2:]:
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    key = lambda t: (t["name"], t["sha256"], t["num_docs"], t["num_fewshot"])  # noqa: E731
    base = {key(t): t["metrics"] for t in _ll_tasks(results[0])}
    for label, r in zip(labels, results):
        for t in _ll_tasks(r):
            m, b = t["metrics"], base.get(key(t), {})
            ppl = m.get("perplexity")
            table.add_row(
                label,
                t["name"],
                _pct(m["acc"], None),
                _delta_points(m["acc"], b.get("acc")),
                _pct(m.get("acc_norm"), None),
                _delta_points(m.get("acc_norm"), b.get("acc_norm")),
                _ppl(ppl, None),
                "-" if ppl is None else _delta_pct(ppl, b.get("perplexity")),
            )
    return table


def compare_gen_table(results: list[dict[str, Any]], labels: list[str]) -> Table:
    """One row per (result, generative task): each metric and its change against the first
    result's same task (same name, data sha256, number of docs and shots); exact match in %
    and points, BLEU / chrF / ROUGE-L on their 0-100 scale."""
    table = _table(f"generative tasks compared against {labels[0]}")
    for col in ("result", "task"):
        table.add_column(col, overflow="fold", min_width=8)
    for _, col in _GEN_COLUMNS:
        for c in (col, f"Δ {col.removesuffix(' %')}"):
            table.add_column(c, justify="right", no_wrap=True, min_width=len(c))
    key = lambda t: (t["name"], t["sha256"], t["num_docs"], t["num_fewshot"])  # noqa: E731
    base = {key(t): t["metrics"] for t in _gen_tasks(results[0])}
    for label, r in zip(labels, results):
        for t in _gen_tasks(r):
            m, b = t["metrics"], base.get(key(t), {})
            cells = []
            for k, _ in _GEN_COLUMNS:
                scale = 100.0 if k == "exact_match" else 1.0
                value = m.get(k)
                cells.append("-" if value is None else f"{scale * value:.2f}")
                cells.append(_delta(value, b.get(k), scale))
            table.add_row(label, t["name"], *cells)
    return table


def compare_speed_table(results: list[dict[str, Any]], labels: list[str]) -> Table:
    """One row per (result with --speed, batch size): prefill and decode tokens/s with their
    ratio to the first such result's same batch size, TTFT, weights and peak RSS."""
    table = _table(f"speed compared against {labels[0]}")
    table.add_column("result", overflow="fold", min_width=8)
    cols = (
        "batch",
        "prefill tok/s",
        "TTFT ms",
        "decode tok/s",
        "x decode",
        "weights MiB",
        "peak RSS MiB",
    )
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True)
    timed = [(label, r["speed"]) for label, r in zip(labels, results) if r.get("speed")]
    base = {b["batch_size"]: b for b in timed[0][1]["batches"]}
    for label, sp in timed:
        weights = (sp.get("weights") or {}).get("weights_bytes")
        peak = (sp.get("memory") or {}).get("peak_rss_bytes")
        for b in sp["batches"]:
            ref = base.get(b["batch_size"], {}).get("decode_tokens_per_s")
            rate = b["decode_tokens_per_s"]
            table.add_row(
                label,
                str(b["batch_size"]),
                "-" if b["prefill_tokens_per_s"] is None else f"{b['prefill_tokens_per_s']:,.0f}",
                "-" if b["ttft_mean_s"] is None else f"{1e3 * b['ttft_mean_s']:,.1f}",
                "-" if rate is None else f"{rate:,.1f}",
                "-" if rate is None or not ref else f"{rate / ref:.2f}x",
                "-" if weights is None else f"{weights / 2**20:,.2f}",
                "-" if peak is None else f"{peak / 2**20:,.0f}",
            )
    return table


def compare_tables(results: list[dict[str, Any]], labels: list[str]) -> list[Table]:
    """The datasets comparison, the tasks comparisons (log-likelihood, generative) and the speed
    comparison, each when some result has rows."""
    tables = []
    if any(r["datasets"] for r in results):
        tables.append(compare_table(results, labels))
    if any(_ll_tasks(r) for r in results):
        tables.append(compare_tasks_table(results, labels))
    if any(_gen_tasks(r) for r in results):
        tables.append(compare_gen_table(results, labels))
    if any(r.get("speed") for r in results):
        tables.append(compare_speed_table(results, labels))
    return tables or [compare_table(results, labels)]
