"""Generative tasks: engine greedy generations equal HF transformers' `generate(do_sample=False)`
cut at the stop string (plain prompts, clipped to the context, chat rows whose prompt ids equal
transformers' own chat-template encoding), exact match / BLEU of those outputs equal what
sacrebleu and a plain comparison give on HF's outputs, seeded sampling repeats, and the task
files (jsonl rows, YAML generate_until, --gen-kwargs) parse or fail naming the row and field."""

from __future__ import annotations

import collections
import json

import pytest
import sacrebleu
import torch

from fastserve.data.tokenizer import Tokenizer
from fastserve.errors import ConfigError, DataError
from fastserve.eval import evaluate
from fastserve.eval.generative import (
    GenOptions,
    TokenizerPrompts,
    parse_gen_kwargs,
    prepare_generation,
    resolve_generation,
)
from fastserve.eval.tasks import load_task
from tiny_models import WORDS, tiny_model, tiny_tokenizer

CONTEXT = 128
PROMPTS = [
    "the cat sat on",
    "server tokens queue",
    "a mat while the model",
    "blocks cache the",
    "tokens",
    "the server sat on a mat while the cat",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: a tiny model's steps are all overhead, and the CI box is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wordy_dir(tmp_path_factory):
    """The tiny model with the LM-head rows of every token but the words of WORDS (with or
    without a leading space), " " and "\n" zeroed (their logit is 0, below the best word's):
    greedy outputs are words and newlines, so texts compare without questions of partial
    UTF-8. eos is zeroed too."""
    from fastserve.model import save_model

    tok = tiny_tokenizer()
    model = tiny_model(tok, max_position_embeddings=CONTEXT)
    word = lambda t: t.strip() in WORDS or t in (" ", "\n")  # noqa: E731
    drop = [i for i in range(tok.vocab_size) if not word(tok.decode([i]))]
    with torch.no_grad():
        model.lm_head.weight[drop] = 0.0
    path = tmp_path_factory.mktemp("gen") / "wordy"
    save_model(model, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def hf(wordy_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(wordy_dir).eval()


def hf_tokens(hf, ids: list[int], max_new: int) -> list[int]:
    """HF transformers' greedy continuation (generate(do_sample=False)), up to eos."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, pad_token_id=2
        )
    return out[0, len(ids) :].tolist()


def hf_text(tok: Tokenizer, tokens: list[int], stop: str | None = None) -> str:
    """The text of the first tokens up to eos, cut at `stop` (lm-eval's split(stop)[0]); a
    greedy run's first k tokens are the run with max_new_tokens = k, and cutting at the stop
    after generating equals stopping there."""
    if tok.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tok.eos_token_id)]
    text = tok.decode(tokens)
    return text if stop is None else text.split(stop)[0]


@pytest.fixture(scope="module")
def hf_runs(wordy_dir, hf):
    """24 greedy tokens of each of PROMPTS."""
    tok = Tokenizer.load(wordy_dir)
    return [hf_tokens(hf, ids, 24) for ids in tok.encode_batch(PROMPTS)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_greedy_generations_equal_hf_cut_at_the_stop_string(wordy_dir, hf, hf_runs, tmp_path):
    tok = Tokenizer.load(wordy_dir)
    ids = tok.encode_batch(PROMPTS)
    free = [hf_text(tok, t) for t in hf_runs]
    assert len(set(free)) > 2 and all(free)
    words = collections.Counter(w for f in free for w in set(f.split()[1:]))
    stop = " " + words.most_common(1)[0][0]  # a word several outputs contain: they stop there
    long_prompt = " ".join(["the cat sat on a mat"] * 40)
    long_ids = tok.encode(long_prompt)[: CONTEXT - 6]
    long_prompt = tok.decode(long_ids)
    assert tok.encode(long_prompt) == long_ids
    rows = [{"prompt": p, "reference": "x"} for p in [*PROMPTS, long_prompt]]
    path = _jsonl(tmp_path / "gen.jsonl", rows)
    gen_kwargs = {"until": [stop], "max_gen_toks": 24}
    r = evaluate(wordy_dir, tasks=[str(path)], gen_kwargs=gen_kwargs, log_samples=True)
    (entry,) = r["tasks"]
    got = [s["output"] for s in entry["samples"]]
    want = [hf_text(tok, t, stop) for t in hf_runs]
    want.append(hf_text(tok, hf_tokens(hf, long_ids, 6), stop))  # clipped to the context
    assert got == want
    assert sum(stop in f for f in free) >= 2 and any(g != f for g, f in zip(got, free))
    assert entry["num_clipped_requests"] == 1 and entry["samples"][-1]["num_tokens"] <= 6
    assert entry["generation"]["until"] == [stop] and entry["generation"]["do_sample"] is False
    assert [s["num_prompt_tokens"] for s in entry["samples"]] == [len(p) for p in [*ids, long_ids]]


def test_exact_match_and_bleu_of_own_greedy_outputs(wordy_dir, hf_runs, tmp_path):
    """References that are the model's own greedy outputs (default stop "\\n\\n") for half the
    docs: the metrics equal those computed from HF's outputs with sacrebleu / str comparison."""
    tok = Tokenizer.load(wordy_dir)
    hf_out = [hf_text(tok, t[:16], "\n\n") for t in hf_runs]
    refs = [o if i % 2 == 0 else "the cat sat on a mat" for i, o in enumerate(hf_out)]
    refs[1] = "  " + hf_out[1] + "\n"  # equal after strip (the default exact match strips)
    rows = [{"prompt": p, "references": [r, "queue"]} for p, r in zip(PROMPTS, refs)]
    path = _jsonl(tmp_path / "own.jsonl", rows)
    r = evaluate(wordy_dir, tasks=[str(path)], gen_kwargs="max_gen_toks=16")
    m = r["tasks"][0]["metrics"]
    em = [float(o.strip() in (r.strip(), "queue")) for o, r in zip(hf_out, refs)]
    assert m["exact_match"] == pytest.approx(sum(em) / len(em)) and 0 < m["exact_match"] < 1
    streams = [refs, ["queue"] * len(refs)]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hf_out, streams).score, abs=1e-9)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hf_out, streams).score, abs=1e-9)
    assert m["bleu_stderr"] > 0 and r["tasks"][0]["samples"] is None


