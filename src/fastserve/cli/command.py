"""`Command`: one subcommand's name, help texts, flag definitions and handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line in `fastserve --help`
    description: str  # the top of `fastserve NAME --help`
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int] | None  # None: a nested subcommand sets it

    def register(self, subparsers) -> argparse.ArgumentParser:
        p = subparsers.add_parser(self.name, help=self.help, description=self.description)
        self.add_args(p)
        if self.run is not None:
            p.set_defaults(func=self.run)
        return p
