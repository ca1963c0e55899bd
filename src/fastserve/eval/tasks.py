"""Log-likelihood tasks: their documents, as lm-evaluation-harness builds them, and where they
come from (the built-ins piqa and lambada, ARC / HellaSwag jsonl files, YAML task files); and
the documents of generative tasks (`GenDoc`, from jsonl rows {prompt | messages, reference |
references} recognised by those keys, or YAML files with `output_type: generate_until`;
generative.py defines the task itself).

    task = load_task("piqa", task_data="../shared/data")       # or "lambada", "x.jsonl", "t.yaml"
    for context, continuations in task.requests(limit=100):   # strings, one pair per choice
        ...

lm-eval's conventions (0.4.x, `ConfigurableTask`):
- multiple_choice: the continuations are target_delimiter + choice (default " "); the gold is an
  index into the choices. loglikelihood (cloze): one continuation, the target itself (lambada's
  target carries its own leading space).
- the context is description + the few-shot examples + the doc's text; an example is
  text + target_delimiter + its gold target, examples end with fewshot_delimiter ("\\n\\n").
  Examples come from `fewshot_docs` when the task has them, else from its own docs without the
  doc itself (k + 1 drawn, the doc dropped), drawn by one random.Random(fewshot_seed) per task
  in document order.

Built-ins read the local copies a user passes as `task_data` (a dir holding piqa/ and lambada/,
like ../shared/data): piqa/valid.jsonl + valid-labels.lst, lambada/lambada_test.jsonl (OpenAI's
lambada_openai file). Knows nothing about tokenizers or models (see loglikelihood.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastserve.errors import DataError

__all__ = [
    "BUILTIN_TASKS",
    "Doc",
    "GenDoc",
    "Task",
    "draw_fewshot",
    "gen_doc",
    "load_task",
    "read_jsonl",
]

MULTIPLE_CHOICE = "multiple_choice"
LOGLIKELIHOOD = "loglikelihood"  # lm-eval's name for cloze tasks (one target per doc)
GENERATE_UNTIL = "generate_until"  # lm-eval's name for generative tasks (generative.py)
OUTPUT_TYPES = (MULTIPLE_CHOICE, LOGLIKELIHOOD, GENERATE_UNTIL)
# the keys that make a jsonl row generative (generative.py: prompt | messages, reference(s))
GENERATIVE_KEYS = frozenset({"prompt", "messages", "reference", "references"})
Message = dict[str, str]  # {"role": ..., "content": ...}
DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_seed


@dataclass(frozen=True)
class Doc:
    text: str  # the doc's own context (lm-eval's doc_to_text), before any few-shot examples
    choices: tuple[str, ...]  # multiple choice: the choices; loglikelihood: (target,)
    gold: int  # index of the right choice (0 for loglikelihood)


@dataclass
class Task:
    name: str
    output_type: str  # MULTIPLE_CHOICE or LOGLIKELIHOOD
    source: str  # what was read (a file, or a built-in's data dir)
    sha256: str  # of the lines "<sha256>  <file name>\n" of the files read
    docs: list[Doc]
    fewshot_docs: list[Doc] | None = None  # None: examples are drawn from docs
    num_fewshot: int = 0
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""

    def continuations(self, doc: Doc) -> list[str]:
        if self.output_type == LOGLIKELIHOOD:
            return [doc.choices[0]]
        return [self.target_delimiter + c for c in doc.choices]

    def requests(self, limit: int | None = None) -> list[tuple[str, list[str]]]:
        """(context, continuations) of the first `limit` docs (all when None), in order."""
        docs = self.docs if limit is None else self.docs[:limit]
        check_fewshot_pool(self.name, self.num_fewshot, self.docs, self.fewshot_docs)
        rng = random.Random(self.fewshot_seed)
        out = []
        for doc in docs:
            context = self.description
            if self.num_fewshot:
                examples = draw_fewshot(self.docs, self.fewshot_docs, self.num_fewshot, rng, doc)
                context += "".join(
                    ex.text + self.target_delimiter + ex.choices[ex.gold] + self.fewshot_delimiter
                    for ex in examples
                )
            out.append((context + doc.text, self.continuations(doc)))
        return out


def check_fewshot_pool(name: str, k: int, docs: list, fewshot_docs: list | None) -> None:
    """DataError unless k examples can be drawn (from fewshot_docs, else docs minus one)."""
    pool = len(docs) - 1 if fewshot_docs is None else len(fewshot_docs)
    if not 0 <= k <= pool:
        raise DataError(f"task {name}: num_fewshot {k} needs that many examples, it has {pool}.")


def draw_fewshot(docs: list, fewshot_docs: list | None, k: int, rng: random.Random, doc) -> list:
    """The k examples of `doc`: from fewshot_docs, else k + 1 of docs with the doc dropped."""
    if fewshot_docs is not None:
        return rng.sample(fewshot_docs, k)
    drawn = rng.sample(docs, k + 1)
    return [d for d in drawn if d is not doc][:k]


@dataclass(frozen=True)
class GenDoc:
    text: str | None  # the doc's own prompt (doc_to_text), before the few-shot examples
    messages: tuple[Message, ...] | None  # a chat row's messages (then text is None)
    references: tuple[str, ...]  # at least one; few-shot examples show the first
    doc_id: str | int | None = None  # the row's "id", kept in logged samples


# ---- files ---------------------------------------------------------------------------------------


def read_jsonl(path: Path, what: str) -> list[dict]:
    """The JSON objects of a jsonl file, one a line (blank lines skipped); DataError naming the
    line of the first bad one."""
    if not path.is_file():
        raise DataError(f"{what}: no such file: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{num} is not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{num} is not a JSON object.")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} has no rows.")
    return rows


def files_sha256(paths: list[Path]) -> str:
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in paths)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _field(row: dict, key: str, kind: type, where: str):
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field {key!r} must be a {kind.__name__}, got {value!r:.60}.")
    return value


# ---- generative jsonl rows ------------------------------------------------------------------


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    ok = isinstance(value, list) and value
    ok = ok and all(
        isinstance(m, dict)
        and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str)
        and set(m) <= {"role", "content", "name"}
        for m in value
    )
    if not ok:
        raise DataError(
            f"{where}: field 'messages' must be a non-empty list of "
            f'{{"role": str, "content": str}}, got {json.dumps(value)[:60]}.'
        )
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _references(row: dict, where: str) -> tuple[str, ...]:
    if ("reference" in row) == ("references" in row):
        raise DataError(
            f"{where}: a generative row needs exactly one of 'reference' (a string) or "
            "'references' (a list of strings)."
        )
    if "reference" in row:
        if not isinstance(row["reference"], str):
            got = f"{row['reference']!r:.60}"
            raise DataError(f"{where}: field 'reference' must be a string, got {got}.")
        return (row["reference"],)
    refs = row["references"]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(
            f"{where}: field 'references' must be a non-empty list of strings, got {refs!r:.60}."
        )
    return tuple(refs)


def gen_doc(row: dict, where: str) -> GenDoc:
    """One jsonl row -> GenDoc; DataError naming the row and the field."""
    if ("prompt" in row) == ("messages" in row):
        raise DataError(
            f"{where}: a generative row needs exactly one of 'prompt' (a string) or 'messages' "
            f"(a list of {{role, content}}); it has keys {', '.join(sorted(row))}."
        )
    text, messages = None, None
    if "prompt" in row:
        text = row["prompt"]
        if not isinstance(text, str) or not text:
            raise DataError(
                f"{where}: field 'prompt' must be a non-empty string, got {text!r:.60}."
            )
    else:
        messages = _messages(row["messages"], where)
    doc_id = row.get("id")
    if doc_id is not None and (not isinstance(doc_id, str | int) or isinstance(doc_id, bool)):
        raise DataError(f"{where}: field 'id' must be a string or an integer, got {doc_id!r:.60}.")
    return GenDoc(text, messages, _references(row, where), doc_id)


# ---- built-ins -----------------------------------------------------------------------------------


def _data_dir(task_data: str | Path | None, name: str, files: tuple[str, ...]) -> Path:
    """The dir holding a built-in's files: task_data/name/ or task_data itself."""
    if task_data is None:
        raise DataError(
            f"task {name} reads local data: pass --task-data DIR (a dir with {name}/{files[0]}, "
            "e.g. shared/data) or set FASTSERVE_DATA."
        )
    root = Path(task_data).expanduser()
    for d in (root / name, root):
        if all((d / f).is_file() for f in files):
            return d
    raise DataError(
        f"task {name}: no {name}/{files[0]} under --task-data {task_data} "
        f"(expected {', '.join(f'{name}/{f}' for f in files)})."
    )