def test_chat_rows_use_the_chat_template(wordy_dir, hf, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(wordy_dir)
    tok = Tokenizer.load(wordy_dir)
    conversations = [
        [{"role": "user", "content": "the cat sat on"}],
        [{"role": "system", "content": "server tokens"}, {"role": "user", "content": "a mat"}],
    ]
    rows = [{"messages": c, "reference": "x", "id": i} for i, c in enumerate(conversations)]
    rows.append({"prompt": "blocks cache the", "reference": "y"})
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    task = load_task(str(path))
    plain = prepare_generation(task, TokenizerPrompts(tok), CONTEXT, GenOptions())
    as_chat = prepare_generation(
        task, TokenizerPrompts(tok), CONTEXT, GenOptions(apply_chat_template=True)
    )
    user = [{"role": "user", "content": "blocks cache the"}]
    want_ids = [
        hf_tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"]
        for c in [*conversations, user]
    ]
    assert [list(r.token_ids) for r in plain.requests[:2]] == want_ids[:2]
    assert list(plain.requests[2].token_ids) == tok.encode("blocks cache the")
    assert [list(r.token_ids) for r in as_chat.requests] == want_ids
    assert plain.requests[0].params.stop == [] and plain.requests[2].params.stop == ["\n\n"]

    r = evaluate(wordy_dir, tasks=[str(path)], gen_kwargs="max_gen_toks=12", log_samples=True)
    samples = r["tasks"][0]["samples"]
    assert [s["id"] for s in samples] == [0, 1, None]
    assert samples[1]["messages"] == conversations[1] and samples[2]["messages"] is None
    assert samples[0]["prompt"] == hf_tok.apply_chat_template(
        conversations[0], add_generation_prompt=True, tokenize=False
    )
    assert [s["output"] for s in samples[:2]] == [
        hf_text(tok, hf_tokens(hf, i, 12)) for i in want_ids[:2]
    ]
    assert r["tasks"][0]["num_chat_prompts"] == 2


def test_seeded_sampling_repeats(wordy_dir, tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"prompt": p, "reference": "x"} for p in PROMPTS])
    kw = "temperature=1.5,top_p=0.95,seed=7,max_gen_toks=12"
    runs = [evaluate(wordy_dir, tasks=[str(path)], gen_kwargs=kw, log_samples=True) for _ in "ab"]
    a, b = ([s["output"] for s in r["tasks"][0]["samples"]] for r in runs)
    assert a == b
    g = runs[0]["tasks"][0]["generation"]
    assert (g["do_sample"], g["temperature"], g["top_p"], g["seed"]) == (True, 1.5, 0.95, 7)
    assert runs[0]["settings"]["generation"]["gen_kwargs"] == {
        "temperature": 1.5, "top_p": 0.95, "seed": 7, "max_gen_toks": 12
    }  # fmt: skip


