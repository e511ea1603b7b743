#!/usr/bin/env bash
# The test suite on CPU (GPU-only tests skip themselves); exits non-zero on any failure.
# Two pytest workers (KTG_TEST_WORKERS=N to change, 0 for one process): most slow tests wait on subprocesses
# (searches, torchrun, kills), so two share two cores well.  Whole files go to one worker (--dist loadfile), so
# the torchrun tests, which share torchrun's default port, never run at once.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
workers=${KTG_TEST_WORKERS:-2}
par=()
if [ "$workers" != 0 ] && python -c 'import xdist' 2>/dev/null; then
  par=(-n "$workers" --dist loadfile)
fi
python -m pytest tests -q -p no:cacheprovider ${par[@]+"${par[@]}"} "$@"
