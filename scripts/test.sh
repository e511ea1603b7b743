#!/usr/bin/env bash
# The test suite on CPU (GPU-only tests skip themselves); exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
python -m pytest tests -q -p no:cacheprovider "$@"