def _piqa(task_data) -> Task:
    d = _data_dir(task_data, "piqa", ("valid.jsonl", "valid-labels.lst"))
    rows = read_jsonl(d / "valid.jsonl", "piqa")
    labels = (d / "valid-labels.lst").read_text(encoding="utf-8").split()
    if len(labels) != len(rows) or any(x not in ("0", "1") for x in labels):
        raise DataError(f"{d}/valid-labels.lst must hold one 0 or 1 per row of valid.jsonl.")
    docs = []
    for num, (row, label) in enumerate(zip(rows, labels), 1):
        where = f"{d}/valid.jsonl:{num}"
        goal = _field(row, "goal", str, where)
        sols = tuple(_field(row, k, str, where) for k in ("sol1", "sol2"))
        docs.append(Doc(f"Question: {goal}\nAnswer:", sols, int(label)))
    files = [d / "valid.jsonl", d / "valid-labels.lst"]
    return Task("piqa", MULTIPLE_CHOICE, str(d), files_sha256(files), docs)


def _lambada(task_data) -> Task:
    d = _data_dir(task_data, "lambada", ("lambada_test.jsonl",))
    path = d / "lambada_test.jsonl"
    docs = []
    for num, row in enumerate(read_jsonl(path, "lambada"), 1):
        docs.append(lambada_doc(_field(row, "text", str, f"{path}:{num}")))
    return Task("lambada", LOGLIKELIHOOD, str(d), files_sha256([path]), docs)


