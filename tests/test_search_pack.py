"""``python -m ktg_fast.search --pack K`` (issue 15): packed trials equal their lone runs, pruning refills
slots with exact study counts, a killed packed worker loses and duplicates nothing, ``--pack auto``."""
from __future__ import annotations

import json
import logging
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from ktg_fast.graph import Graph
from ktg_fast.search import cli
from ktg_fast.search.config import SearchConfig, load_config
from ktg_fast.search.ledger import ATTR_REJECTED
from ktg_fast.search.pack_probe import describe_probe, heaviest_graph, probe_pack
from ktg_fast.trainer import Trainer

from test_search_parallel import check_books, env, load

REPO = Path(__file__).resolve().parents[1]
BASE = ["--nodes", "2", "--target", "resnet8", "--models", "resnet8", "wrn10_1", "--dataset", "synthetic",
        "--train-subset", "64", "--eval-subset", "64", "--batch-size", "16", "--cpu-threads", "1",
        "--step", "eager", "--poll", "0.5", "--no-progress", "--device", "cpu"]


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    return load(f"sqlite:///{out / 'study.db'}", out.name).get_trials(deepcopy=False)


def _node_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=False)["state_dict"] for p in sorted(folder.glob("*.pt"))}


def _lone_run(cfg: SearchConfig, t: optuna.trial.FrozenTrial, out: Path, epochs: int) -> Path:
    """The trial trained alone on its recorded batches (its whole recipe); returns the folder of every node's
    weights after epoch ``epochs`` (where a pruned trial stopped)."""
    graph = Graph.from_dict(t.user_attrs["graph"])
    recipe = cfg.train_config(int(t.user_attrs["seed"]), data_seed=int(t.user_attrs["data_seed"]),
                              data_offset=int(t.user_attrs["data_offset"]))
    box: list[Trainer] = []

    def at_epoch_end(record: dict) -> None:
        if record["epoch"] == epochs:
            for i in range(1, graph.num_nodes + 1):
                box[0].save_node(i, out / "at_epoch" / f"node{i}_{graph.nodes[i - 1].model}.pt")

    box.append(Trainer(graph, cfg.data_spec(), recipe, out, device="cpu", step="eager",
                       teacher_dir=cfg.teacher_dir(), on_epoch_end=at_epoch_end, progress=False))
    box[0].run()
    return out / "at_epoch"


def test_packed_search_equals_lone_trials_and_counts_exactly(tmp_path, keep_threads):
    """7 trials, 3 at a time, 2 epochs with a rung after epoch 1: pruned trials leave, newcomers join at
    later pack epochs; the study holds exactly 7 finished trials, and each trial's metrics and weights equal
    the same trial trained alone on its recorded batches (data_seed, data_offset) to 1e-5."""
    out = tmp_path / "pk"
    assert cli.main([*BASE, "--epochs", "2", "--trials", "7", "--pack", "3", "--heartbeat", "2",
                     "--out", str(out)]) == 0
    trials = _trials(out)
    book = check_books(optuna.load_study(study_name="pk", storage=f"sqlite:///{out / 'study.db'}"), 7)
    assert book.counts["complete"] + book.counts["pruned"] == 7
    trained = [t for t in trials if ATTR_REJECTED not in t.user_attrs]
    assert {int(t.user_attrs["data_offset"]) for t in trained} - {0}, "no trial joined a running pack"
    assert len({t.user_attrs["data_seed"] for t in trained}) == 1  # one pack, one data seed
    cfg = load_config(out)
    pruned = [t for t in trained if t.state == TrialState.PRUNED]
    complete = [t for t in trained if t.state == TrialState.COMPLETE]
    assert pruned and complete
    late = max(trained, key=lambda t: (t.state == TrialState.COMPLETE, int(t.user_attrs["data_offset"])))
    for t in {complete[0].number: complete[0], late.number: late, pruned[0].number: pruned[0]}.values():
        epochs = len(t.intermediate_values)
        alone = _lone_run(cfg, t, tmp_path / f"alone{t.number}", epochs)
        packed_dir = Path(t.user_attrs["dir"])
        pm = [json.loads(x) for x in (packed_dir / "metrics.jsonl").read_text().splitlines()]
        am = [json.loads(x) for x in (alone.parent / "metrics.jsonl").read_text().splitlines()][:epochs]
        assert [r["epoch"] for r in pm] == [r["epoch"] for r in am] == list(range(1, epochs + 1))
        for r, s in zip(pm, am):
            for key in ("val_acc", "train_acc", "train_loss"):
                assert r[key] == pytest.approx(s[key], rel=1e-5, abs=1e-5), (t.number, key)
        assert [t.intermediate_values[e] for e in sorted(t.intermediate_values)] == pytest.approx(
            [r["val_acc"][0] for r in am], abs=1e-5)
        pw, aw = _node_weights(packed_dir / "nodes"), _node_weights(alone)
        assert pw and set(pw) <= set(aw)  # a pruned trial keeps its target's weights only
        if t.state == TrialState.COMPLETE:
            assert set(pw) == set(aw)
        for name in pw:
            for k in pw[name]:
                torch.testing.assert_close(pw[name][k], aw[name][k], rtol=1e-5, atol=1e-5, msg=f"{t.number} {name} {k}")


