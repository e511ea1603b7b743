"""Data-parallel training under torchrun (issue 16), on the CPU with gloo and 2 processes.

- 3 steps of a mixed graph in float64, eager and fused, with --sync-bn: 2 processes equal 1 process at the
  same global batch to 1e-10 (weights, BatchNorm buffers, momentum), also with ignore_index rows spread
  unevenly; a BatchNorm-free net without --sync-bn too; BatchNorm nets without it differ (the check bites).
- In float32 with --sync-bn, 2 processes are no farther from the float64 answer of the same run than 1 process.
- Sharded evaluation of an odd-sized set: every image once, the same accuracies.
- A rank killed mid-epoch: torchrun stops the run naming the rank; rerunning resumes, with 2 processes
  to the very weights of an uninterrupted run, with 1 to float32 summation order.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktg_fast.data.plan import make_epoch_plan, shard_bounds, shard_plan

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"]


def env() -> dict:
    # One thread per rank (torchrun's default too): two ranks share this machine's cores.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


# --------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("batch, world", [(16, 2), (15, 2), (10, 3)])
def test_shards_of_a_training_plan_make_up_the_global_batches(batch, world):
    plan = make_epoch_plan(100, batch, train=True, seed=3, epoch=2, augment=True)
    shards = [shard_plan(plan, r, world, train=True) for r in range(world)]
    for k in range(plan.num_batches):
        s, e = plan.bounds(k)
        parts = [sh.order[slice(*sh.bounds(k))] for sh in shards]
        assert torch.equal(torch.cat(parts), plan.order[s:e])
        assert torch.equal(torch.cat([sh.offsets[slice(*sh.bounds(k))] for sh in shards]), plan.offsets[s:e])
        assert torch.equal(torch.cat([sh.flips[slice(*sh.bounds(k))] for sh in shards]), plan.flips[s:e])
    assert all(sh.num_batches == plan.num_batches for sh in shards)
    assert sum(sh.batch_size for sh in shards) == batch


def test_shards_of_an_evaluation_plan_count_every_sample_once():
    plan = make_epoch_plan(37, 8, train=False, seed=0, epoch=0, augment=False)
    shards = [shard_plan(plan, r, 3, train=False) for r in range(3)]
    assert torch.equal(torch.cat([sh.order for sh in shards]), torch.arange(37))
    assert [shard_bounds(37, r, 3) for r in range(3)] == [(0, 12), (12, 24), (24, 37)]


# --------------------------------------------------------------------------- exactness
@pytest.fixture(scope="module")
def float64_runs(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    r1 = run([sys.executable, str(REPO / "tests" / "dist_check.py"), str(one)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run([*TORCHRUN, "2", str(REPO / "tests" / "dist_check.py"), str(two)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    return one, two


def _max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for na, nb in zip(a["nets"], b["nets"]):
        assert na.keys() == nb.keys()
        worst = max([worst] + [(na[k].double() - nb[k].double()).abs().max().item() for k in na])
    for ma, mb in zip(a["momentum"], b["momentum"]):
        if ma is not None:
            worst = max([worst] + [(ma[k] - mb[k]).abs().max().item() for k in ma])
    return worst


@pytest.mark.parametrize("case", ["eager-sync", "fused-sync", "eager-ignore", "fused-ignore", "eager-plain",
                                  "fused-plain"])
def test_two_processes_equal_one_in_float64(float64_runs, case):
    one, two = float64_runs
    a, b = (torch.load(d / f"{case}.pt", weights_only=True) for d in (one, two))
    assert a["nets"][0]["conv1.weight" if "plain" not in case else "conv.weight"].dtype == torch.float64
    assert _max_diff(a, b) < 1e-10


def test_without_sync_bn_batchnorm_nets_differ(float64_runs):
    """The check above can fail: per-rank BatchNorm statistics give another update."""
    one, two = float64_runs
    a, b = (torch.load(d / "fused-nosync.pt", weights_only=True) for d in (one, two))
    assert _max_diff(a, b) > 1e-6


def test_float32_sync_bn_is_as_close_to_the_exact_run_as_one_process(float64_runs):
    """In float32, 2 processes with --sync-bn drift from 1 process (reduction order differs, training amplifies
    it: measured 2e-7 after 1 step, 3e-4 after 3), but no more than 1 process drifts from the exact (float64)
    answer of the same run: the drift is float32 rounding, not the data-parallel step."""
    one, two = float64_runs
    exact, a, b = (torch.load(p, weights_only=True) for p in (one / "fused-sync32-exact.pt", one / "fused-sync32.pt",
                                                                 two / "fused-sync32.pt"))
    assert a["nets"][0]["conv1.weight"].dtype == torch.float32
    assert exact["nets"][0]["conv1.weight"].dtype == torch.float64

    def rel(x: dict, y: dict) -> float:
        return max(((p.double() - q.double()).abs().max() / q.double().abs().max().clamp(min=1e-12)).item()
                   for nx, ny in zip(x["nets"], y["nets"]) for k, (p, q) in ((k, (nx[k], ny[k])) for k in nx)
                   if q.is_floating_point())

    one_err, two_err = rel(a, exact), rel(b, exact)
    assert one_err > 1e-6, "float32 and float64 gave the same weights: the comparison cannot bite"
    assert two_err <= 2 * one_err, (two_err, one_err)


def test_sharded_evaluation_counts_every_image_once(float64_runs):
    one, two = float64_runs
    a, b = (torch.load(d / "eval.pt", weights_only=True) for d in (one, two))
    assert a["count"] == b["count"] == 37
    assert a["acc"] == pytest.approx(b["acc"], abs=1e-12)


# --------------------------------------------------------------------------- a rank dies
# On the CPU everywhere (gloo): a GPU machine's single GPU cannot hold two ranks' cuda:<LOCAL_RANK>.
TRAIN = ["--graph", "dml", "--model", "resnet8", "--dataset", "synthetic", "--epochs", "3", "--train-subset", "128",
         "--eval-subset", "37", "--batch-size", "16", "--no-progress", "--device", "cpu"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {f"{p.name}/{k}": v for p in sorted((out / "nodes").glob("*.pt"))
            for k, v in torch.load(p, weights_only=True)["state_dict"].items()}


def test_killed_rank_stops_the_run_and_a_rerun_resumes(tmp_path):
    killed = tmp_path / "killed"
    # Rank 1 is SIGKILLed at its 12th step (epoch 2 of 3, 8 steps an epoch).
    r = subprocess.run([*TORCHRUN, "2", str(REPO / "tests" / "sigkill_at_step.py"), "12", "ktg_fast.train", *TRAIN,
                        "--sync-bn", "--out", str(killed)], env={**env(), "KTG_KILL_RANK": "1"},
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in r.stderr and "SIGKILL" in r.stderr, r.stderr[-3000:]
    ckpt = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not (killed / "final.json").exists()
    again = tmp_path / "again"
    shutil.copytree(killed, again)
    uninterrupted = tmp_path / "whole"
    r = run([*TORCHRUN, "2", "-m", "ktg_fast.train", *TRAIN, "--sync-bn", "--out", str(uninterrupted)])
    assert r.returncode == 0, r.stderr[-3000:]
    # Resumed with 2 processes: the very weights of the uninterrupted run.
    r = run([*TORCHRUN, "2", "-m", "ktg_fast.train", *TRAIN, "--sync-bn", "--out", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    whole = _weights(uninterrupted)
    two = _weights(killed)
    assert whole.keys() == two.keys()
    for k in whole:
        torch.testing.assert_close(two[k], whole[k], rtol=0, atol=1e-6, msg=k)
    # Resumed with 1 process: the same up to float32 summation order (the float64 test shows the math is exact).
    r = run([sys.executable, "-m", "ktg_fast.train", *TRAIN, "--out", str(again), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "normalised BatchNorm" not in r.stderr  # --sync-bn's BatchNorm is one process's
    one = _weights(again)
    for k in whole:
        torch.testing.assert_close(one[k].double(), whole[k].double(), rtol=1e-3, atol=1e-3, msg=k)
    records = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in records] == [1, 2, 3]
    assert json.loads((killed / "final.json").read_text())["processes"] == 2


def test_batch_smaller_than_the_processes_is_refused(tmp_path):
    r = run([*TORCHRUN, "2", "-m", "ktg_fast.train", *TRAIN, "--batch-size", "1", "--out", str(tmp_path / "b")])
    assert r.returncode != 0 and "raise --batch-size to at least 2" in r.stderr
    assert r.stderr.count("error:") == 1  # rank 0 alone says it
    assert not (tmp_path / "b").exists()  # refused: nothing left behind


def test_errors_every_process_meets_are_said_once(tmp_path):
    """An unknown flag (every process parses it) and rank 0's refusal of an --out holding a run (re-raised on
    every rank) were printed by every process; rank 0 alone says them now."""
    r = run([*TORCHRUN, "2", "-m", "ktg_fast.train", *TRAIN, "--bogus", "--out", str(tmp_path / "a")])
    assert r.returncode != 0 and r.stderr.count("error: unrecognized arguments: --bogus") == 1, r.stderr[-3000:]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "checkpoint.pt").write_bytes(b"")
    r = run([*TORCHRUN, "2", "-m", "ktg_fast.train", *TRAIN, "--out", str(busy)])
    assert r.returncode != 0 and r.stderr.count("already holds a run: pass --resume") == 1, r.stderr[-3000:]
    # An input error every rank meets alike (a FileNotFoundError of our own, no errno): said by rank 0 alone.
    r = run([*TORCHRUN, "2", "-m", "ktg_fast.train", *TRAIN, "--graph", "kd", "--teacher", "resnet8", "--teachers",
             str(tmp_path / "none"), "--out", str(tmp_path / "kd")])
    assert r.returncode != 0 and r.stderr.count("error: no pre-trained resnet8") == 1, r.stderr[-3000:]


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_the_step_fallback_under_torchrun_is_said_by_rank_0_only(monkeypatch, caplog, rank, said):
    from ktg_fast.distributed import distributed_step_kind

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    with caplog.at_level("WARNING", logger="ktg_fast"):
        assert distributed_step_kind("compiled") == "fused" and distributed_step_kind("eager") == "eager"
    assert ("--step compiled runs in one process only" in caplog.text) == said


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_0_creates_the_out_folder(tmp_path, monkeypatch, rank):
    """Each rank deciding on its own whether it created --out raced: rank 1 made the folder, rank 0 then saw it
    existing and, refused, left it behind.  Rank 0 alone creates it; any rank still checks what is there."""
    from ktg_fast.cli_common import check_out_dir, is_launcher_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    main = is_launcher_main()
    assert main == (rank == "0")
    out = check_out_dir(tmp_path / "new", create=main)
    assert out.is_dir() == main
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "study.db").write_text("")
    with pytest.raises(ValueError, match="holds a graph search"):
        check_out_dir(tmp_path / "search", create=main)


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_a_batch_torchrun_cannot_split_is_refused_before_anything_is_made(tmp_path, command):
    """Checked from torchrun's WORLD_SIZE before --out is created or data loaded (no process group needed)."""
    args = (["--model", "resnet8", "--teachers", str(tmp_path / "t")] if command == "pretrain"
            else ["--graph", "dml", "--model", "resnet8"])
    r = subprocess.run([sys.executable, "-m", f"ktg_fast.{command}", *args, "--dataset", "synthetic",
                        "--batch-size", "2", "--out", str(tmp_path / "b")], capture_output=True, text=True,
                       env={**env(), "WORLD_SIZE": "3", "RANK": "0"}, timeout=120, cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "the global batch of 2 cannot be split over 3 processes: raise --batch-size to at least 3" in r.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "t").exists()


