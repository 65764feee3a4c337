"""Where the state dir is: one definition for every weft command and the CNI plugin."""
from __future__ import annotations

import os

DEFAULT = "/var/lib/weft"


def default_state_dir() -> str:
    """$WEFT_STATE_DIR, else /var/lib/weft."""
    return os.environ.get("WEFT_STATE_DIR", DEFAULT)
