#!/usr/bin/env bash
# Verify a GPU machine in one command: install ktg_fast (torch untouched), run the tests that touch the GPU,
# then the benchmarks at the paper's sizes, and end with a one-screen summary.
#
#   bash bench/gpu.sh OUTDIR [gpu|kernels|loss|step|packloss|search|refill|loaders|tests|all ...]   (default: all)
#
# Phases, in the order `all` runs them (most telling first):
#   gpu       every test marked gpu (CUDA graphs, compiled and packed steps on CUDA, DALI, fp16/bf16 kernels)
#   kernels   the kernel, loss and fused linear-loss test files, whose tests run on CUDA when it is there
#   loss, step, packloss, search, refill, loaders   the benchmarks (KTG_BENCH_QUICK sizes; rows written as
#             they are measured, so a phase cut short keeps what it measured)
#   tests     every other test (CPU-side code under this machine's torch; CI covers it on the CPU)
# The device tool kills a call after 600 s: the whole run keeps to KTG_GPU_TOTAL_S (default 540 s) from its
# start.  Each phase gets its cap or what is left of the total (less 15 s for the summary), whichever is
# smaller; a phase with under 20 s left is skipped and says so.  Name the skipped phases in a second call.
# KTG_GPU_PHASE_LIMIT_S overrides every phase's cap (seconds).
#
# Works offline: Optuna, SQLAlchemy (and their dependencies) are installed from wheels in .whl/ beside
# the tree when present (bash bench/wheels.sh makes them on a machine with PyPI); without them the
# search tests and the search benchmark are skipped and say so.  Writes OUTDIR/<phase>.log,
# OUTDIR/<phase>.xml (JUnit), OUTDIR/*.json (every figure and ratio, with the device name, torch and
# Triton versions and the date) and OUTDIR/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
all=(gpu kernels loss step packloss search refill loaders tests)
out=${1:?usage: bash bench/gpu.sh OUTDIR [${all[*]}|all ...]}
shift || true
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(all)
[ "${phases[0]}" = all ] && phases=("${all[@]}")
budget=${KTG_GPU_TOTAL_S:-540}
mkdir -p "$out"
out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 KTG_BENCH_QUICK=1 KTG_BENCH_RESULTS="$out" KTG_BENCH_WINDOW_S=${KTG_BENCH_WINDOW_S:-8}

declare -A cap=([gpu]=150 [kernels]=120 [loss]=110 [step]=130 [packloss]=45 [search]=140 [refill]=60
                [loaders]=50 [tests]=300)
for p in "${phases[@]}"; do
  [ -n "${cap[$p]:-}" ] || { echo "gpu.sh: unknown phase '$p' (${all[*]}, all)" >&2; exit 2; }
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
  local left=$((budget - SECONDS - 15))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    echo "$name: skipped (${SECONDS}s of the ${budget}s budget spent; run it in another call)" | tee -a "$out/phases.log"
    return
  fi
  echo "== $name (at most ${limit}s)"
  local t0=$SECONDS
  # -v: one line per test as it ends, so a phase stopped at its cap (no JUnit file then) still says what passed.
  timeout --signal=INT --kill-after=10 "$limit" "$PY" -m pytest -p no:cacheprovider -v -rfEs \
    --junitxml="$out/$name.xml" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0))s" | tee -a "$out/phases.log"
  tail -3 "$out/$name.log"
}

kernel_files=(tests/test_kernel.py tests/test_loss.py tests/test_linear_loss.py)
kernel_xdist=()
[ ${#xdist[@]} -gt 0 ] && kernel_xdist=(-n 6 --dist load)
for p in "${phases[@]}"; do
  case $p in
    gpu) run_phase gpu tests -m gpu "${xdist[@]}" --timeout 140 ;;
    # Many small independent tests, each building its own kernels: spread test by test, not file by file.
    kernels) run_phase kernels "${kernel_files[@]}" "${kernel_xdist[@]}" --timeout 110 ;;
    loss) run_phase loss bench/test_bench_loss.py --benchmark-only ;;
    step) run_phase step bench/test_bench_step.py --benchmark-only ;;
    packloss) run_phase packloss bench/test_bench_pack_loss.py --benchmark-only ;;
    search)
      if [ $search_ok = 1 ]; then
        run_phase search bench/test_bench_search.py --benchmark-only -s
      else
        echo "search: skipped (no optuna)" | tee -a "$out/phases.log"
      fi ;;
    refill) run_phase refill bench/test_bench_refill.py --benchmark-only -s ;;
    loaders) run_phase loaders bench/test_bench_loaders.py --benchmark-only ;;
    tests) run_phase tests tests -m "not gpu" "${kernel_files[@]/#/--ignore=}" "${xdist[@]}" --timeout 240 ;;
  esac
done
$PY bench/summary.py "$out" | tee "$out/summary.txt"
