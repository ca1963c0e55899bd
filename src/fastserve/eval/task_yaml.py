"""YAML task files: a user's own log-likelihood or generative task over a local jsonl, with
lm-eval's keys.

    # my_task.yaml                                    (docs/eval.md, "YAML task files")
    task: my_task
    data: my_rows.jsonl                  # relative to this file
    output_type: multiple_choice         # or loglikelihood (cloze)
    doc_to_text: "Question: {{question}}\\nAnswer:"
    doc_to_choice: "{{[good, bad]}}"     # a field, a template rendering a list, or a list
    doc_to_target: label                 # a field or a template: an index or a choice
    num_fewshot: 2
    fewshot_seed: 1234

    output_type: generate_until          # a generative task (generative.py)
    doc_to_target: answer                # the reference(s): a string, or a list of strings
    generation_kwargs: {until: ["\n"], max_gen_toks: 32}
    metric_list: [{metric: exact_match, ignore_case: true}, {metric: bleu}]

Values follow lm-eval's `ConfigurableTask`: a value naming a field of the row is that field,
anything else is a Jinja template rendered with the row's fields (a sandboxed environment, an
undefined name is an error); a choices template renders a Python list literal; a target that
renders as digits is an index. An unknown key, a missing required one or a row the templates
cannot render is a DataError naming the file (and the row). A generate_until target that
renders a list literal ("[...]") is a list of references, as in lm-eval. Knows nothing about
models.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from typing import Any

import yaml

from fastserve.errors import DataError
from fastserve.eval.tasks import (
    DEFAULT_FEWSHOT_SEED,
    GENERATE_UNTIL,
    LOGLIKELIHOOD,
    MULTIPLE_CHOICE,
    OUTPUT_TYPES,
    Doc,
    GenDoc,
    Task,
    files_sha256,
    read_jsonl,
)

__all__ = ["TASK_KEYS", "load_yaml_task"]

# key -> (type, default); no default (...) = required
TASK_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "task": (str, None),  # the task's name (default: the file's stem)
    "data": (str, ...),  # jsonl of the docs, relative to the YAML file
    "output_type": (str, MULTIPLE_CHOICE),  # multiple_choice, loglikelihood or generate_until
    "doc_to_text": (str, ...),  # the doc's context
    "doc_to_choice": ((str, list), None),  # multiple_choice: the choices
    "doc_to_target": ((str, int), ...),  # the gold choice, the cloze target, the reference(s)
    "target_delimiter": (str, " "),
    "fewshot_delimiter": (str, "\n\n"),
    "description": (str, ""),
    "num_fewshot": (int, 0),
    "fewshot_seed": (int, DEFAULT_FEWSHOT_SEED),
    "fewshot_data": (str, None),  # jsonl of the few-shot examples (default: the docs, minus each)
    "generation_kwargs": (dict, None),  # generate_until: until, max_gen_toks, do_sample, ...
    "metric_list": (list, None),  # generate_until: exact_match, bleu, chrf, rouge_l (default all)
}
_GENERATIVE_ONLY = ("generation_kwargs", "metric_list")


class _Renderer:
    """lm-eval's value rules over one row: a field name, else a Jinja template."""

    def __init__(self, where: str) -> None:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.env = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
        self.where = where
        self._compiled: dict[str, Any] = {}

    def render(self, template: str, row: dict, line: str) -> str:
        if template in row:
            return row[template]
        if template not in self._compiled:
            try:
                self._compiled[template] = self.env.from_string(template)
            except Exception as e:
                raise DataError(f"{self.where}: bad template {template!r} ({e}).") from None
        try:
            return self._compiled[template].render(**row)
        except Exception as e:
            raise DataError(f"{line}: cannot render {template!r} ({e}).") from None


