#!/usr/bin/env bash
# The main job on the built-in default: LoRA r=8 on every linear layer of MiniLM, fine-tuned on
# BBC News; prints test accuracy, trainable parameters and wall time, writes the adapter to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/leanfit tune --overwrite "$@"
