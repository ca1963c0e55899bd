"""User-facing errors.

Every error a user can cause (a bad path, an empty corpus, a wrong config, a broken checkpoint) is a
`FastServeError` whose message is one clear sentence. The CLI prints it and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class FastServeError(Exception):
    """A user-facing error: the message is one clear sentence."""


class ConfigError(FastServeError):
    """A bad model or run configuration, preset, override, or an unsupported architecture."""


class DataError(FastServeError):
    """Missing inputs, an empty corpus, bad shards, or a tokenizer that does not match."""


class CheckpointError(FastServeError):
    """A model directory or training checkpoint that cannot be loaded as asked."""
