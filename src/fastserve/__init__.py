"""FastServe: raw text -> tokenizer -> trained model -> compressed model -> fast serving -> eval.

from fastserve import LLM, SamplingParams      # the offline engine API (imported lazily)
"""

__version__ = "0.1.0"

_LAZY = {"LLM", "SamplingParams", "AsyncEngine", "LLMEngine", "EngineConfig"}


def __getattr__(name: str):
    # `import fastserve` stays light (the CLI's --help must not import torch); the engine's
    # public names load on first use.
    if name in _LAZY:
        import fastserve.engine as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'fastserve' has no attribute {name!r}")
