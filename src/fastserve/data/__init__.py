"""Data stage: raw text -> clean corpus -> BPE tokenizer -> token shards + a batch sampler.

corpus.py     read files / dirs / jsonl / builtin:stdlib / hf:NAME; clean, dedupe, split
tokenizer.py  train or load a byte-level BPE; save it in HF layout with a chat template
shards.py     encode into .bin shards + meta.json; memmap random-window sampler
prepare.py    prepare_data() (all three in one call) and format_report()
"""

from fastserve.data.corpus import Corpus, CorpusStats, Document, load_corpus
from fastserve.data.prepare import format_report, prepare_data
from fastserve.data.shards import ShardMeta, SplitMeta, TokenShards, check_tokenizer, write_shards
from fastserve.data.tokenizer import Tokenizer

__all__ = [
    "Corpus",
    "CorpusStats",
    "Document",
    "ShardMeta",
    "SplitMeta",
    "TokenShards",
    "Tokenizer",
    "check_tokenizer",
    "format_report",
    "load_corpus",
    "prepare_data",
    "write_shards",
]