def test_jsonl_rows_and_their_errors(tmp_path):
    task = load_task(str(_jsonl(tmp_path / "ok.jsonl", [
        {"prompt": "q", "reference": "a", "id": "x1", "meta": 3},
        {"messages": [{"role": "user", "content": "hi"}], "references": ["a", "b"]},
    ])))  # fmt: skip
    assert task.output_type == "generate_until" and task.name == "ok"
    assert [d.references for d in task.docs] == [("a",), ("a", "b")]
    assert task.docs[0].doc_id == "x1" and task.docs[1].messages[0]["content"] == "hi"
    bad = [
        ({"prompt": "q"}, "bad.jsonl:2: a generative row needs exactly one of 'reference'"),
        ({"prompt": "q", "reference": 3}, "bad.jsonl:2: field 'reference' must be a string"),
        ({"prompt": "q", "references": []}, "field 'references' must be a non-empty list"),
        ({"prompt": "", "reference": "a"}, "field 'prompt' must be a non-empty string"),
        ({"prompt": "q", "messages": [], "reference": "a"}, "exactly one of 'prompt'"),
        ({"reference": "a"}, "exactly one of 'prompt' (a string) or 'messages'"),
        ({"messages": [{"role": "user"}], "reference": "a"}, "field 'messages' must be"),
        ({"prompt": "q", "reference": "a", "id": [1]}, "field 'id' must be"),
    ]
    for row, message in bad:
        path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "reference": "r"}, row])
        with pytest.raises(DataError) as e:
            load_task(str(path))
        assert message in str(e.value), (row, str(e.value))


def _gen_yaml(tmp_path, extra: str) -> str:
    rows = [{"q": f"q{i}", "a": f"a{i}", "alts": [f"a{i}", f"b{i}"]} for i in range(4)]
    _jsonl(tmp_path / "rows.jsonl", rows)
    _jsonl(tmp_path / "shots.jsonl", [{"q": "qs", "a": "as", "alts": ["as"]}])
    path = tmp_path / "g.yaml"
    path.write_text(
        'data: rows.jsonl\noutput_type: generate_until\ndoc_to_text: "Q: {{q}}\\nA:"\n' + extra,
        encoding="utf-8",
    )
    return str(path)


