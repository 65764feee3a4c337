#!/usr/bin/env bash
# The README's test command: set up, then run the whole suite and the lint step through tox.
set -euo pipefail
cd "$(dirname "$0")/.."
./playbooks/setup.sh
exec .venv/bin/tox "$@"
