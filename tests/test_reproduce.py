"""``python -m ktg_fast.reproduce``: the plan, the table against the paper's figures, errors, a dry run, and a tiny
real reproduction killed, resumed and run again."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")  # the searches need it (as tests/test_search_*.py)

from ktg_fast.graph import preset  # noqa: E402
from ktg_fast.reproduce import paper  # noqa: E402
from ktg_fast.reproduce.__main__ import build_parser, dry_run_text, main, settings_from_args  # noqa: E402
from ktg_fast.reproduce.plan import build_plan  # noqa: E402
from ktg_fast.reproduce.probe import Probe, Speed  # noqa: E402
from ktg_fast.reproduce.runner import ReproduceError, Runner  # noqa: E402
from ktg_fast.reproduce.table import collect, render, write_results  # noqa: E402

TINY = ["--dataset", "synthetic", "--models", "resnet8", "resnet14", "wrn10_1", "--nodes", "2", "--seeds", "0",
        "--epochs", "1", "--trials", "2", "--no-progress"]
ACC_ONE_SEED = r"\d+\.\d\d"  # one seed: no std, as train's results.md


def settings(*argv: str):
    parser = build_parser()
    return settings_from_args(parser, parser.parse_args(list(argv)))


@pytest.fixture
def fast_probe(monkeypatch):
    """main() without the throughput probe (seconds of training): every model takes 10 ms a step."""
    def probe(models, *, batch_size, **_):
        return Probe("cpu", "eager", "fp32", batch_size, {m: Speed(0.01, 0.001) for m in models})

    monkeypatch.setattr("ktg_fast.reproduce.__main__.probe_speeds", probe)


# ---------------------------------------------------------------------------------------------- plan
def test_plan_has_the_papers_rows_and_runs_in_order(tmp_path):
    plan = build_plan(settings("--dataset", "cifar100", "--out", str(tmp_path / "p"), "--lr", "0.05"))
    t1 = [r for r in plan.rows if r.table == 1]
    t2 = [r for r in plan.rows if r.table == 2]
    assert [r.method for r in t1] == ["ResNet32", "ResNet110", "WRN28-2"]
    assert [r.figure.mean for r in t1] == [70.71, 72.59, 74.60]
    assert [r.key for r in t2] == [r.key for r in paper.TABLE2]
    assert t2[0].run == t1[0].run == "vanilla-resnet32"  # Table 2's vanilla row is Table 1's run
    order = list(plan.runs)
    assert order.index("teacher-wrn28_2") < order.index("kd-resnet32-wrn28_2")
    for n in (2, 3, 4):
        assert order.index(f"search-{n}nodes") < order.index(f"ours-{n}nodes")
    mixed = plan.runs["dml-resnet32-wrn28_2-resnet32-resnet110"]
    assert mixed.graph_file is not None and [n.model for n in mixed.graph_file[1].nodes] == \
        ["resnet32", "wrn28_2", "resnet32", "resnet110"]
    train = plan.runs["dml-resnet32-resnet32"].commands[0]
    assert train[1:3] == ["-m", "ktg_fast.train"] and "--resume" in train
    assert train[train.index("--lr") + 1] == "0.05" and "--momentum" not in train  # only what differs
    assert train[train.index("--seeds") + 1:train.index("--seeds") + 6] == ["0", "1", "2", "3", "4"]
    search, export = plan.runs["search-3nodes"].commands
    assert search[search.index("--models") + 1:search.index("--models") + 4] == ["resnet32", "resnet110", "wrn28_2"]
    assert "--lr" in search and "--seeds" not in search and export[3:] == ["export", "--out", str(plan.runs[
        "search-3nodes"].out)]
    assert plan.runs["ours-3nodes"].commands[0][4] == str(plan.runs["search-3nodes"].out / "best" / "graph.yaml")


def test_plan_scales_down_and_shares_runs_of_coinciding_stand_ins(tmp_path):
    plan = build_plan(settings("--dataset", "fashion-mnist", "--out", str(tmp_path / "p"), "--models", "resnet8",
                               "resnet8", "resnet8", "--nodes", "2", "3"))
    keys = [r.key for r in plan.rows]
    assert "dml4" not in keys and "song" not in keys and "ours3" in keys
    dml = {r.key: r.run for r in plan.rows}
    assert dml["dml2"] == dml["dml2-mixed"] == "dml-resnet8-resnet8"  # one run fills both rows
    assert all(r.figure is None for r in plan.rows)  # the paper has no Fashion-MNIST figures
    rows = build_plan(settings("--dataset", "synthetic", "--out", str(tmp_path / "q"), "--rows", "vanilla",
                               "ours2")).rows
    assert [r.key for r in rows] == ["vanilla", "ours2"]


# --------------------------------------------------------------------------------------------- table
def _fake_run(run, accs, graph):
    """A finished train run's results.json, as python -m ktg_fast.train writes it."""
    run.out.mkdir(parents=True)
    others = [50.0] * (graph.num_nodes - 1)
    finals = [{"seed": s, "epochs": run.epochs, "graph": graph.to_dict(), "test_acc": [a, *others]}
              for s, a in zip(run.seeds, accs)]
    (run.out / "results.json").write_text(json.dumps(finals))