def _check_keys(config: Any, path: Path) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise DataError(f"task file {path} is not a YAML mapping of task keys.")
    unknown = sorted(set(config) - set(TASK_KEYS))
    if unknown:
        raise DataError(
            f"task file {path}: unknown key {unknown[0]!r} (known: {', '.join(TASK_KEYS)})."
        )
    out = {}
    for key, (kind, default) in TASK_KEYS.items():
        if key not in config:
            if default is ...:
                raise DataError(f"task file {path}: missing key {key!r}.")
            out[key] = default
            continue
        value = config[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise DataError(f"task file {path}: {key} must be a {names}, got {value!r:.60}.")
        out[key] = value
    if out["output_type"] not in OUTPUT_TYPES:
        raise DataError(
            f"task file {path}: output_type must be one of {', '.join(OUTPUT_TYPES)}, "
            f"got {out['output_type']!r}."
        )
    if out["output_type"] == MULTIPLE_CHOICE and out["doc_to_choice"] is None:
        raise DataError(f"task file {path}: a multiple_choice task needs doc_to_choice.")
    if out["num_fewshot"] < 0:
        raise DataError(f"task file {path}: num_fewshot must be >= 0.")
    generative = out["output_type"] == GENERATE_UNTIL
    if generative and out["doc_to_choice"] is not None:
        raise DataError(f"task file {path}: a generate_until task takes no doc_to_choice.")
    if generative and isinstance(out["doc_to_target"], int):
        raise DataError(
            f"task file {path}: a generate_until task's doc_to_target is a field or a template "
            "giving the reference(s)."
        )
    for key in _GENERATIVE_ONLY:
        if out[key] is not None and not generative:
            raise DataError(f"task file {path}: {key} is for output_type generate_until.")
    return out


def _choices(spec: str | list, row: dict, r: _Renderer, line: str) -> tuple[str, ...]:
    if isinstance(spec, list):
        value = [r.render(str(t), row, line) for t in spec]
    else:
        value = r.render(spec, row, line)
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise DataError(
                    f"{line}: doc_to_choice did not give a list ({value!r:.60})."
                ) from None
    if not isinstance(value, list | tuple) or len(value) < 2:
        raise DataError(f"{line}: doc_to_choice must give a list of at least 2 choices.")
    return tuple(str(c) for c in value)


def _doc(c: dict, row: dict, r: _Renderer, line: str) -> Doc:
    text = str(r.render(c["doc_to_text"], row, line))
    target = c["doc_to_target"]
    target = target if isinstance(target, int) else r.render(target, row, line)
    if c["output_type"] == LOGLIKELIHOOD:
        return Doc(text, (str(target),), 0)
    choices = _choices(c["doc_to_choice"], row, r, line)
    if isinstance(target, str) and target.strip().isdigit():
        target = int(target)
    if isinstance(target, str):
        if target not in choices:
            raise DataError(f"{line}: doc_to_target {target!r:.60} is not one of the choices.")
        target = choices.index(target)
    if not isinstance(target, int) or not 0 <= target < len(choices):
        raise DataError(f"{line}: doc_to_target {target!r} is not an index of the choices.")
    return Doc(text, choices, target)


def _references(c: dict, row: dict, r: _Renderer, line: str) -> tuple[str, ...]:
    """A generate_until doc's references: a string, a list, or a template rendering either."""
    spec = c["doc_to_target"]
    value = r.render(spec, row, line)
    if spec not in row and isinstance(value, str) and value[:1] == "[" and value[-1:] == "]":
        # lm-eval: a string that only looks like a list stays the string
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(value)
    values = value if isinstance(value, list | tuple) else [value]
    scalar = lambda v: isinstance(v, str | int | float) and not isinstance(v, bool)  # noqa: E731
    ok = values and all(scalar(v) for v in values)
    if not ok:
        raise DataError(
            f"{line}: doc_to_target must give a reference or a list of them, got {value!r:.60}."
        )
    return tuple(str(v) for v in values)


def _gen_doc(c: dict, row: dict, r: _Renderer, line: str) -> GenDoc:
    text = str(r.render(c["doc_to_text"], row, line))
    doc_id = row.get("id")
    doc_id = doc_id if isinstance(doc_id, str | int) and not isinstance(doc_id, bool) else None
    return GenDoc(text, None, _references(c, row, r, line), doc_id)


def _docs(c: dict, path: Path, r: _Renderer) -> list:
    rows = read_jsonl(path, f"task file {r.where}")
    build = _gen_doc if c["output_type"] == GENERATE_UNTIL else _doc
    return [build(c, row, r, f"{path}:{i}") for i, row in enumerate(rows, 1)]


def load_yaml_task(path: Path):
    """The task of a YAML file: a Task, or a GenTask for output_type generate_until."""
    if not path.is_file():
        raise DataError(f"no such task file: {path}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"task file {path} is not valid YAML ({e}).".replace("\n", " ")) from None
    c = _check_keys(config, path)
    r = _Renderer(str(path))
    data = path.parent / c["data"]
    docs = _docs(c, data, r)
    files = [path, data]
    fewshot = None
    if c["fewshot_data"] is not None:
        fewshot_path = path.parent / c["fewshot_data"]
        fewshot = _docs(c, fewshot_path, r)
        files.append(fewshot_path)
    if c["output_type"] == GENERATE_UNTIL:
        return _gen_task(c, path, docs, fewshot, files)
    return Task(
        name=c["task"] or path.stem,
        output_type=c["output_type"],
        source=str(path),
        sha256=files_sha256(files),
        docs=docs,
        fewshot_docs=fewshot,
        num_fewshot=c["num_fewshot"],
        fewshot_seed=c["fewshot_seed"],
        target_delimiter=c["target_delimiter"],
        fewshot_delimiter=c["fewshot_delimiter"],
        description=c["description"],
    )


def _gen_task(c: dict, path: Path, docs: list, fewshot: list | None, files: list[Path]):
    from fastserve.eval.gen_metrics import DEFAULT_METRICS, parse_metric_list
    from fastserve.eval.generative import GenTask, check_gen_kwargs

    where = f"task file {path}"
    kwargs, metric_list = c["generation_kwargs"], c["metric_list"]
    return GenTask(
        name=c["task"] or path.stem,
        source=str(path),
        sha256=files_sha256(files),
        docs=docs,
        generation_kwargs={} if kwargs is None else check_gen_kwargs(kwargs, where, DataError),
        metrics=DEFAULT_METRICS if metric_list is None else parse_metric_list(metric_list, where),
        fewshot_docs=fewshot,
        num_fewshot=c["num_fewshot"],
        fewshot_seed=c["fewshot_seed"],
        target_delimiter=c["target_delimiter"],
        fewshot_delimiter=c["fewshot_delimiter"],
        description=c["description"],
    )
