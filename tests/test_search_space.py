"""Search: the space of graphs, the books of a study (ledger), ASHA's cost, storages and settings (fast)."""
import datetime as dt
import random
import subprocess
import sys
import textwrap

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from ktg_fast.graph import PRETRAINED
from ktg_fast.search.budget import expected_epochs_per_trial, rungs, trials_per_hour
from ktg_fast.search.config import SearchConfig
from ktg_fast.search.ledger import ATTR_FAIL, ATTR_KEY, ATTR_REJECTED, Ledger
from ktg_fast.search.space import FrozenTargetError, SearchError, SearchSpace
from ktg_fast.search.storage import admission_lock, mask_url, open_storage, sqlite_lock_path

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------- space
def params3(**over):
    p = {"model_2": "wrn28_2", "model_3": "resnet110",
         "gate_0_1": "through", "gate_0_2": "cutoff", "gate_0_3": "through",
         "gate_1_2": "cutoff", "gate_1_3": "linear",
         "gate_2_1": "correct", "gate_2_3": "through",
         "gate_3_1": "linear", "gate_3_2": "cutoff"}
    p.update(over)
    return p


def test_space_matches_the_paper():
    s = SearchSpace(nodes=3, target="ResNet32")
    assert s.target == "resnet32" and s.models == ("resnet32", "resnet110", "wrn28_2")
    assert set(s.gates) == {"through", "cutoff", "linear", "correct"}
    names = s.param_names()
    assert len([n for n in names if n.startswith("gate_")]) == 3 * 3  # N^2 edges, label edges included
    assert len([n for n in names if n.startswith("model_")]) == 2
    assert s.size() == 3 ** 2 * 4 ** 9  # M^(N-1) * G^(N^2)
    assert "gate_1_1" not in names and not any(n.endswith("_0") for n in names)


def test_graph_from_params_freezes_and_marks_teachers():
    s = SearchSpace(nodes=3, target="resnet32")
    g = s.graph(params3())
    assert [n.model for n in g.nodes] == ["resnet32", "wrn28_2", "resnet110"]
    assert g.frozen == [2] and g.nodes[1].checkpoint == PRETRAINED and g.nodes[0].checkpoint is None
    assert g.gates[1][3] == "linear" and g.gates[3][1] == "linear" and g.gates[0][2] == "cutoff"
    with pytest.raises(FrozenTargetError):
        s.graph(params3(gate_0_1="cutoff", gate_2_1="cutoff", gate_3_1="cutoff"))


def test_key_merges_renumbered_auxiliary_nodes_only():
    s = SearchSpace(nodes=3, target="resnet32")
    p = params3()
    # Swap nodes 2 and 3: models and every gate touching them.
    swap = {2: 3, 3: 2, 0: 0, 1: 1}
    q = {"model_2": p["model_3"], "model_3": p["model_2"]}
    for s_, t in s.edges():
        q[f"gate_{swap[s_]}_{swap[t]}"] = p[f"gate_{s_}_{t}"]
    assert q != p and s.key(q) == s.key(p)
    assert s.key(params3(gate_1_3="through")) != s.key(p)
    assert s.key(params3(model_3="resnet32")) != s.key(p)


def _random_params(space, rng, gates=None):
    p = {f"model_{i}": rng.choice(space.models) for i in range(2, space.nodes + 1)}
    p.update({f"gate_{s}_{t}": rng.choice(gates or space.gates) for s, t in space.edges()})
    return p


def _renumbered(space, p, rng):
    aux = list(range(2, space.nodes + 1))
    new = aux[:]
    rng.shuffle(new)
    m = {0: 0, 1: 1, **dict(zip(aux, new))}
    q = {f"model_{m[i]}": p[f"model_{i}"] for i in aux}
    q.update({f"gate_{m[s]}_{m[t]}": p[f"gate_{s}_{t}"] for s, t in space.edges()})
    return q