def test_table_puts_the_papers_figures_beside_ours(tmp_path):
    plan = build_plan(settings("--dataset", "cifar100", "--out", str(tmp_path / "p"), "--seeds", "0", "1"))
    _fake_run(plan.runs["vanilla-resnet32"], [70.0, 71.0], preset("vanilla"))
    _fake_run(plan.runs["kd-resnet32-wrn28_2"], [72.5, 72.5], preset("kd"))
    _fake_run(plan.runs["vanilla-resnet110"], [70.0], preset("vanilla"))  # one seed of two: not finished
    md = render(plan, collect(plan))
    assert "| ResNet32 (ResNet32) | 70.50 ± 0.71 | 70.71 ± 0.39 | -0.21 |" in md
    assert "| ResNet110 (ResNet110) | pending | 72.59 ± 0.54 | – |" in md
    assert "| KD (T = 2) | ResNet32 | WRN28-2* | – | – | 72.50 ± 0.00 | 71.88 ± 0.78 | +0.62 |" in md
    assert "| Vanilla | ResNet32 | – | – | – | 70.50 ± 0.71 | 70.71 ± 0.39 | -0.21 |" in md
    song = "| Song et al. | (4 × ResNet32 with shared intermediate layers) |  |  |  | not run | 73.68** ± 0.26 | – |"
    assert song in md
    assert "| ONE |" in md and "73.42** ± N/A" in md
    assert "| Ours | ResNet32 | ? | – | – | pending | 72.88 ± 0.41 | – |" in md
    assert "Paper (CIFAR-100)" in md
    assert "Test accuracy (%) of node 1, mean ± std over seeds 0, 1; 200 epochs;" in md
    # A dataset the paper did not use: the paper's columns say so.
    plan = build_plan(settings("--dataset", "synthetic", "--out", str(tmp_path / "s"), "--seeds", "0"))
    _fake_run(plan.runs["vanilla-resnet32"], [40.0], preset("vanilla"))
    md = render(plan, collect(plan))
    assert "| ResNet32 (ResNet32) | 40.00 | – | – |" in md  # one seed: no std


