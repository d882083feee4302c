#!/usr/bin/env bash
# The whole test suite (unit tests on tiny models, integration tests on the packaged real ones).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