@pytest.mark.parametrize("nodes", [5, 10, 12, 16])
def test_key_is_canonical_and_quick_at_many_nodes(nodes):
    """Beyond 9 nodes the key tries the renumberings that keep refined classes in order, not (N-1)!:
    still the same key for every renumbering, a different one for a changed gate, in well under a second."""
    import time

    rng = random.Random(nodes)
    s = SearchSpace(nodes=nodes, target="resnet8", models=("resnet8", "wrn10_1"))
    for _ in range(3):
        p = _random_params(s, rng)
        t0 = time.perf_counter()
        k = s.key(p)
        assert time.perf_counter() - t0 < 2.0
        for _ in range(3):
            q = _renumbered(s, p, rng)
            assert s.key(q) == k
        changed = dict(p, gate_0_2="through" if p["gate_0_2"] != "through" else "linear")
        assert s.key(changed) != k
    # Interchangeable nodes (every gate through, one model): ties broken by number, still quick and stable.
    same = {**{f"model_{i}": "resnet8" for i in range(2, nodes + 1)}, **{f"gate_{a}_{b}": "through" for a, b in s.edges()}}
    t0 = time.perf_counter()
    assert s.key(same) == s.key(_renumbered(s, same, rng))
    assert time.perf_counter() - t0 < 2.0


def test_search_takes_at_most_the_kernels_nodes():
    from ktg_fast.search.space import MAX_SEARCH_NODES

    SearchSpace(nodes=MAX_SEARCH_NODES, target="resnet8", models=("resnet8",))
    with pytest.raises(SearchError, match=f"--nodes {MAX_SEARCH_NODES + 1} is more than a search takes"):
        SearchSpace(nodes=MAX_SEARCH_NODES + 1, target="resnet8", models=("resnet8",))
    assert "~10^" in SearchSpace(nodes=MAX_SEARCH_NODES, target="resnet8", models=("resnet8",)).describe()


def test_count_distinct_by_hand():
    # 2 nodes, 1 model, 4 gates: 4^4 gate settings, 4^2 of them leave the target with only cutoff inputs.
    s = SearchSpace(nodes=2, target="resnet8", models=("resnet8",))
    assert s.size() == 256 and s.count_distinct() == 256 - 16
    # Without cutoff nothing can be frozen; 3 nodes with 2 gates: renumbering merges pairs.
    s3 = SearchSpace(nodes=3, target="resnet8", models=("resnet8",), gates=("through", "linear"))
    n = s3.count_distinct()
    assert s3.size() == 2 ** 9 and s3.size() / 2 <= n < s3.size()


@pytest.mark.parametrize("kw,match", [
    (dict(nodes=1), "at least 2"),
    (dict(models=("resnet33",)), "unknown model 'resnet33' in --models"),
    (dict(target="nonet"), "unknown model 'nonet' in --target"),
    (dict(gates=("through", "sometimes")), "unknown gate 'sometimes' in --gates"),
    (dict(temperature=0), "temperature must be positive"),
])
def test_space_rejects_bad_settings(kw, match):
    base = dict(nodes=3, target="resnet8", models=("resnet8",))
    with pytest.raises(SearchError, match=match):
        SearchSpace(**{**base, **kw})


