#!/usr/bin/env bash
# Verify a GPU machine in one command: install ktg_fast (torch untouched), run the test suite on the
# GPU, then the benchmarks at the paper's sizes, and end with a one-screen summary.
#
#   bash bench/gpu.sh OUTDIR [tests|loss|step|loaders|search|refill|packloss|all ...]     (default: all)
#
# Works offline: Optuna, SQLAlchemy (and their dependencies) are installed from wheels in .whl/ beside
# the tree when present (bash bench/wheels.sh makes them on a machine with PyPI); without them the
# search tests and the search benchmark are skipped and say so.  Writes OUTDIR/<phase>.log,
# OUTDIR/<phase>.xml (JUnit), OUTDIR/*.json (every figure and ratio, with the device name, torch and
# Triton versions and the date) and OUTDIR/summary.txt.  Each phase is capped (no phase over 5
# minutes; `all` about 9 minutes on an H200): KTG_GPU_PHASE_LIMIT_S overrides the caps (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu.sh OUTDIR [tests|loss|step|loaders|search|refill|packloss|all ...]}
shift || true
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(all)
[ "${phases[0]}" = all ] && phases=(tests loss step loaders search refill packloss)
mkdir -p "$out"
out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 KTG_BENCH_QUICK=1 KTG_BENCH_RESULTS="$out" KTG_BENCH_WINDOW_S=${KTG_BENCH_WINDOW_S:-8}

declare -A cap=([tests]=250 [loss]=140 [step]=110 [loaders]=60 [search]=140 [refill]=45 [packloss]=45)
for p in "${phases[@]}"; do
  [ -n "${cap[$p]:-}" ] || { echo "gpu.sh: unknown phase '$p' (tests, loss, step, loaders, search, refill, packloss, all)" >&2; exit 2; }
done

{
  echo "== machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | head -3
  $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
  "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")'
} 2>&1 | tee "$out/machine.log"

# Install without touching torch: no dependencies from an index, the carried wheels only.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl 2>&1 | tail -3 | tee -a "$out/machine.log"
fi
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3 | tee -a "$out/machine.log"
$PY -c 'import ktg_fast.kernels' || { echo "gpu.sh: ktg_fast did not install" | tee -a "$out/machine.log"; exit 1; }
$PY -c 'import optuna' 2>/dev/null && search_ok=1 || search_ok=0
[ $search_ok = 1 ] || echo "optuna is missing (no .whl/ wheels): search tests and the search benchmark are skipped" \
  | tee -a "$out/machine.log"
xdist=()
# The CPU-bound tests share 16 cores; whole files per worker, so torchrun tests (one default port) never overlap.
$PY -c 'import xdist' 2>/dev/null && xdist=(-n 6 --dist loadfile)

run_phase() {
  local name=$1; shift
  local limit=${KTG_GPU_PHASE_LIMIT_S:-${cap[$name]}}
  echo "== $name (at most ${limit}s)"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$PY" -m pytest -p no:cacheprovider -q -rfEs \
    --junitxml="$out/$name.xml" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0))s" | tee -a "$out/phases.log"
  tail -3 "$out/$name.log"
}

for p in "${phases[@]}"; do
  case $p in
    tests) run_phase tests tests "${xdist[@]}" --timeout 240 ;;
    loss) run_phase loss bench/test_bench_loss.py --benchmark-only ;;
    step) run_phase step bench/test_bench_step.py --benchmark-only ;;
    loaders) run_phase loaders bench/test_bench_loaders.py --benchmark-only ;;
    search)
      if [ $search_ok = 1 ]; then
        run_phase search bench/test_bench_search.py --benchmark-only -s
      else
        echo "search: skipped (no optuna)" | tee -a "$out/phases.log"
      fi ;;
    refill) run_phase refill bench/test_bench_refill.py --benchmark-only -s ;;
    packloss) run_phase packloss bench/test_bench_pack_loss.py --benchmark-only ;;
  esac
done
$PY bench/summary.py "$out" | tee "$out/summary.txt"
