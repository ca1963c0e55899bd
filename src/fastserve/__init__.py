"""FastServe: raw text -> tokenizer -> trained model -> compressed model -> fast serving -> eval."""

__version__ = "0.1.0"