def test_newcomers_of_the_same_kinds_take_free_places_in_place(tmp_path, keep_threads, caplog):
    """One auxiliary model and no cutoff gate: every trial has the same node kinds, so each newcomer takes
    the places a leaving trial freed, without a new step (until the tail, when half the places are free),
    and such a trial still equals its lone run on its recorded batches."""
    out = tmp_path / "same"
    base = [a if a != "wrn10_1" else "resnet8" for a in BASE]
    with caplog.at_level(logging.INFO, logger="ktg_fast"):
        assert cli.main([*base, "--gates", "through", "linear", "--epochs", "2", "--trials", "6", "--pack", "2",
                         "--heartbeat", "2", "--out", str(out)]) == 0
    said = [r.getMessage() for r in caplog.records if "joined the running pack" in r.getMessage()]
    assert len(said) == 1, said
    refills, builds = (int(w) for w in re.findall(r"(\d+) trials? joined.*built (\d+) times?", said[0])[0])
    assert refills == 4 and builds <= 2, said  # trials 2..5 joined in place; a tail compaction at most
    trials = [t for t in _trials(out) if ATTR_REJECTED not in t.user_attrs]
    late = max(trials, key=lambda t: int(t.user_attrs["data_offset"]))
    epochs = len(late.intermediate_values)
    alone = _lone_run(load_config(out), late, tmp_path / "alone", epochs)
    pw, aw = _node_weights(Path(late.user_attrs["dir"]) / "nodes"), _node_weights(alone)
    assert pw and set(pw) <= set(aw)
    for name in pw:
        for k in pw[name]:
            torch.testing.assert_close(pw[name][k], aw[name][k], rtol=1e-5, atol=1e-5, msg=f"{name} {k}")


