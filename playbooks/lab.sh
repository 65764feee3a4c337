#!/usr/bin/env bash
# The README's main command: set up, then run weft on the built-in example in a throwaway lab.
set -euo pipefail
cd "$(dirname "$0")/.."
./playbooks/setup.sh
exec .venv/bin/weft lab "$@"
