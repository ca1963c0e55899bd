"""The rich consoles every stage prints through: `console` (stdout) and `err_console` (stderr).

Read once here so that colour, width and quiet mode are decided in one place.
"""

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # errors stay one line