def test_killed_packed_worker_loses_and_duplicates_nothing(tmp_path):
    """A packed worker SIGKILLed mid-epoch: a rerun fails its 3 trials after the grace period, re-runs each
    once (resuming its checkpoint alone, on its recorded batches) and finishes the study exactly; a resumed
    trial ends with the weights of an uninterrupted lone run."""
    out = tmp_path / "kill"
    url = f"sqlite:///{out / 'study.db'}"
    args = [*BASE, "--gates", "through", "linear", "correct", "--epochs", "3", "--train-subset", "256",
            "--trials", "4", "--pack", "3", "--heartbeat", "1", "--grace", "3", "--min-resource", "3",
            "--out", str(out)]
    # SIGKILL in the middle of pack epoch 2 (16 steps an epoch), from outside the library.
    r = subprocess.run([sys.executable, str(REPO / "tests" / "sigkill_at_step.py"), "24", "ktg_fast.search", *args],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    victims = [t for t in load(url, "kill").get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    assert [len(t.intermediate_values) for t in victims] == [1, 1, 1]
    before = {t.number: dict(t.intermediate_values) for t in victims}
    r = subprocess.run([sys.executable, "-m", "ktg_fast.search", *args], env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    study = load(url, "kill")
    check_books(study, 4)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for v in victims:
        dead = trials[v.number]
        assert dead.state == TrialState.FAIL
        retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == v.number
                   and ATTR_REJECTED not in t.user_attrs]
        assert len(retries) == 1, f"trial {v.number} re-run {len(retries)} times"
        retry = retries[0]
        assert retry.state == TrialState.COMPLETE and retry.params == dead.params
        for key in ("seed", "data_seed", "data_offset"):
            assert retry.user_attrs[key] == dead.user_attrs[key]
        info = json.loads((Path(retry.user_attrs["dir"]) / "trial.json").read_text())
        assert info["retry_of"] == v.number and info["resumed"] is True
        lost = json.loads((Path(dead.user_attrs["dir"]) / "trial.json").read_text())
        assert lost["state"] == "LOST" and "no heartbeat" in lost["fail_reason"]  # not left saying RUNNING
        for e, value in before[v.number].items():
            assert retry.intermediate_values[e] == pytest.approx(value)
    # One resumed trial against its uninterrupted lone run.
    retry = next(t for t in trials.values() if t.system_attrs.get("failed_trial") == victims[0].number
                 and ATTR_REJECTED not in t.user_attrs)
    alone = _lone_run(load_config(out), retry, tmp_path / "alone", 3)
    pw, aw = _node_weights(Path(retry.user_attrs["dir"]) / "nodes"), _node_weights(alone)
    assert set(pw) == set(aw)
    for name in pw:
        for k in pw[name]:
            torch.testing.assert_close(pw[name][k], aw[name][k], rtol=1e-5, atol=1e-5)


def test_pack_auto_measures_and_reports(tmp_path, keep_threads, capsys):
    cfg = SearchConfig(out=str(tmp_path / "a"), dataset="synthetic", nodes=3, target="resnet8",
                       models=["resnet8", "wrn10_1"], batch_size=8, step="eager")
    g = heaviest_graph(cfg, 10, 3)
    assert [n.model for n in g.nodes] == ["resnet8", "wrn10_1", "wrn10_1"] and not g.frozen
    k, rows = probe_pack(cfg, torch.device("cpu"), sizes=(1, 2), steps=1)
    assert k in (1, 2) and [r["pack"] for r in rows][:1] == [1]
    assert all(r["trial_steps_per_s"] > 0 for r in rows)
    line = describe_probe(k, rows, torch.device("cpu"))
    assert line.startswith("--pack auto on cpu: 1: ") and line.endswith(f"-> pack {k}")


def test_pack_auto_probes_no_pack_larger_than_a_workers_share_of_the_trials(tmp_path, monkeypatch, capsys):
    """A 2-trial search probed packs of 1 to 16 (most of its time on a loaded machine): the probe now stops at
    the trials one worker can hold, and a worker with one trial to run packs nothing."""
    from ktg_fast.search import pack_probe, run

    seen = []
    monkeypatch.setattr(pack_probe, "probe_pack", lambda cfg, device, sizes: (seen.append(sizes), (sizes[-1], []))[1])
    base = dict(out=str(tmp_path / "a"), dataset="synthetic", nodes=3, target="resnet8", models=["resnet8"],
                pack="auto", device="cpu")
    assert run.resolve_pack(SearchConfig(**base, trials=2)) == 2 and seen == [(1, 2)]
    assert run.resolve_pack(SearchConfig(**base, trials=9, workers=2)) == 4 and seen[-1] == (1, 2, 4)
    assert run.resolve_pack(SearchConfig(**base, trials=2, workers=2)) == 1 and len(seen) == 2
    assert "--pack auto: 1 (2 trials for 2 workers: nothing to pack)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, message", [("0", "positive number"), ("two", "positive number")])
def test_bad_pack_flag_is_named(flag, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ktg_fast.search", *BASE, "--pack", flag, "--out",
                        str(tmp_path / "b")], env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--pack" in r.stderr and message in r.stderr
    assert not (tmp_path / "b").exists()


def test_a_packed_trial_retrains_alone_from_the_command_line(tmp_path, keep_threads):
    """README: a packed trial equals the same trial trained alone with the pack's batches; `train --data-seed
    --data-offset` is that lone run."""
    out = tmp_path / "pk"
    assert cli.main([*BASE, "--gates", "through", "linear", "--epochs", "2", "--min-resource", "2", "--trials", "4",
                     "--pack", "3", "--heartbeat", "2", "--out", str(out)]) == 0
    cfg = load_config(out)
    t = max(_trials(out), key=lambda t: t.number)  # joined at pack epoch 2, when the first three finished
    folder = Path(t.user_attrs["dir"])
    info = json.loads((folder / "trial.json").read_text())
    assert info["data_offset"] == 2 and info["data_seed"] != info["seed"]
    assert info["val_size"] == cfg.resolved_val_size()
    # trial.json's "replay" is that lone run, every flag filled in.
    replay = shlex.split(info["replay"])
    assert replay[:3] == ["python", "-m", "ktg_fast.train"] and replay[-2:] == ["--out", str(folder / "replay")]
    for flag, value in [("--seeds", info["seed"]), ("--data-seed", info["data_seed"]),
                        ("--data-offset", info["data_offset"]), ("--val-size", info["val_size"]),
                        ("--cpu-threads", 1), ("--step", "eager"), ("--batch-size", 16), ("--epochs", 2)]:
        assert replay[replay.index(flag) + 1] == str(value), flag
    alone = folder / "replay"
    r = subprocess.run([sys.executable, *replay[1:], "--no-progress"], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pw, aw = _node_weights(folder / "nodes"), _node_weights(alone / "nodes")
    assert pw.keys() == aw.keys()
    for name in pw:  # the search's --cpu-threads 1 given to train too: bit for bit, as the README says
        for k in pw[name]:
            assert torch.equal(pw[name][k], aw[name][k]), f"{name} {k}"
