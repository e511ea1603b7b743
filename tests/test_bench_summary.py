"""bench/summary.py: the one-screen summary of bench/gpu.sh from JUnit files and result JSON."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_summary_reads_counts_and_ratios(tmp_path):
    (tmp_path / "machine.log").write_text("== machine\ntorch 2.11.0 cuda 13.0 triton 3.6.0 device NVIDIA H200\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/></testsuites>')
    rows = [{"kind": "paper", "M": 2, "B": 64, "C": 100, "impl": "loop", "median_ms": 5.0},
            {"kind": "paper", "M": 2, "B": 64, "C": 100, "impl": "compiled", "median_ms": 0.5},
            {"kind": "paper", "M": 2, "B": 64, "C": 100, "impl": "triton", "median_ms": 0.1},
            {"kind": "llm", "M": 2, "B": 8192, "C": 32000, "impl": "triton", "median_ms": 1.0,
             "traffic_bytes": 4e9, "grad_bytes": 2e9, "peak_extra_bytes": 2.4e9},
            {"kind": "llm", "M": 4, "B": 8192, "C": 128256, "impl": "triton", "status": "OOM"}]
    (tmp_path / "graph_loss-1.json").write_text(json.dumps({"rows": rows, "extra": {"copy_bandwidth": 5e12}}))
    steps = [{"graph": "b", "variant": "authors", "s_per_step": 0.12}, {"graph": "b", "variant": "graph",
             "s_per_step": 0.01, "step_kind": "graph"},
             {"graph": "a", "variant": "eager", "s_per_step": 0.02}, {"graph": "a", "variant": "graph",
             "s_per_step": 0.01, "step_kind": "fused"}]
    paired = [{"graph": "a", "fast": "graph", "base": "eager", "median": 3.4, "low": 2.9, "high": 3.6, "rounds": 10}]
    (tmp_path / "train_step-1.json").write_text(json.dumps({"rows": steps, "paired": paired}))
    packs = [{"K": 4, "impl": "blocks", "median_ms": 0.2}, {"K": 4, "impl": "ranges", "median_ms": 0.3},
             {"K": 8, "impl": "blocks", "median_ms": 0.5}, {"K": 8, "impl": "ranges", "median_ms": 0.4},
             {"K": 8, "impl": "single", "status": "> 16"}]
    (tmp_path / "pack_loss-1.json").write_text(json.dumps({"rows": packs}))
    r = subprocess.run([sys.executable, str(REPO / "bench" / "summary.py"), str(tmp_path)], capture_output=True,
                       text=True, check=True)
    out = r.stdout
    assert "device NVIDIA H200" in out
    assert "tests    7 passed, 1 failed, 0 errors, 2 skipped" in out
    assert "loss     not run" in out
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ") and "target" in line}
    assert "50x" in lines["paper shapes: per-edge loop / kernel (worst)"] and "met" in lines[
        "paper shapes: per-edge loop / kernel (worst)"]
    assert "5x" in lines["paper shapes: compiled reference / kernel (worst)"]
    # 4e9 bytes at 5e12 B/s = 0.8 ms floor; 1.0 ms measured -> 1.25x (target 1.3x: met)
    assert "1.25x" in lines["LLM shapes: kernel / memory-traffic floor (worst)"]
    assert "1.2x" in lines["LLM shapes: extra memory / gradient (worst)"] and "NOT met" in lines[
        "LLM shapes: extra memory / gradient (worst)"]
    assert "12x" in lines["graph b: CUDA-graph step / authors' step"]
    # graph a's pair was timed in alternation: its paired median (3.4x) is judged, not the table's 2x
    assert "3.4x" in lines["graph a: CUDA-graph step / eager step"] and "NOT met" not in lines[
        "graph a: CUDA-graph step / eager step"]
    assert "loaders: no result file" in out and "search: no result file" in out
    assert "pack loss, 4 trials: ranges/blocks 1.50x (one block launch is faster)" in out
    assert "pack loss, 8 trials: ranges/blocks 0.80x (launches per range is faster)" in out


def test_search_lines_judge_two_hours_with_and_without_the_set_up(tmp_path):
    """Issue 15's target (1,500 trials in 2 h) on the best row, and again counting each trial's step set-up."""
    rows = [{"pack": 1, "workers": 1, "trials_per_hour": 600.0, "hours_for_1500": 2.5, "setup_s": [20.0],
             "hours_for_1500_with_setup": 10.8},
            {"pack": 4, "workers": 1, "trials_per_hour": 1000.0, "hours_for_1500": 1.5, "setup_s": [30.0],
             "hours_for_1500_with_setup": 14.0}]
    (tmp_path / "search_trials_per_hour_cuda.json").write_text(json.dumps({"rows": rows}))
    out = subprocess.run([sys.executable, str(REPO / "bench" / "summary.py"), str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    best = next(line for line in out.splitlines() if "1,500 trials (best row)" in line)
    assert "1.5 h" in best and "target 2 h: met" in best and "pack 4, 1 worker(s)" in best
    setup = next(line for line in out.splitlines() if "set-up per trial" in line)
    assert "10.8 h" in setup and "NOT met" in setup and "pack 1" in setup and "set-up 20.0 s" in setup


def test_a_phase_stopped_at_its_cap_is_counted_from_its_log(tmp_path):
    """No JUnit file when the time cap stops pytest: the verbose log's per-test lines are counted, and the
    failed tests are named (from the JUnit file when there is one)."""
    (tmp_path / "kernels.log").write_text(
        "[gw0] [ 10%] PASSED tests/test_kernel.py::test_a[1] \n"
        "tests/test_kernel.py::test_b PASSED                                      [ 20%]\n"
        "[gw1] [ 30%] FAILED tests/test_kernel.py::test_c \n"
        "[gw1] [ 40%] SKIPPED tests/test_kernel.py::test_d \n"
        "FAILED tests/test_kernel.py::test_c - AssertionError: off by one\n"
        "KeyboardInterrupt\n")
    (tmp_path / "gpu.xml").write_text(
        '<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_pack" name="test_gpu_pack"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_pack" name="test_ok"/></testsuite></testsuites>')
    out = subprocess.run([sys.executable, str(REPO / "bench" / "summary.py"), str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    assert "kernels  2 passed, 1 failed, 0 errors, 1 skipped (stopped before its end: counted from the log)" in out
    assert "failed: tests/test_kernel.py::test_c" in out
    assert "gpu      1 passed, 1 failed, 0 errors, 0 skipped\n" in out
    assert "failed: tests.test_pack::test_gpu_pack" in out
    assert "step     not run" in out