def test_results_md_says_what_ran_with_one_seed_a_subset_and_coinciding_stand_ins(tmp_path):
    plan = build_plan(settings("--dataset", "fashion-mnist", "--out", str(tmp_path / "p"), "--models", "resnet8",
                               "resnet8", "resnet8", "--nodes", "2", "--seeds", "0", "--epochs", "1",
                               "--trials", "1", "--train-subset", "500"))
    _fake_run(plan.runs["vanilla-resnet8"], [8.5], preset("vanilla", model="resnet8"))
    _fake_run(plan.runs["dml-resnet8-resnet8"], [9.25], preset("dml", models=["resnet8", "resnet8"]))
    md = render(plan, collect(plan))
    assert "of node 1, of seed 0 (one seed: no std); 1 epoch, the first 500 training images;" in md
    assert "1 trial on the search's validation split, their best graphs retrained from scratch on the same 500 " \
           "training images." in md
    assert "whole training set" not in md and "± 0.00" not in md and "1 epochs" not in md
    # Rows one run fills twice (the stand-ins coincide): each keeps its own row, the later ones marked as such.
    assert "| ResNet32 (ResNet8) | 8.50 | – | – |" in md and "| ResNet110 † (ResNet8) | 8.50 | – | – |" in md
    dml = [ln for ln in md.splitlines() if ln.startswith("| DML")]
    assert dml == ["| DML | ResNet8 | ResNet8 | – | – | 9.25 | – | – |",
                   "| DML † | ResNet8 | ResNet8 | – | – | 9.25 | – | – |"]
    assert md.count("† Filled by the same sub-run as an earlier row") == 2  # Tables 1 and 2
    assert "| Vanilla | ResNet8 |" in md  # Table 2's vanilla row is Table 1's run by design: not marked
    write_results(plan, chart=False)
    same = {r["key"]: r["same_as"] for r in json.loads((plan.settings.out / "results.json").read_text())["rows"]}
    assert same["dml2-mixed"] == "dml2" and same["resnet110"] == "resnet32" and same["dml2"] is None
    # The progress line names the run's rows once; the plan says why a run fills two rows.
    assert plan.row_labels("dml-resnet8-resnet8") == ["Table 2 · DML: ResNet8 + ResNet8"]
    text = dry_run_text(plan, Probe("cpu", "eager", "fp32", 64, {"resnet8": Speed(0.01, 0.001)}), lambda run: 1.0)
    assert text.count("<- dml-resnet8-resnet8 (as an earlier row: the stand-ins coincide)") == 1
    assert text.count("<- dml-resnet8-resnet8\n") == 1


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, words", [
    (["--models", "resnet8", "nosuchnet", "wrn10_1"], ["nosuchnet", "--models resnet8 resnet14 wrn10_1"]),
    (["--models", "resnet8", "resnet14"], ["three models", "got 2"]),
    (["--nodes", "2", "5"], ["--nodes", "2 3 4", "got 5"]),
    (["--rows", "dml9"], ["unknown row dml9", "ours2"]),
    (["--seeds", "1", "1"], ["repeats"]),
])
def test_bad_flags_are_refused_with_the_fix(tmp_path, argv, words, keep_logging):
    with pytest.raises(ReproduceError) as e:
        main(["--dataset", "synthetic", "--out", str(tmp_path / "o"), *argv])
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "o").exists()


def test_out_holding_something_else_is_refused(tmp_path, keep_logging):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "ktg_fast.reproduce", *TINY, "--out", str(out), "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --out") and "notes.txt" in r.stderr
    (out / "notes.txt").unlink()
    (out / "reproduce.json").write_text(json.dumps({"settings": {"dataset": "synthetic", "epochs": 3}}))
    with pytest.raises(ReproduceError, match="other settings.*epochs: 3 in the folder, 1 now"):
        main([*TINY, "--out", str(out)])