def test_resuming_with_another_batchnorm_scope_says_so(tmp_path):
    """Without --sync-bn each process normalises its own slice: a 1-process resume warns that this changes."""
    out = tmp_path / "nosync"
    args = ["--graph", "dml", "--model", "resnet8", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "32",
            "--eval-subset", "16", "--batch-size", "16", "--no-progress", "--device", "cpu", "--out", str(out)]
    r = run([*TORCHRUN, "2", "-m", "ktg_fast.train", *args])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("seed 0: test_acc") == 1  # printed by rank 0 alone
    r = run([sys.executable, "-m", "ktg_fast.train", *args, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "normalised BatchNorm over each of 2 processes' own slice (no --sync-bn), this run over the global" \
        in r.stderr


def test_pretrain_under_torchrun_writes_the_teacher_once(tmp_path):
    r = run([*TORCHRUN, "2", "-m", "ktg_fast.pretrain", "--model", "resnet8", "--dataset", "synthetic", "--epochs", "1",
             "--train-subset", "32", "--eval-subset", "16", "--batch-size", "16", "--no-progress", "--sync-bn",
             "--device", "cpu",
             "--teachers", str(tmp_path / "teachers")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("written to") == 1
    (teacher,) = (tmp_path / "teachers").rglob("resnet8.pt")
    assert torch.load(teacher, weights_only=True)["model"] == "resnet8"