def test_yaml_generate_until(tmp_path):
    extra = (
        'doc_to_target: alts\ndescription: "Answer.\\n"\nnum_fewshot: 1\n'
        "fewshot_data: shots.jsonl\n"
        'generation_kwargs: {until: ["\\n", .], max_gen_toks: 8, temperature: 0}\n'
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n  - metric: chrf\n"
    )
    task = load_task(_gen_yaml(tmp_path, extra))
    assert task.docs[1].references == ("a1", "b1")
    assert [s.name for s in task.metrics] == ["exact_match", "chrf"] and task.metrics[0].ignore_case
    assert task.prompts(1) == [("Answer.\nQ: qs\nA: as\n\nQ: q0\nA:", None)]
    system = {"role": "system", "content": "Answer.\n"}
    user = {"role": "user", "content": "Q: qs\nA: as\n\nQ: q0\nA:"}
    assert task.prompts(1, chat=True) == [(None, (system, user))]
    gen = resolve_generation(task.generation_kwargs, {"max_gen_toks": 4}, "t")
    assert (gen.until, gen.max_gen_toks, gen.temperature) == (("\n", "."), 4, 0.0)
    literal = load_task(_gen_yaml(tmp_path, "doc_to_target: \"{{[a, 'x']}}\"\n"))
    assert literal.docs[0].references == ("a0", "x")
    assert load_task(_gen_yaml(tmp_path, "doc_to_target: a\n")).docs[2].references == ("a2",)

    bad = [
        (
            "doc_to_target: a\ngeneration_kwargs: {max_new_tokens: 3}\n",
            "unknown generation setting 'max_new_tokens'",
        ),
        ("doc_to_target: a\ngeneration_kwargs: {until: 3}\n", "until must be a stop string"),
        ("doc_to_target: a\nmetric_list: [{metric: bleu, ignore_case: true}]\n", "no option"),
        ("doc_to_target: a\ndoc_to_choice: [x, y]\n", "takes no doc_to_choice"),
        ("doc_to_target: 0\n", "doc_to_target is a field or a template"),
        ("doc_to_target: a\ngeneration_kwarg: {}\n", "unknown key 'generation_kwarg'"),
    ]
    for extra, message in bad:
        with pytest.raises(DataError, match="g.yaml: .*" + message):
            load_task(_gen_yaml(tmp_path, extra))
    (tmp_path / "mc.yaml").write_text(
        "data: rows.jsonl\ndoc_to_text: q\ndoc_to_choice: [x, y]\ndoc_to_target: 0\n"
        "metric_list: [bleu]\n"
    )
    with pytest.raises(DataError, match="metric_list is for output_type generate_until"):
        load_task(str(tmp_path / "mc.yaml"))


def test_gen_kwargs_parsing():
    assert parse_gen_kwargs("temperature=0.7,top_p=0.9,max_gen_toks=64,seed=1,do_sample=True") == {
        "temperature": 0.7, "top_p": 0.9, "max_gen_toks": 64, "seed": 1, "do_sample": True
    }  # fmt: skip
    assert parse_gen_kwargs(r"until=\n\n") == {"until": ("\n\n",)}
    assert parse_gen_kwargs('{"until": ["\\n", "."], "top_k": 5}') == {
        "until": ("\n", "."),
        "top_k": 5,
    }
    assert parse_gen_kwargs(None) == {} and parse_gen_kwargs("") == {}
    gen = resolve_generation({"do_sample": True}, {}, "t")
    assert (gen.temperature, gen.do_sample) == (1.0, True)
    assert resolve_generation({}, {}, "t").do_sample is False
    bad = [
        ("tempature=0.5", "unknown generation setting 'tempature'"),
        ("max_gen_toks=0", "max_gen_toks must be at least 1"),
        ("max_gen_toks=1.5", "max_gen_toks must be an integer"),
        ("temperature=hot", "temperature must be a number"),
        ("temperature", "takes key=value pairs"),
        ("{bad json", "not a valid JSON object"),
    ]
    for spec, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_gen_kwargs(spec)
    with pytest.raises(ConfigError, match="do_sample=false contradicts temperature=0.5"):
        resolve_generation({"do_sample": False}, {"temperature": 0.5}, "task t")
    with pytest.raises(ConfigError, match="task t: top_p must be in"):
        resolve_generation({}, parse_gen_kwargs("top_p=1.5"), "task t")
