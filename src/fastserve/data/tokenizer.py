"""Byte-level BPE tokenizer: train one, or load any HF `tokenizer.json`, and save it HF-style.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library) and remembers which added tokens
are bos / eos / pad and which chat template goes with it. `save_pretrained(dir)` writes
`tokenizer.json`, `tokenizer_config.json` (with a chat template) and `special_tokens_map.json`, a
directory that `transformers.AutoTokenizer.from_pretrained` loads with the same ids.

Trained tokenizers: GPT-2 style byte-level BPE (every byte is in the initial alphabet, so any text
encodes with no unknown token), no prefix space, special tokens `<|bos|>`, `<|eos|>`, `<|pad|>` with
ids 0, 1, 2. `encode` never adds special tokens itself (no post-processor); `add_bos=True` prepends
bos. The `fingerprint` (sha256 of the canonical tokenizer.json) identifies a tokenizer across
processes: token shards record it and refuse to be read with another one.

This module knows nothing about files of text or shards; it turns strings into ids and back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from fastserve.errors import DataError
from fastserve.utils.io import atomic_write_json, atomic_write_text

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2 in a trained tokenizer
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# One turn = bos + role + "\n" + content + eos; the model learns eos as "end of text", which is
# also what ends every document in pretraining, so generation stops at eos in both settings.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- bos_token + message['role'] + '\\n' + message['content'] + eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- bos_token + 'assistant\\n' -}}{%- endif -%}"
)

# Names other tokenizer families use, tried in order when a tokenizer.json comes without config.
_GUESSES = {
    "bos": (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"),
    "eos": (EOS_TOKEN, "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
    "pad": (PAD_TOKEN, "<pad>", "<|padding|>"),
}
_TRAIN_BATCH_DOCS = 512  # texts per list handed to the Rust trainer (amortises the FFI calls)


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens and chat template."""

    def __init__(
        self,
        backend: _Backend,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ):
        self.backend = backend
        self.bos_token = bos_token  # token strings, or None when the tokenizer has no such token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.model_max_length = model_max_length  # written to tokenizer_config.json when known
        for kind, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if tok is not None and backend.token_to_id(tok) is None:
                raise DataError(f"the {kind} token {tok!r} is not in the tokenizer's vocabulary.")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE of `vocab_size` entries (fewer if the text runs out of pairs)."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise DataError(
                f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least "
                f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)."
            )
        backend = _Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(_batched(texts, _TRAIN_BATCH_DOCS), trainer)
        return cls(backend, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file, or a directory holding one (ours or an HF model dir)."""
        path = Path(path).expanduser()
        if path.is_dir():
            folder, file = path, path / "tokenizer.json"
        else:
            folder, file = path.parent, path
        if not file.is_file():
            if path.is_dir() and (path / "tokenizer.model").is_file():
                raise DataError(
                    f"{path} has only a sentencepiece tokenizer.model; a tokenizer.json is needed."
                )
            raise DataError(f"no tokenizer.json at {path}.")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:
            raise DataError(f"{file} is not a valid tokenizer.json ({e}).") from None
        config = cls._read_json(folder / "tokenizer_config.json")
        special_map = cls._read_json(folder / "special_tokens_map.json")
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        tokens: dict[str, str | None] = {}
        for kind in ("bos", "eos", "pad"):
            key = f"{kind}_token"
            if key in config:  # an explicit null in the config means "has none"
                tokens[kind] = _token_content(config[key])
            elif key in special_map:
                tokens[kind] = _token_content(special_map[key])
            else:
                tokens[kind] = next((g for g in _GUESSES[kind] if g in added), None)
        template = config.get("chat_template")
        jinja_file = folder / "chat_template.jinja"  # where newer transformers save it
        if not isinstance(template, str) and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        max_len = config.get("model_max_length")
        return cls(
            backend,
            bos_token=tokens["bos"],
            eos_token=tokens["eos"],
            pad_token=tokens["pad"],
            chat_template=template if isinstance(template, str) else None,
            model_max_length=max_len if isinstance(max_len, int) and max_len < 2**40 else None,
        )

    @staticmethod
    def _read_json(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}).") from None
        return obj if isinstance(obj, dict) else {}

    # ---- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 hex of tokenizer.json with sorted keys and no whitespace.

        Computed from the `tokenizers` serialisation, so a different `tokenizers` version that
        serialises extra fields would give a different fingerprint for the same vocabulary.
        """
        obj = json.loads(self.backend.to_str())
        canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    @cached_property
    def _text_only_backend(self) -> _Backend:
        # A copy that reads "<|eos|>" written in a document as plain text, not as the eos token.
        backend = _Backend.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens spelled out in `text` map to their ids (as in HF)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise DataError("this tokenizer has no bos token, so add_bos=True is not possible.")
            ids.insert(0, self.bos_token_id)
        return ids

    def encode_batch(
        self, texts: list[str], split_special_tokens: bool = False, parallel: bool = True
    ) -> list[list[int]]:
        """`encode` of each text; `parallel` uses the Rust thread pool (all cores), else one core.

        `split_special_tokens=True` encodes special-token strings inside the texts as ordinary text
        (what corpus encoding wants: a document may mention "<|eos|>" without ending there).
        """
        backend = self._text_only_backend if split_special_tokens else self.backend
        if not parallel:
            return [backend.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render `messages` ([{"role", "content"}]) with the chat template, as HF does."""
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise DataError(
                "chat templates need the `jinja2` package (pip install jinja2)."
            ) from None

        def raise_exception(message: str) -> None:
            raise DataError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
        )
        return self.encode(text) if tokenize else text

    # ---- save ---------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "tokenizer.json", self.backend.to_str(pretty=True))
        special = {
            f"{kind}_token": tok
            for kind, tok in (
                ("bos", self.bos_token),
                ("eos", self.eos_token),
                ("pad", self.pad_token),
            )
        }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        atomic_write_json(path / "tokenizer_config.json", config)
        atomic_write_json(
            path / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None}
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r}, fingerprint={self.fingerprint[:12]})"
        )