def lambada_doc(text: str) -> Doc:
    """lambada_openai: the context is the text without its last " "-separated word, the target
    " " + that word (split on the space character only, as lm-eval's template does)."""
    words = text.split(" ")
    return Doc(" ".join(words[:-1]), (" " + words[-1],), 0)


BUILTIN_TASKS: dict[str, Callable[[str | Path | None], Task]] = {
    "piqa": _piqa,
    "lambada": _lambada,
}


# ---- ARC / HellaSwag jsonl -----------------------------------------------------------------------


def _arc_doc(row: dict, where: str) -> Doc:
    choices = _field(row, "choices", dict, where)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        raise DataError(f"{where}: choices must hold equally long 'text' and 'label' lists.")
    key = _field(row, "answerKey", str, where)
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is not one of the labels {labels}.")
    question = _field(row, "question", str, where)
    return Doc(f"Question: {question}\nAnswer:", tuple(map(str, texts)), labels.index(key))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag_doc(row: dict, where: str) -> Doc:
    ctx = _field(row, "ctx_a", str, where) + " " + _field(row, "ctx_b", str, where).capitalize()
    query = _hellaswag_clean(_field(row, "activity_label", str, where) + ": " + ctx)
    endings = _field(row, "endings", list, where)
    label = row.get("label")
    if not str(label).isdigit() or int(label) >= len(endings):
        raise DataError(f"{where}: label must index the endings, got {label!r}.")
    return Doc(query, tuple(_hellaswag_clean(str(e)) for e in endings), int(label))


# keys that identify a jsonl shape -> its doc builder (lm-eval's arc_easy / hellaswag templates)
_JSONL_SHAPES = {
    "arc": ({"question", "choices", "answerKey"}, _arc_doc),
    "hellaswag": ({"ctx_a", "ctx_b", "activity_label", "endings", "label"}, _hellaswag_doc),
}


def _jsonl_task(path: Path):
    rows = read_jsonl(path, "task file")
    if GENERATIVE_KEYS & rows[0].keys():
        from fastserve.eval.generative import gen_jsonl_task

        return gen_jsonl_task(path, rows)
    shape = next((s for s, (keys, _) in _JSONL_SHAPES.items() if keys <= rows[0].keys()), None)
    if shape is None:
        known = "; ".join(f"{s}: {', '.join(sorted(k))}" for s, (k, _) in _JSONL_SHAPES.items())
        raise DataError(
            f"{path}: rows of an unknown shape (keys {', '.join(sorted(rows[0]))}); a jsonl "
            f"task is ARC- or HellaSwag-shaped ({known}), generative (prompt or messages, with "
            "reference or references), or write a YAML task file."
        )
    build = _JSONL_SHAPES[shape][1]
    docs = [build(row, f"{path}:{i}") for i, row in enumerate(rows, 1)]
    return Task(path.stem, MULTIPLE_CHOICE, str(path), files_sha256([path]), docs)


def load_task(spec: str, task_data: str | Path | None = None):
    """A built-in name, a .jsonl (ARC / HellaSwag rows -> Task, generative rows -> GenTask) or
    a .yaml / .yml task file (output_type generate_until -> GenTask, else Task)."""
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec](task_data)
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml"):
        from fastserve.eval.task_yaml import load_yaml_task

        return load_yaml_task(path)
    if path.suffix == ".jsonl":
        return _jsonl_task(path)
    raise DataError(
        f"unknown task {spec!r}: give a built-in ({', '.join(BUILTIN_TASKS)}), a .jsonl file "
        "(ARC / HellaSwag rows, or generative rows) or a .yaml task file."
    )