def test_suggest_draws_valid_choices_and_reads_back_fixed_params():
    s = SearchSpace(nodes=3, target="resnet8", models=("resnet8", "wrn10_1"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(30):
        t = study.ask()
        p = s.suggest(t)
        assert set(p) == set(s.param_names()) and p["model_2"] in s.models
        seen.add(s.key(p))
        study.tell(t, 0.0)
    assert len(seen) == 30
    study.enqueue_trial(params3(model_2="wrn10_1", model_3="resnet8"))
    t = study.ask()
    assert s.suggest(t) == params3(model_2="wrn10_1", model_3="resnet8")


# ------------------------------------------------------------------ budget
def test_expected_epochs_of_the_paper():
    assert rungs(200) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert expected_epochs_per_trial(200) == pytest.approx(8 * 0.5 + 200 / 256)
    assert rungs(16, min_early_stopping_rate=1) == [2, 4, 8]
    assert expected_epochs_per_trial(1) == 1.0
    assert trials_per_hour(1.0, epochs=200) == pytest.approx(3600 / 4.78125)


def test_expected_epochs_agree_with_optunas_pruner():
    """Simulate trials of random quality through Optuna's SuccessiveHalvingPruner as a worker runs them."""
    for epochs in (16, 12):
        study = optuna.create_study(direction="maximize", pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=2, min_early_stopping_rate=0))
        rng, total, n = random.Random(0), 0, 600
        for _ in range(n):
            t, q = study.ask(), rng.random()
            for e in range(1, epochs + 1):
                t.report(q, e)
                if e < epochs and t.should_prune():
                    break
            total += e
            study.tell(t, q) if e == epochs else study.tell(t, state=TrialState.PRUNED)
        assert total / n == pytest.approx(expected_epochs_per_trial(epochs), abs=0.25)


# ------------------------------------------------------------------ ledger
_T0 = dt.datetime(2025, 1, 1)


def ft(number, state, *, key=None, rejected=None, fail=None, retry_of=None, history=None, value=None, age_s=0.0):
    ua, sa = {}, {}
    if key is not None:
        ua[ATTR_KEY] = key
    if rejected is not None:
        ua[ATTR_REJECTED] = rejected
    if fail is not None:
        ua[ATTR_FAIL] = fail
    if retry_of is not None:
        sa["failed_trial"] = retry_of
        sa["retry_history"] = history or [retry_of]
    finished = state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return FrozenTrial(number=number, state=state, value=value, datetime_start=_T0,
                       datetime_complete=_T0 - dt.timedelta(seconds=age_s) if finished else None,
                       params={"x": "a"}, distributions={"x": CategoricalDistribution(["a"])},
                       user_attrs=ua, system_attrs=sa, intermediate_values={}, trial_id=number)


def test_ledger_counts_lineages_not_trials():
    C, P, F, R, W = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING
    trials = [
        ft(0, C, key="a", value=70.0),
        ft(1, F, rejected="frozen: target"),            # rejected: not counted
        ft(2, F, key="b"),                              # lost (worker killed) ...
        ft(3, P, key="c"),
        ft(4, C, key="b", retry_of=2, value=72.0),      # ... and its retry finished it
        ft(5, F, key="d", fail="non-finite loss"),      # a real failure counts
        ft(6, F, key="e"),                              # lost, retry queued
        ft(7, W, key="e", retry_of=6),
        ft(8, R, key="f"),
        ft(9, F, rejected="duplicate: same graph as trial 0"),
    ]
    book = Ledger(trials, budget=7)
    assert book.counts == {"complete": 2, "pruned": 1, "failed": 1, "running": 1, "waiting": 1, "lost": 0}
    assert book.done == 4 and len(book.admitted) == 6 and book.free_slots == 1
    assert book.best().number == 4
    assert book.rejected == {"frozen": 1, "duplicate": 1}
    assert book.should_ask()
    # Admission: duplicates of any admitted lineage, the budget, and a retry keeps its own slot.
    assert book.admission(ft(10, R), "c").startswith("duplicate")
    assert book.admission(ft(10, R), "g") is None
    full = Ledger(trials, budget=6)
    assert full.admission(ft(10, R), "g").startswith("budget")
    assert full.free_slots == 0 and full.should_ask()  # no free slot, but the queued retry may start
    assert full.admission(ft(7, R, key="e", retry_of=6), "e") is None


def test_ledger_completion_and_orphans():
    C, F, R = TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING
    book = Ledger([ft(0, C, key="a", value=1.0), ft(1, F, key="b", age_s=100.0)], budget=2)
    assert book.done == 1 and not book.complete and book.counts["lost"] == 1
    assert [t.number for t in book.orphans(50.0, now=_T0)] == [1]
    assert book.orphans(500.0, now=_T0) == []
    assert not book.should_ask()  # both slots taken: wait for the lost one's retry
    done = Ledger([ft(0, C, key="a", value=1.0), ft(1, F, key="b"), ft(2, C, key="b", retry_of=1, value=2.0)], 2)
    assert done.complete and done.orphans(0.0, now=_T0 + dt.timedelta(days=1)) == []
    # A lost trial re-queued twice: the lower retry runs, the higher one steps aside.
    twice = Ledger([ft(0, F, key="a"), ft(1, R, key="a", retry_of=0), ft(2, R, key="a", retry_of=0)], 1)
    assert twice.redundant_retry(twice.trials[2]) == 1 and twice.redundant_retry(twice.trials[1]) is None


# ----------------------------------------------------------------- storage
def test_mask_url_and_bad_urls(tmp_path):
    assert mask_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(SearchError, match="cannot reach storage postgresql://nobody@127.0.0.1:9/nodb"):
        open_storage("postgresql://nobody@127.0.0.1:9/nodb")
    with pytest.raises(SearchError, match="not a database URL|not a usable"):
        open_storage("not a url")
    with pytest.raises(SearchError, match="no dialect|not a usable"):
        open_storage("nosuchdb://h/x")


def test_sqlite_storage_wal_and_lock(tmp_path):
    import sqlite3

    url = f"sqlite:///{tmp_path / 'sub' / 'study.db'}"
    open_storage(url)
    mode = sqlite3.connect(tmp_path / "sub" / "study.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    lock = sqlite_lock_path(url, "s")
    # Another process holds the study's lock: we wait, then go on without it.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(lock)!r}, "a"); fcntl.flock(f, fcntl.LOCK_EX); print("held", flush=True); time.sleep(30)""")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with admission_lock(None, url, "s", wait_s=0.3) as got:
            assert got is False
        with admission_lock(None, url, "other", wait_s=0.3) as got:
            assert got is True  # another study's lock is free
    finally:
        holder.kill()
        holder.wait()
    with admission_lock(None, url, "s", wait_s=5) as got:
        assert got is True
    assert not lock.exists()  # no lock file left behind


# ---------------------------------------------------------------- settings
def test_config_validation_messages(tmp_path):
    base = dict(out=str(tmp_path), dataset="fashion-mnist", nodes=2, target="resnet8", models=["resnet8"])
    SearchConfig(**base, trials=10).validate()
    with pytest.raises(SearchError, match="only 240 distinct"):
        SearchConfig(**base).check_budget(241)
    SearchConfig(**base).check_budget(240)
    for kw, match in [(dict(dataset="mnist2"), "unknown dataset"),
                      (dict(reduction_factor=1), "reduction-factor"), (dict(heartbeat=10, grace=5), "must exceed"),
                      (dict(val_size=0), "never uses the test set"), (dict(dataset=""), "--dataset is required")]:
        with pytest.raises(SearchError, match=match):
            SearchConfig(**{**base, **kw}).validate()
    spec = SearchConfig(**base).study_spec()
    assert spec["val_size"] == 10_000 and spec["models"] == ["resnet8"] and spec["grace"] == 120


# ---------------------------------------------------------------- progress
def test_progress_line_and_eta():
    import io

    from ktg_fast.search.progress import Progress, eta_seconds, status_line

    C, P, R = TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING
    trials = [ft(0, C, key="a", value=70.5), ft(1, P, key="b"), ft(2, R, key="c"), ft(3, R, key="d")]
    for t, s in zip(trials, (100, 20)):  # durations: 100 s and 20 s
        t.datetime_start, t.datetime_complete = _T0, _T0 + dt.timedelta(seconds=s)
    book = Ledger(trials, budget=10)
    # 8 trials left, 60 s each on average, 2 running side by side.
    assert eta_seconds(book) == pytest.approx(8 * 60 / 2)
    assert eta_seconds(book, done_since_start=4, elapsed_s=100.0) == pytest.approx(8 * 25)
    line = status_line(book, eta_seconds(book))
    assert line == "2/10 done (complete 1, pruned 1, failed 0) | running 2 | best 70.50% (#0) | ETA 4m00s"

    class FakeStudy:
        def __init__(self):
            self.trials = list(trials)

        def get_trials(self, deepcopy=False):
            return self.trials

    study, out = FakeStudy(), io.StringIO()
    prog = Progress(study, lambda: 10, stream=out, min_interval_s=0.0)
    prog.poll()
    study.trials = study.trials[:2] + [ft(2, C, key="c", value=80.0), ft(3, R, key="d")]
    prog.poll()
    text = out.getvalue()
    assert "2/10 done" in text and "3/10 done" in text and "new best: trial 2, target val 80.00%" in text


def test_printed_commands_run_from_any_folder(tmp_path, monkeypatch):
    """A search started with relative --out, --teachers and --data-root prints and records absolute paths:
    a trial's replay and export's retrain command work from another folder."""
    import shlex

    from ktg_fast.search.commands import replay_command, retrain_command

    monkeypatch.chdir(tmp_path)
    cfg = SearchConfig(out="runs/s", dataset="synthetic", nodes=2, target="resnet8", models=["resnet8"],
                       teachers="runs/teachers", data_root="data", epochs=2)
    info = {"seed": 3, "val_size": 100, "data_seed": 7, "data_offset": 1}
    for line in (replay_command(cfg, info, cfg.out_dir / "trials" / "00001", frozen=True),
                 retrain_command(cfg, cfg.out_dir / "best" / "graph.yaml", frozen=True)):
        argv = shlex.split(line)
        for flag in ("--graph", "--teachers", "--data-root", "--out"):
            value = argv[argv.index(flag) + 1]
            assert value.startswith(str(tmp_path)), (flag, value)
