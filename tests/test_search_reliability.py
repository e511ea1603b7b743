"""Search and export when things go wrong (issue 11): copied folders, empty or damaged study files, two
searches started at once, failed trials and teachers, seeded samplers, foreign --out folders, messages,
plots and a graphviz that fails."""
import io
import json
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from ktg_fast.search import cli
from ktg_fast.search.config import SearchConfig, load_config
from ktg_fast.search.ledger import ATTR_FAIL, ATTR_REJECTED, Ledger
from ktg_fast.search.space import SearchError

from test_search_parallel import postgres_url  # noqa: F401  (a throwaway PostgreSQL server, or skip)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--nodes", "2", "--target", "resnet8", "--models", "resnet8", "--dataset", "synthetic", "--epochs", "1",
        "--train-subset", "64", "--eval-subset", "64", "--cpu-threads", "1", "--heartbeat", "2", "--poll", "0.5",
        "--no-progress"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny search of 3 trials (copy it before changing it)."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("base") / "s"
    try:
        assert cli.main([*TINY, "--trials", "3", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def copy_of(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def study_of(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def folders(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "trials").iterdir())


def run_subprocess(args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ktg_fast.search", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ------------------------------------------------------------------ item 1
def test_copied_or_renamed_folder_resumes_its_study(finished, tmp_path, keep_threads):
    saved = json.loads((finished / "search.json").read_text())
    assert saved["study"] == "s"  # the study name is saved with the settings
    before = folders(finished)
    copy = copy_of(finished, tmp_path / "copy")
    assert cli.main(["--out", str(copy), "--trials", "4", "--no-progress"]) == 0
    assert not any(".old-" in n for n in folders(copy))  # nothing moved aside, nothing re-trained
    study = study_of(copy, "s")
    assert Ledger(study.trials, 4).done == 4 and set(before) < set(folders(copy))
    assert optuna.get_all_study_names(f"sqlite:///{copy / 'study.db'}") == ["s"]
    # A folder written before the name was saved (search.json without it) resumes the only study it holds.
    legacy = copy_of(finished, tmp_path / "legacy")
    d = json.loads((legacy / "search.json").read_text())
    d.pop("study")
    (legacy / "search.json").write_text(json.dumps(d))
    assert cli.main(["--out", str(legacy), "--no-progress"]) == 0
    assert not any(".old-" in n for n in folders(legacy))
    assert json.loads((legacy / "search.json").read_text())["study"] == "s"
    assert cli.main(["export", "--out", str(legacy)]) == 0


# ------------------------------------------------------------- items 2, 9
def test_empty_study_file_never_starts_a_new_study_over_trial_folders(finished, tmp_path, keep_threads):
    out = copy_of(finished, tmp_path / "e")
    before = folders(out)
    (out / "study.db").write_bytes(b"")
    with pytest.raises(SearchError, match=r"holds 3 trial folders .*empty \(0 bytes\).*Nothing was changed.*to start "
                                          r"over deliberately, move .*trials"):
        cli.main(["--out", str(out), "--no-progress"])
    assert folders(out) == before and (out / "study.db").stat().st_size == 0
    with pytest.raises(SearchError, match=r"study.db is empty \(0 bytes\): it holds no study to export"):
        cli.main(["export", "--out", str(out)])
    assert (out / "study.db").stat().st_size == 0  # untouched
    # A study file holding tables but not this study: refused too.
    (out / "study.db").unlink()
    optuna.create_study(study_name="other", storage=f"sqlite:///{out / 'study.db'}")
    with pytest.raises(SearchError, match="holds no study 's'"):
        cli.main(["--out", str(out), "--no-progress"])
    assert folders(out) == before


def test_damaged_study_file_is_one_clear_error_for_search_and_export(finished, tmp_path, keep_threads):
    out = copy_of(finished, tmp_path / "d")
    with open(out / "study.db", "r+b") as f:
        f.truncate(8192)
    match = r"the study file .*study.db is damaged \(SQLite: .*\): restore it from a backup"
    with pytest.raises(SearchError, match=match):
        cli.main(["--out", str(out), "--no-progress"])
    with pytest.raises(SearchError, match=match):
        cli.main(["export", "--out", str(out)])
    r = run_subprocess(["export", "--out", str(out)])
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "is damaged" in r.stderr


# ----------------------------------------------------------------- item 11
RACE = """
import sys, time
from ktg_fast.search.config import SearchConfig
from ktg_fast.search.study import create_or_join
out, storage, start = sys.argv[1], sys.argv[2] or None, float(sys.argv[3])
cfg = SearchConfig(out=out, dataset="synthetic", nodes=2, target="resnet8", models=["resnet8"], trials=2,
                   storage=storage, study="race")
while time.time() < start:
    time.sleep(0.001)
study, created = create_or_join(cfg, trials_given=True)
print("created" if created else "joined")
"""


def fresh_postgres_database(url: str) -> str:
    """A new, empty database on the server of ``url`` (no tables yet: the creation race is real)."""
    import uuid

    import sqlalchemy as sa

    from ktg_fast.search.storage_url import normalise_url

    name = f"race_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return sa.engine.make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_searches_started_at_the_same_instant_create_the_storage_once(tmp_path, backend, request):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for rep in range(2):
        out = tmp_path / f"o{rep}"
        storage = "" if backend == "sqlite" else fresh_postgres_database(request.getfixturevalue("postgres_url"))
        start = time.time() + 8  # after every process has imported torch and optuna
        procs = [subprocess.Popen([sys.executable, "-c", RACE, str(out), storage, str(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in range(5)]
        results = [p.communicate(timeout=120) for p in procs]
        for p, (so, se) in zip(procs, results):
            assert p.returncode == 0, se
            assert "Traceback" not in se and "cannot reach" not in se
        assert sorted(so.strip() for so, _ in results) == ["created"] + ["joined"] * 4
        if backend == "sqlite":
            assert sorted(os.listdir(out)) == ["study.db"]  # no lock file left behind


# ------------------------------------------------------------------ item 13
def test_failure_reason_is_said_once_and_an_all_failed_search_warns(tmp_path, keep_threads, monkeypatch, capsys):
    from ktg_fast import trainer as trainer_mod
    from ktg_fast.trainer import NonFiniteLossError

    def diverge(self, resume=False):
        raise NonFiniteLossError(f"non-finite loss at step 3 (epoch 1) in node 2 (resnet8): lower the learning "
                                 f"rate or check the data; the last good checkpoint is {self.out / 'checkpoint.pt'}")

    monkeypatch.setattr(trainer_mod.Trainer, "run", diverge)
    out = tmp_path / "f"
    # --pack 1: the patched lone trainer (a pack trains with PackTrainer; --pack auto may pick it).
    assert cli.main([*TINY, "--trials", "2", "--pack", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: every trial failed (2 x non-finite loss at step 3 (epoch 1) in node 2 (resnet8))" in err
    reasons = [t.user_attrs[ATTR_FAIL] for t in study_of(out, "f").trials if ATTR_FAIL in t.user_attrs]
    assert len(reasons) == 2
    for r in reasons:
        assert r.count("non-finite loss") == 1 and "node 2 (resnet8)" in r
        assert "checkpoint" not in r  # the named checkpoint does not exist


@pytest.mark.parametrize("pack", ["1", "2"])
def test_a_real_divergence_fails_alone_and_in_a_pack_with_one_reason(tmp_path, keep_threads, capsys, pack):
    # A learning rate of 1e30 diverges within a few steps: the lone trainer and the pack word it alike
    # (step within the trial, epoch, nodes, their rates), so the all-failed warning counts one reason.
    out = tmp_path / "d"
    args = [*TINY, "--train-subset", "128", "--batch-size", "16", "--lr", "1e30", "--trials", "2",
            "--pack", pack, "--out", str(out)]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    reasons = [t.user_attrs[ATTR_FAIL] for t in study_of(out, "d").trials if ATTR_FAIL in t.user_attrs]
    assert len(reasons) == 2, err
    pattern = (r"non-finite loss at step [1-8] \(epoch 1\) in node [12] \(resnet8\)(, node 2 \(resnet8\))?: "
               r"lower the learning rate \(node [12]'s is 1e\+30(, node 2's is 1e\+30)?; --lr 1e\+30\) "
               r"or check the data")
    for r in reasons:
        assert re.match(pattern, r), r
    assert "warning: every trial failed (" in err
    assert all(f"x {r.split(':')[0]}" in err for r in reasons), err  # the warning gives the first clause


# ----------------------------------------------------------------- item 13b
def test_teacher_pretraining_failure_is_the_teachers_not_the_graphs(tmp_path, keep_threads, monkeypatch):
    from ktg_fast import teachers as pretrain
    from ktg_fast.trainer import NonFiniteLossError

    calls = []

    def diverge(model, data, cfg, *, teacher_dir=None, **kw):
        calls.append(model)
        raise NonFiniteLossError(f"non-finite loss at step 3 (epoch 1) in node 1 ({model}): lower the learning "
                                 f"rate (now 10.0) or check the data; the last good checkpoint is "
                                 f"{teacher_dir}/nowhere/checkpoint.pt")

    monkeypatch.setattr(pretrain, "pretrain_teacher", diverge)
    out = tmp_path / "t"
    args = [*TINY, "--models", "wrn10_1", "--gates", "cutoff", "through", "--trials", "10", "--out", str(out)]  # 10 of 12 graphs: some freeze node 2
    with pytest.raises(SearchError) as err:
        cli.main(args)
    msg = str(err.value)
    assert "pre-training teacher wrn10_1 (frozen node 2 of this graph) failed: non-finite loss at step 3 (epoch 1)" \
        in msg
    assert "node 1" not in msg and "nowhere" not in msg  # the teacher's own run's numbering, a missing file
    [marker] = list((out / "teachers").rglob("wrn10_1.pt.failed.json"))
    assert str(marker) in msg and calls == ["wrn10_1"]
    # A rerun does not pre-train the same teacher again, and no graph was charged for it.
    with pytest.raises(SearchError, match="pre-training teacher wrn10_1 .* failed"):
        cli.main(["--out", str(out), "--no-progress"])
    assert calls == ["wrn10_1"]
    study = study_of(out, "t")
    teacher = [t for t in study.trials if str(t.user_attrs.get(ATTR_REJECTED, "")).startswith("teacher:")]
    assert len(teacher) == 2 and not any(ATTR_FAIL in t.user_attrs for t in study.trials)
    book = Ledger(study.trials, 10)
    assert book.counts["failed"] == 0 and book.rejected.get("teacher") == 2
    assert not list(out.rglob("*.lock"))


HOOK = """
import os
from ktg_fast import teachers as pretrain
from ktg_fast.trainer import NonFiniteLossError


def diverge(model, data, cfg, **kw):
    with open(os.environ["KTG_TEST_CALLS"], "a") as f:
        f.write(model + "\\n")
    raise NonFiniteLossError(f"non-finite loss at step 2 (epoch 1) in node 1 ({model}): lower the learning rate")


pretrain.pretrain_teacher = diverge
"""


def test_a_teacher_pretrained_by_another_command_now_stops_the_search_with_what_to_do(tmp_path, keep_threads,
                                                                                       monkeypatch):
    """`python -m ktg_fast.pretrain` holds the teacher's run folder: the search says so, charges no graph."""
    from ktg_fast import teachers as pretrain
    from ktg_fast.locks import folder_lock
    from ktg_fast.nodes import teacher_path

    real = pretrain.pretrain_teacher

    def busy(model, data, cfg, *, teacher_dir=None, **kw):
        run_dir = teacher_path(teacher_dir, data.dataset, model, data.val_size).with_suffix(".run")
        run_dir.mkdir(parents=True, exist_ok=True)
        with folder_lock(run_dir):  # as the other command would (another open file: the flock conflicts)
            return real(model, data, cfg, teacher_dir=teacher_dir, **kw)

    monkeypatch.setattr(pretrain, "pretrain_teacher", busy)
    out = tmp_path / "busy"
    with pytest.raises(SearchError, match=r"teacher wrn10_1 \(frozen node 2 of this graph\) is being pre-trained by "
                                          r"another command: another pre-training of teacher wrn10_1 is writing to "
                                          r".*wrn10_1\.run \(process \d+\).*Start the search again when"):
        cli.main([*TINY, "--models", "wrn10_1", "--gates", "cutoff", "through", "--trials", "10", "--out", str(out)])
    study = study_of(out, "busy")
    assert not any(ATTR_FAIL in t.user_attrs for t in study.trials)
    assert not list((out / "teachers").rglob("*.failed.json"))  # not recorded as the teacher's failure


def test_teacher_failure_stops_every_worker_once(tmp_path, keep_threads, monkeypatch):
    """With --workers 2 the teacher is tried once and the search stops with the teacher's error."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)  # the worker processes pre-train with `diverge`
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{REPO}")
    monkeypatch.setenv("KTG_TEST_CALLS", str(calls))
    out = tmp_path / "w"
    with pytest.raises(SearchError, match=r"^trial \d+: pre-training teacher wrn10_1 \(frozen node 2 of this graph\) failed: "
                                          r"non-finite loss at step 2 \(epoch 1\): lower the learning rate\. The search .*"
                                          r"to try this teacher again as it is, delete .*wrn10_1.pt.failed.json$"):
        cli.main([*TINY, "--models", "wrn10_1", "--gates", "cutoff", "through", "--trials", "10", "--workers", "2",
                  "--out", str(out)])
    assert calls.read_text().split() == ["wrn10_1"]
    study = study_of(out, "w")
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]  # every worker stopped and gave back
    assert not any(ATTR_FAIL in t.user_attrs for t in study.trials)


# ----------------------------------------------------------------- item 16
def test_sampler_is_seeded_per_worker_and_recorded(tmp_path, keep_threads):
    def drawn(out):
        study = study_of(out, out.name)
        return [json.dumps(t.params, sort_keys=True) for t in study.trials]

    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert cli.main([*TINY, "--trials", "3", "--seed", "5", "--out", str(out)]) == 0
    assert drawn(a) == drawn(b)  # same flags, same graphs
    cfg = load_config(a)
    assert cfg.sampler_seeds == [cfg.sampler_seed(0)]
    assert len({cfg.sampler_seed(k) for k in range(4)}) == 4  # distinct per worker
    other = SearchConfig(**{**cfg.to_dict(), "seed": 6})
    assert other.sampler_seed(0) != cfg.sampler_seed(0)


# ----------------------------------------------------------------- item 17
def test_export_prints_a_concrete_retrain_command(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path / "x")
    assert cli.main(["export", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "<dataset>" not in text and "--seeds 0 1 2 3 4 for mean" in text
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("python -m ktg_fast.train"))
    argv = shlex.split(line)
    assert argv[argv.index("--dataset") + 1] == "synthetic" and argv[argv.index("--epochs") + 1] == "1"
    assert argv[argv.index("--train-subset") + 1] == "64" and argv[argv.index("--graph") + 1] == \
        str(out / "best" / "graph.yaml")
    from ktg_fast import train

    assert train.main([*argv[3:], "--no-progress"]) == 0  # the command runs as printed
    assert (Path(argv[argv.index("--out") + 1]) / "final.json").is_file()


# ----------------------------------------------------------------- item 19
def test_out_holding_another_kind_of_output_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.jsonl", "final.json", "graph.yaml"):
        (run / name).write_text("{}\n")
    with pytest.raises(SearchError, match=r"--out .*run already holds a training run .*final.json, graph.yaml, "
                                          r"metrics.jsonl.*use another --out"):
        cli.main([*TINY, "--out", str(run)])
    assert sorted(os.listdir(run)) == ["final.json", "graph.yaml", "metrics.jsonl"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SearchError, match="already holds files that are not a search's: notes.txt"):
        cli.main([*TINY, "--out", str(other)])
    with pytest.raises(SearchError, match="is a file"):
        cli.main([*TINY, "--out", str(other / "notes.txt")])


# ----------------------------------------------------------------- item 20
def test_messages_new_best_plurals_and_nothing_left_behind(tmp_path, keep_threads, capsys, caplog):
    caplog.set_level(logging.INFO, logger="ktg_fast.search")
    out = tmp_path / "m"
    assert cli.main([*TINY, "--trials", "1", "--gates", "cutoff", "through", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 trial of up to 1 epoch; 1 worker here" in err and "search complete: 1 trial;" in err
    msgs = caplog.messages
    done = next(i for i, m in enumerate(msgs) if " complete: target val" in m)
    assert "after 1 epoch (" in msgs[done]
    assert msgs[done + 1].startswith(f"new best: trial {msgs[done].split()[1]}")  # the first one, at once
    assert not any("it would be frozen" in m for m in msgs)
    assert not list(out.glob("*.lock")) and not list(out.rglob("*.lock"))

    from ktg_fast.graph import Graph, Node
    from ktg_fast.search.trial_files import describe_graph

    g = Graph([Node("resnet8"), Node("resnet8")], [["cutoff", "through", "through"], ["cutoff"] * 3,
                                                   ["cutoff", "through", "cutoff"]])
    assert describe_graph(g).endswith("; 3 edges")
    g1 = Graph([Node("resnet8")], [["cutoff", "through"], ["cutoff", "cutoff"]])
    assert describe_graph(g1).endswith("; 1 edge")


def test_progress_announces_the_first_best_and_writes_no_escape_codes():
    from ktg_fast.search.progress import Progress

    study = optuna.create_study(direction="maximize")
    stream = io.StringIO()
    prog = Progress(study, lambda: 3, stream=stream, min_interval_s=0)
    prog.poll()  # nothing yet
    t = study.ask()
    t.set_user_attr("graph_key", "a")
    study.tell(t, 50.0)
    prog.poll()
    assert "new best: trial 0, target val 50.00%" in stream.getvalue()
    assert "\x1b" not in stream.getvalue()


# ----------------------------------------------------------------- item 21
def test_plots_mark_the_best_trials(finished):
    from ktg_fast.search.export import _row, history_figure, intermediate_figure

    study = study_of(finished, "s")
    book = Ledger(study.trials, 3)
    rows = [_row(t, book) for t in book.trials]
    # one extra pruned trial after the best, to see the best-so-far line run to the last trial
    rows.append({**rows[-1], "number": 99, "state": "PRUNED", "value": None, "last_val_acc": 1.0,
                 "intermediate": {1: 1.0}})
    best = book.best()
    ax = history_figure(rows).axes[0]
    step = next(ln for ln in ax.get_lines() if ln.get_label() == "best so far")
    assert step.get_xdata()[-1] == 99 and step.get_ydata()[-1] == best.value
    assert any(a.get_text() == f"trial {best.number}: {best.value:.1f} %" for a in ax.texts)

    ax = intermediate_figure(rows, rungs=[1]).axes[0]
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0] == f"trial {best.number}: {best.value:.1f} %" and "rung (pruning decision)" in labels
    assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # outside the axes, right
    rung = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    pruned_marks = [ln for ln in ax.get_lines() if ln.get_marker() == "x" and ln.get_label().startswith("_")]
    assert rung and pruned_marks and min(m.get_zorder() for m in pruned_marks) > max(r.get_zorder() for r in rung)
    assert "running / failed" not in labels  # no such trial: the legend names only what is drawn
    states = {r["state"] for r in rows}
    assert ("pruned (x: where)" in labels) == ("PRUNED" in states)
    running = {**rows[-1], "number": 100, "state": "RUNNING", "value": None, "intermediate": {1: 2.0}}
    labels = [t.get_text() for t in intermediate_figure(rows + [running], rungs=[]).axes[0].get_legend().get_texts()]
    assert "running / failed" in labels and "rung (pruning decision)" not in labels


def test_graph_drawing_says_what_the_node_figure_is(tmp_path):
    from ktg_fast.graph import preset

    g = preset("dml", nodes=2, model="resnet8")
    g.draw(tmp_path / "g", accuracies=[73.91, 12.0])
    dot = (tmp_path / "g.dot").read_text()
    assert 'label="1: resnet8\\nval 73.9 %"' in dot and 'label="2: resnet8\\nval 12.0 %"' in dot
    for wrong in ([73.9], [73.9, 12.0, 5.0]):  # one value per network node, or a clear error
        with pytest.raises(ValueError, match=rf"accuracies must hold one value per network node \(2\), got {len(wrong)}"):
            g.draw(tmp_path / "h", accuracies=wrong)


# ----------------------------------------------------------------- item 25
def fake_dot(folder: Path, script: str) -> str:
    folder.mkdir(exist_ok=True)
    exe = folder / "dot"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_export_finishes_when_graphviz_fails_or_is_missing(finished, tmp_path, monkeypatch, capsys):
    out = copy_of(finished, tmp_path / "g")
    monkeypatch.setenv("PATH", fake_dot(tmp_path / "bin", 'echo \'Format: "png" not recognized.\' >&2; exit 1\n'))
    assert cli.main(["export", "--out", str(out), "--top", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: graph PNGs skipped") == 1
    assert "failed (exit code 1: Format: \"png\" not recognized.)" in err
    assert (out / "best" / "graph.yaml").is_file() and (out / "best" / "graph.dot").is_file()
    assert not list(out.rglob("graph.png")) and not list(out.rglob("*.tmp"))
    # graphviz absent: said once, with how to get the drawings
    for p in (out / "best", out / "top"):
        shutil.rmtree(p)
    empty = tmp_path / "nobin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert cli.main(["export", "--out", str(out), "--top", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("graph PNGs skipped: graphviz's `dot` is not installed") == 1 and "apt-get install graphviz" in err
    assert (out / "best" / "graph.yaml").is_file()


@pytest.mark.parametrize("pack, signal_name", [("1", "INT"), ("2", "INT"), ("2", "TERM")])
def test_ctrl_c_marks_the_running_trial_interrupted_and_a_rerun_finishes(tmp_path, pack, signal_name):
    """Ctrl-C during a trial (alone or packed): its trial.json says INTERRUPTED (not RUNNING), the study fails
    it and queues its retry; running the search again finishes the study with exact counts."""
    from test_search_parallel import check_books

    out = tmp_path / "int"
    args = [*TINY, "--epochs", "2", "--trials", "3", "--step", "eager", "--device", "cpu", "--batch-size", "16",
            "--pack", pack, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KTG_KILL_SIGNAL": signal_name}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "sigkill_at_step.py"), "6", "ktg_fast.search", *args],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == {"INT": 130, "TERM": 143}[signal_name] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert ("stopped by SIGTERM;" if signal_name == "TERM" else "interrupted;") in r.stderr
    assert "run the same command again" in r.stderr  # the search has no --resume flag
    states = {p.parent.name: json.loads(p.read_text())["state"] for p in (out / "trials").glob("*/trial.json")}
    assert "INTERRUPTED" in states.values() and "RUNNING" not in states.values(), states
    study = study_of(out, "int")
    assert any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))  # the queued retry
    r = run_subprocess(args, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    check_books(study_of(out, "int"), 3)
    # trials.md says what trial.json says: stopped, not a dead worker's LOST
    assert cli.main(["export", "--out", str(out)]) == 0
    table = (out / "trials.md").read_text()
    assert re.search(r"\| INTERRUPTED \|.*stopped \(Ctrl-C or SIGTERM\); re-queued", table) and "| LOST |" not in table


def test_a_rerun_after_a_kill_says_what_it_waits_for_and_marks_the_lost_trial(tmp_path):
    """SIGKILL leaves the study's only trial RUNNING with a dead heartbeat: the rerun says at once what it waits
    for (up to --grace seconds, not a silent wait), then fails the trial, marks its folder LOST and re-runs it."""
    from test_search_parallel import check_books

    out = tmp_path / "lost"
    args = [*TINY, "--epochs", "2", "--trials", "1", "--step", "eager", "--device", "cpu", "--batch-size", "16",
            "--pack", "1", "--grace", "6", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "sigkill_at_step.py"), "6", "ktg_fast.search", *args],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == -9, r.stderr[-2000:]
    (victim,) = [t for t in study_of(out, "lost").get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    r = run_subprocess(args, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    # Said at the start (the kill's trial is RUNNING then), not found out after a silent wait.
    assert f"the study holds 1 running trial ({victim.number}): other workers', or a killed run's" in r.stderr
    assert "no heartbeat for 6 s (--grace)" in r.stderr, r.stderr
    assert f"trial {victim.number} lost its worker (no heartbeat for 6 s): re-queued" in r.stderr
    lost = json.loads((out / "trials" / f"{victim.number:05d}" / "trial.json").read_text())
    assert lost["state"] == "LOST" and "no heartbeat for 6 s" in lost["fail_reason"]
    check_books(study_of(out, "lost"), 1)