def test_a_second_reproduction_into_a_busy_folder_is_refused(tmp_path, fast_probe, keep_logging):
    from ktg_fast.locks import FolderBusyError, folder_lock
    from ktg_fast.reproduce.runner import LOCK_FILE

    out = tmp_path / "busy"
    out.mkdir()
    hold = ("import sys, time; from pathlib import Path; from ktg_fast.locks import folder_lock\n"
            f"with folder_lock(Path(sys.argv[1]), name={LOCK_FILE!r}):\n    print('held', flush=True); time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=rf"another python -m ktg_fast.reproduce is writing to {out} "
                                                  rf"\(process {holder.pid}\): wait for it to finish or stop it$"):
            main([*TINY, "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_FILE).exists()  # a killed holder's file: taken over by the next run
    with folder_lock(out, name=LOCK_FILE):
        pass


# ------------------------------------------------------------------------------------------- dry run
def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys, keep_logging):
    out = tmp_path / "dry"
    assert main([*TINY, "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "Table 2 · KD (T = 2): ResNet8 + WRN10-1*" in text and "<- kd-resnet8-wrn10_1" in text
    assert re.search(r"pending +\S.* search-2nodes +2 trials", text)
    assert "Total: 9 sub-runs" in text and "CPU-hours" in text and "Probe (eager step" in text
    assert not out.exists()  # nothing written, no run folder


def test_dry_run_without_the_dataset_says_where_it_looked_and_creates_nothing(tmp_path, capsys, fast_probe,
                                                                             keep_logging):
    out, root = tmp_path / "new" / "o", tmp_path / "no-data"
    argv = [*TINY, "--dataset", "cifar10", "--data-root", str(root), "--out", str(out)]
    assert main([*argv, "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"note: dataset 'cifar10' not found; looked in:\n  - {root}\nTo get it: " in err  # every path, the hint
    assert "--download" in err and "the estimate assumes its 50,000 training and 10,000 test images" in err
    assert "the run itself stops with this error until it is there" in err
    assert not out.exists() and not root.exists()  # a dry run creates nothing
    assert main([*argv, "--dry-run", "--download"]) == 0
    err = capsys.readouterr().err
    assert f"note: dataset 'cifar10' is not there yet (looked in {root}): the run fetches it (--download) " \
           "before its first sub-run" in err and "To get it" not in err
    # The run itself stops on the whole error, and leaves no empty --out behind.
    from ktg_fast.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="looked in:\n  - "):
        main(argv)
    assert not out.parent.exists()


def test_a_run_with_download_fetches_the_dataset_before_any_sub_run(monkeypatch):
    """A search sub-run, which may come first (--rows ours2), takes no --download: the reproduction fetches
    the dataset itself, once, before the first sub-run; a dry run never downloads."""
    from ktg_fast import data as data_mod
    from ktg_fast.data import DatasetNotFoundError
    from ktg_fast.reproduce.probe import dataset_sizes

    calls = []

    def fake_load(name, root=None, *, split="train", download=False):
        calls.append((split, download))
        if not download:
            raise DatasetNotFoundError(name, ["/nowhere"], "pass --download")
        return [0] * (50 if split == "train" else 10)

    monkeypatch.setattr(data_mod, "load_dataset", fake_load)
    sizes, note = dataset_sizes("cifar10", None, 5, download=True, fetch=True)
    assert (sizes.train, sizes.test) == (50, 10) and note == "" and calls == [("train", True), ("test", True)]
    calls.clear()
    sizes, note = dataset_sizes("cifar10", None, 5, missing_ok=True, download=True)  # the dry run
    assert calls == [("train", False)] and "the run fetches it (--download) before its first sub-run" in note


def test_the_plan_says_which_images_a_teacher_trains_on():
    from types import SimpleNamespace

    from ktg_fast.reproduce.__main__ import _what

    teacher = SimpleNamespace(kind="pretrain", epochs=2)
    assert _what(teacher, None) == "teacher: 2 epochs on the whole training set"
    assert _what(teacher, 500) == "teacher: 2 epochs on the first 500 training images (--train-subset)"


def test_reproduce_does_not_take_the_packed_trial_flags(tmp_path):
    """--data-seed and --data-offset retrain one packed search trial alone: nothing a reproduction does."""
    parser = build_parser()
    assert "--data-seed" not in parser.format_help() and "--data-offset" not in parser.format_help()
    for flag in ("--data-seed", "--data-offset"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--dataset", "synthetic", "--out", str(tmp_path), flag, "1"])
        assert e.value.code == 2
    assert settings("--dataset", "synthetic", "--out", str(tmp_path), "--lr", "0.05").recipe == ("--lr", "0.05")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sends SIGTERM to itself")
def test_sigterm_stops_a_reproduction_as_train_and_search_do(tmp_path, capsys, monkeypatch, fast_probe,
                                                            keep_logging):
    def terminated(self, run, cmd, base):  # SIGTERM while a sub-run runs
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("SIGTERM did not stop the reproduction")

    monkeypatch.setattr(Runner, "_exec", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main([*TINY, "--rows", "vanilla", "--out", str(tmp_path / "o")]) == 143
    assert capsys.readouterr().err.splitlines()[-1] == \
        "stopped by SIGTERM; run the same command again to resume (finished sub-runs are kept)"
    assert signal.getsignal(signal.SIGTERM) == before


# ------------------------------------------------------------------------------ a real reproduction
def _processes_with(text: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(p.name))
            except OSError:
                continue
    return found


def _mtimes(out: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.glob("runs/**/*")) if p.suffix in (".pt", ".jsonl",
                                                                                                   ".db")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills through /proc and PR_SET_PDEATHSIG")
def test_tiny_reproduction_killed_resumed_and_rerun(tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, "-m", "ktg_fast.reproduce", *TINY, "--rows", "vanilla", "ours2", "--out", str(out)]
    log = out.parent / "first.log"
    # 1. Killed (SIGKILL) once the search has finished and the retraining of its best graph has started.
    with open(log, "w") as f:
        first = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "start ours-2nodes" not in ((out / "commands.log").read_text() if (out / "commands.log").exists() else ""):
        assert first.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 30
    while _processes_with(str(out / "runs")):  # its sub-process went with it
        assert time.monotonic() < deadline, "a sub-run outlived the killed reproduction"
        time.sleep(0.2)
    assert (out / "runs" / "vanilla-resnet8" / "results.json").is_file()
    assert not (out / "runs" / "ours-2nodes" / "results.json").exists()
    before = _mtimes(out)

    # 2. The same command resumes: the finished runs are skipped, the killed one completes.
    lines = len((out / "commands.log").read_text().splitlines())
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    new = (out / "commands.log").read_text().splitlines()[lines:]
    assert [ln.split()[2:4] for ln in new if " start " in ln] == [["start", "ours-2nodes:"]]
    assert any("skip vanilla-resnet8" in ln for ln in new) and any("skip search-2nodes" in ln for ln in new)
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k in before and "ours-2nodes" not in k} == \
        {k: v for k, v in before.items() if "ours-2nodes" not in k}  # nothing finished was retrained

    # The table: its two rows, numeric cells, the paper's column (no figures for this dataset).
    md = (out / "results.md").read_text()
    assert r.stdout == md
    assert "| Method | Node 1 | Node 2 | Node 3 | Node 4 | Ours: accuracy (node 1) | Paper | Δ |" in md
    rows = [ln for ln in md.splitlines() if ln.startswith(("| Vanilla", "| Ours"))]
    assert [ln.split(" | ")[0] for ln in rows] == ["| Vanilla", "| Ours"]
    for ln in rows:
        cells = ln.strip("|").split(" | ")
        assert re.fullmatch(ACC_ONE_SEED, cells[5].strip()), ln
        assert cells[6].strip() == "–" and cells[7].strip() == "–", ln
        assert cells[1].strip() == "ResNet8" and cells[2].strip() != "?"
    data = json.loads((out / "results.json").read_text())["rows"]
    assert [(d["key"], d["status"]) for d in data] == [("vanilla", "done"), ("ours2", "done")]
    assert all(isinstance(d["ours"][0], float) and d["paper"] is None for d in data)
    assert (out / "results.png").stat().st_size > 0
    sh = (out / "commands.sh").read_text()
    assert "ktg_fast.search --out" in sh and "ktg_fast.search export" in sh and \
        f"--graph {out / 'runs' / 'search-2nodes' / 'best' / 'graph.yaml'}" in sh

    # 3. Run again: nothing starts, nothing is rewritten.
    lines = len((out / "commands.log").read_text().splitlines())
    done = _mtimes(out)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    new = (out / "commands.log").read_text().splitlines()[lines:]
    assert new and all(" skip " in ln for ln in new)
    assert _mtimes(out) == done
