"""Search command line: a real search end to end (prune at the rungs, export, retrain) and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from ktg_fast.graph import Graph
from ktg_fast.search import cli
from ktg_fast.search.budget import rungs
from ktg_fast.search.config import SearchConfig
from ktg_fast.search.ledger import ATTR_REJECTED
from ktg_fast.search.space import SearchError
from ktg_fast.search.study import create_or_join
from ktg_fast.search.trial_files import trial_dir

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "fashion-mnist", "--train-subset", "128", "--eval-subset", "200", "--cpu-threads", "1",
        "--heartbeat", "2", "--poll", "0.5", "--no-progress"]


def expected_states(trials, epochs):
    """Replay Optuna's successive-halving rule on a sequential search: (state, last epoch) per trial."""
    out, seen = {}, []
    for t in trials:
        iv = t.intermediate_values
        state, last = "COMPLETE", epochs
        for k, r in enumerate(rungs(epochs)):
            competing = sorted([p[r] for p in seen if r in p] + [iv[r]])
            idx = max(len(competing) // 2 - 1, 0)
            if not iv[r] >= competing[-(idx + 1)]:
                state, last = "PRUNED", r
                break
        out[t.number] = (state, last)
        seen.append({r: iv[r] for r in rungs(epochs) if r <= last})
    return out


def test_real_search_prunes_at_rungs_exports_and_retrains(tmp_path, keep_threads):
    out = tmp_path / "s"
    args = ["--nodes", "2", "--target", "resnet8", "--models", "resnet8", "wrn10_1", "--trials", "10",
            "--epochs", "4", "--out", str(out), *TINY]
    assert cli.main(args) == 0

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'study.db'}")
    trained = [t for t in study.trials if ATTR_REJECTED not in t.user_attrs]
    assert len(trained) == 10 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trained)
    # Pruning happened exactly where the successive-halving rule says (rungs at epochs 1 and 2 of 4).
    expect = expected_states(trained, 4)
    got = {t.number: (t.state.name, max(t.intermediate_values)) for t in trained}
    assert got == expect
    assert any(s == "PRUNED" for s, _ in got.values()) and any(s == "COMPLETE" for s, _ in got.values())
    keys = [t.user_attrs["graph_key"] for t in trained]
    assert len(set(keys)) == len(keys)

    for t in trained:
        folder = Path(t.user_attrs["dir"])
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == sorted(t.intermediate_values)
        assert [m["val_acc"][0] for m in metrics] == [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        assert not any("test_acc" in m for m in metrics)  # the search never evaluates on the test set
        info = json.loads((folder / "trial.json").read_text())
        assert info["state"] == t.state.name and info["seed"] == t.number  # --seed 0 + trial number
        assert Graph.load(folder / "graph.yaml").to_dict() == t.user_attrs["graph"]
        assert list((folder / "nodes").glob("node1_resnet8.pt")) and not (folder / "checkpoint.pt").exists()

    # Export.
    assert cli.main(["export", "--out", str(out), "--top", "3"]) == 0
    best = max((t for t in trained if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
    g = Graph.load(out / "best" / "graph.yaml")
    assert g.to_dict() == best.user_attrs["graph"]
    assert "#c00000" in (out / "best" / "graph.dot").read_text()  # target drawn red
    best_json = json.loads((out / "best" / "trial.json").read_text())  # as every trial.json: the lone-run command
    assert best_json["number"] == best.number
    assert best_json["replay"] == json.loads((trial_dir(out, best.number) / "trial.json").read_text())["replay"]
    assert best_json["replay"].startswith("python -m ktg_fast.train ")
    for png in ("history.png", "intermediate.png", "best/graph.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    table = (out / "trials.md").read_text()
    assert "**10/10 trials finished**" in table
    for t in trained:
        assert f"\n| {t.number} | {t.state.name} |" in table
    exported = json.loads((out / "trials.json").read_text())
    assert exported["summary"]["done"] == 10
    rejected = sorted(t.number for t in study.trials if ATTR_REJECTED in t.user_attrs)
    assert sorted(r["number"] for r in exported["trials"] if r["state"] == "REJECTED") == rejected
    assert ("each rejected graph leaves a gap" in table) == bool(rejected)  # the numbers the table skips
    tops = sorted((out / "top").iterdir())
    assert tops[0].name == f"1-trial{best.number}" and len(tops) <= 3

    # optuna-dashboard serves the same storage: the study and every trial (rejected ones included).
    status, body = dashboard_get(f"sqlite:///{out / 'study.db'}", "/api/studies")
    summaries = json.loads(body)["study_summaries"]
    assert status.startswith("200") and [s["study_name"] for s in summaries] == ["s"]
    status, body = dashboard_get(f"sqlite:///{out / 'study.db'}", f"/api/studies/{summaries[0]['study_id']}")
    assert len(json.loads(body)["trials"]) == len(study.trials)

    # Retrain the best graph with the training command (its teachers: the search's, same split).
    from ktg_fast import train

    assert train.main(["--graph", str(out / "best" / "graph.yaml"), "--dataset", "fashion-mnist", "--epochs", "1",
                       "--train-subset", "128", "--eval-subset", "200", "--val-size", "10000", "--teachers",
                       str(out / "teachers"), "--out", str(tmp_path / "retrain"), "--no-progress"]) == 0
    final = json.loads((tmp_path / "retrain" / "final.json").read_text())
    assert final["graph"] == g.to_dict() and len(final["test_acc"]) == 2

    # Running the finished search again does nothing new; raising --trials continues it.
    assert cli.main(["--out", str(out), "--no-progress"]) == 0
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'study.db'}").trials) == len(study.trials)


def dashboard_get(storage_url, path):
    """GET ``path`` from optuna-dashboard's WSGI app over ``storage_url`` (no server, no socket)."""
    import io

    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    app = optuna_dashboard.wsgi(optuna.storages.RDBStorage(storage_url))
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "localhost",
           "SERVER_PORT": "80", "wsgi.input": io.BytesIO(b""), "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO()}
    status = []
    body = b"".join(app(env, lambda s, headers, exc_info=None: status.append(s)))
    return status[0], body


def run_cli_subprocess(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ktg_fast.search", *args], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


@pytest.mark.parametrize("args,match", [
    (["--models", "resnet33"], "unknown model 'resnet33' in --models"),
    (["--target", "resnet8", "--models", "resnet8", "--gates", "through", "sometimes"],
     "unknown gate 'sometimes' in --gates"),
    (["--nodes", "1"], "--nodes must be at least 2"),
    (["--target", "resnet8", "--models", "resnet8", "--storage", "postgresql://nobody@127.0.0.1:9/nodb"],
     "cannot reach storage postgresql://nobody@127.0.0.1:9/nodb"),
    (["--target", "resnet8", "--models", "resnet8", "--no-pretrain", "--teachers", "NOWHERE"],
     "--no-pretrain is set but .* teachers are missing"),
    (["--target", "resnet8", "--models", "resnet8", "--trials", "1000", "--nodes", "2"], "only 240 distinct"),
])
def test_bad_input_is_a_clear_error(tmp_path, args, match):
    with pytest.raises(SearchError, match=match):
        cli.main(["--out", str(tmp_path / "x"), "--dataset", "fashion-mnist", *args])
    assert not (tmp_path / "x" / "study.db").exists()


def test_study_of_another_search_space_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = SearchConfig(out=str(tmp_path / "a"), dataset="fashion-mnist", nodes=3, target="resnet8",
                         models=["resnet8"], storage=url, study="s", trials=5)
    # (the default budget, 1500, exceeds this small space: joining without --trials keeps the study's 5)
    create_or_join(first, trials_given=True)
    with pytest.raises(SearchError, match=r"study 's' in sqlite:.* was created with other settings .*nodes: 3 vs 2"):
        cli.main(["--out", str(tmp_path / "b"), "--dataset", "fashion-mnist", "--nodes", "2", "--target", "resnet8",
                  "--models", "resnet8", "--storage", url, "--study", "s", "--trials", "5"])
    # Same settings join; the study keeps the budget unless --trials is given.
    same = SearchConfig(**{**first.to_dict(), "out": str(tmp_path / "c"), "trials": 1500})
    study, created = create_or_join(same, trials_given=False)
    assert not created and same.trials == 5 and study.user_attrs["ktg_trials"] == 5


def test_rerun_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "r"
    SearchConfig(out=str(out), dataset="fashion-mnist", nodes=2, target="resnet8", models=["resnet8"]).save()
    with pytest.raises(SearchError, match=r"holds a search with other settings \(saved vs this command: epochs: 200 "
                                          r"vs 7\)\. Drop"):  # (not also teacher_epochs, which follows --epochs)
        cli.resolve_config(cli.build_parser().parse_args(["--out", str(out), "--epochs", "7"]))
    with pytest.raises(SearchError, match=r"epochs: 200 vs 7; teacher_epochs: 200 vs 3"):
        cli.resolve_config(cli.build_parser().parse_args(["--out", str(out), "--epochs", "7", "--teacher-epochs",
                                                          "3"]))
    cfg, given = cli.resolve_config(cli.build_parser().parse_args(["--out", str(out), "--trials", "9",
                                                                   "--workers", "2"]))
    assert (cfg.nodes, cfg.trials, cfg.workers, given) == (2, 9, 2, True)


def test_errors_print_one_line_without_traceback(tmp_path):
    r = run_cli_subprocess(["--out", str(tmp_path / "x"), "--dataset", "fashion-mnist", "--gates", "maybe"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: unknown gate 'maybe' in --gates; known gates: cutoff, through")
    r = run_cli_subprocess(["export", "--out", str(tmp_path / "none")])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "none does not exist: give the folder a search wrote" \
        in r.stderr


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path, keep_threads, monkeypatch):
    """NaN and out-of-memory fail their trial (counted, with the reason); an error that is not the graph's
    fault stops the worker with a clear message, gives the trial back, and a rerun finishes the study."""
    from ktg_fast import trainer as trainer_mod
    from ktg_fast.trainer import NonFiniteLossError

    real_run = trainer_mod.Trainer.run
    calls = []

    def flaky_run(self, resume=False):
        calls.append(self.out.name)
        if len(calls) == 1:
            raise NonFiniteLossError("non-finite loss at step 3 (epoch 1) in node 1 (resnet8)")
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_run(self, resume)

    monkeypatch.setattr(trainer_mod.Trainer, "run", flaky_run)
    out = tmp_path / "f"
    args = ["--nodes", "2", "--target", "resnet8", "--models", "resnet8", "--trials", "4", "--epochs", "1",
            "--sampler", "tpe", "--pack", "1", "--out", str(out), *TINY]  # --pack 1: the patched Trainer trains
    with pytest.raises(SearchError, match="stopped by an error that is not the graph's fault.*disk on fire"):
        cli.main(args)
    assert cli.main(["--out", str(out), "--no-progress"]) == 0  # the rerun finishes the study

    study = optuna.load_study(study_name="f", storage=f"sqlite:///{out / 'study.db'}")
    by_reason = {t.number: t.user_attrs.get("fail_reason") or t.user_attrs.get(ATTR_REJECTED, "")
                 for t in study.trials}
    failed = [t for t in study.trials if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason")]
    assert len(failed) == 2
    assert any(r.startswith("non-finite loss") for r in by_reason.values())
    assert any(r.startswith("out of memory") for r in by_reason.values())
    aborted = [t for t in study.trials if str(t.user_attrs.get(ATTR_REJECTED, "")).startswith("aborted")]
    assert len(aborted) == 1 and "disk on fire" in (Path(aborted[0].user_attrs.get("dir", out / "trials" /
                                                     f"{aborted[0].number:05d}")) / "error.txt").read_text()
    from ktg_fast.search.ledger import Ledger

    book = Ledger(study.trials, 4)
    assert book.complete and book.counts["failed"] == 2 and book.counts["complete"] == 2
    table = (cli.main(["export", "--out", str(out)]), (out / "trials.md").read_text())[1]
    assert "non-finite loss" in table and "out of memory" in table


def test_a_trial_weighs_compiling_against_its_expected_epochs(tmp_path, keep_threads, monkeypatch):
    """A lone trial tells its trainer the epochs ASHA lets a trial train on average (budget.py), not the
    budget: compiling must pay for those."""
    from ktg_fast import trainer as trainer_mod

    seen, real_init = [], trainer_mod.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append((self.expected_epochs, self.cfg.epochs))

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", init)
    out = tmp_path / "e"
    args = ["--nodes", "2", "--target", "resnet8", "--models", "resnet8", "--trials", "1", "--epochs", "8",
            "--pack", "1", "--out", str(out), *TINY]
    assert cli.main(args) == 0
    assert seen == [(pytest.approx(SearchConfig(out=str(out), epochs=8).expected_epochs_per_trial()), 8)]
    assert seen[0][0] == pytest.approx(2.5)  # rungs 1, 2, 4: 1/2 + 2/4 + 4/8 + 8/8 epochs


def test_the_retrain_estimate_says_when_the_trial_shared_the_machine():
    from ktg_fast.search.cli import _retrain_note

    alone = _retrain_note({"trial": 3, "time_s": 9.0, "packed": False}, False)
    assert alone.startswith(" (about 9 s, as long as trial 3 took; --seeds 0 1 2 3 4")
    assert "as long as trial 3 took in a pack: alone, less;" in _retrain_note({"trial": 3, "time_s": 9.0,
                                                                               "packed": True}, False)
    assert "took beside other workers: alone, less;" in _retrain_note({"trial": 3, "time_s": 9.0}, True)
    assert _retrain_note({"trial": 3, "time_s": None}, True) == " (--seeds 0 1 2 3 4 for mean +- std takes 5x as long)"
