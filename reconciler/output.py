"""How every weft command prints its result: `--output json` for pipelines, text for people."""
from __future__ import annotations

import json
import sys


def emit(output: str, data: dict, text: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=1, sort_keys=True))
    else:
        sys.stdout.write(text)
