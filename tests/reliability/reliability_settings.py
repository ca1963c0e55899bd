"""Settings shared by the reliability suite (tests/reliability/): `from reliability_settings import
scale, report` (a uniquely named module: conftest imports are ambiguous across dirs).

CI runs the light settings as part of `make test`; `make test-reliability` sets
FASTSERVE_RELIABILITY=heavy for longer soaks, more aborted streams, more fuzz cases and more
crash rounds. Every test reports its figures with `report(name, **figures)`: one line on the
terminal (shown with -s or in the summary) and, when FASTSERVE_RELIABILITY_REPORT names a file,
one JSON line appended there (what docs/benchmarks.md quotes).
"""

from __future__ import annotations

import json
import os
import sys

HEAVY = os.environ.get("FASTSERVE_RELIABILITY", "").lower() == "heavy"


def scale(light, heavy):
    """The light (CI) or the heavy (`make test-reliability`) value of a setting."""
    return heavy if HEAVY else light


def report(name: str, **figures) -> None:
    line = {"test": name, "heavy": HEAVY, **figures}
    print(f"\n[reliability] {json.dumps(line)}", file=sys.stderr)
    path = os.environ.get("FASTSERVE_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
