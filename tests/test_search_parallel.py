"""Search with several workers at once (embedded SQLite and PostgreSQL), and workers killed with SIGKILL.

PostgreSQL: $KTG_TEST_POSTGRES_URL (set by .ci/run), else a throwaway server
started through scripts/postgres.sh when Debian's binaries are installed, else
the PostgreSQL tests skip.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ktg_fast.search.ledger import ATTR_FAIL, ATTR_KEY, ATTR_REJECTED, Ledger

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    url = os.environ.get("KTG_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    folder = tmp_path_factory.mktemp("pg") / "server"
    script = REPO / "scripts" / "postgres.sh"
    try:
        r = subprocess.run(["bash", str(script), "start", str(folder)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no PostgreSQL server: {e}")
    if r.returncode != 0:
        pytest.skip(f"no PostgreSQL server (set KTG_TEST_POSTGRES_URL or install postgresql): {r.stderr.strip()}")
    try:
        yield r.stdout.strip()
    finally:
        subprocess.run(["bash", str(script), "stop", str(folder)], capture_output=True, timeout=120)


def search_cmd(out, trials, *extra, epochs=2, subset=128):
    return [sys.executable, "-m", "ktg_fast.search", "--nodes", "2", "--target", "resnet8", "--models", "resnet8",
            "wrn10_1", "--dataset", "fashion-mnist", "--train-subset", str(subset), "--eval-subset", "200",
            "--epochs", str(epochs), "--cpu-threads", "1", "--heartbeat", "1", "--grace", "3", "--poll", "0.5",
            "--trials", str(trials), "--out", str(out), "--no-progress", *extra]


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def load(url, name):
    from ktg_fast.search.storage import open_storage  # picks psycopg2 for postgresql:// URLs

    return optuna.load_study(study_name=name, storage=open_storage(url))


def check_books(study, budget):
    """The study holds exactly ``budget`` finished trials, no graph twice, nothing left running."""
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    book = Ledger(trials, budget)
    assert book.complete and book.done == budget and len(book.admitted) == budget
    keys = [ln.key for ln in book.admitted]
    assert len(keys) == len(set(keys)), "a graph was admitted twice"
    params = [json.dumps(ln.first.params, sort_keys=True) for ln in book.admitted]
    assert len(params) == len(set(params))
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for ln in book.admitted:
        assert ln.latest.intermediate_values, f"lineage {ln.root} finished without training"
    return book


def run_search(cmd, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return r


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_three_workers_share_one_study(tmp_path, backend, request):
    out, budget = tmp_path / "par", 6
    extra = []
    if backend == "postgresql":
        url, name = request.getfixturevalue("postgres_url"), f"par-{uuid.uuid4().hex[:8]}"
        extra = ["--storage", url, "--study", name]
    else:
        url, name = f"sqlite:///{out / 'study.db'}", "par"
    r = run_search(search_cmd(out, budget, "--workers", "3", *extra))
    assert "3 workers started" in r.stderr and "search complete: 6 trials" in r.stderr
    study = load(url, name)
    book = check_books(study, budget)
    # All three workers trained (their pids differ) and each trial folder belongs to its trial.
    pids = {ln.latest.user_attrs["pid"] for ln in book.admitted}
    assert len(pids) >= 2
    for ln in book.admitted:
        t = ln.latest
        info = json.loads((Path(t.user_attrs["dir"]) / "trial.json").read_text())
        assert info["number"] == t.number and info["state"] == t.state.name
    logs = sorted((out / "logs").glob("worker*.log"))
    assert len(logs) == 3 and not any("Traceback" in p.read_text() for p in logs)


def wait_for_running_trial(url, name, proc, min_epochs=1, timeout=240):
    """Poll the storage until some trial has reported ``min_epochs`` and still runs; return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the search ended before a trial could be killed"
        try:
            for t in load(url, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if len(t.intermediate_values) >= min_epochs and "pid" in t.user_attrs:
                    return t
        except (KeyError, Exception):  # the study may not exist yet
            pass
        time.sleep(0.2)
    raise AssertionError("no trial reached its first epoch in time")


def check_killed_and_retried(study, victim, before):
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL and ATTR_FAIL not in dead.user_attrs  # failed by the heartbeat timeout
    # Nothing recorded before the kill is lost: the storage and the trial folder keep every reported epoch.
    assert {k: v for k, v in dead.intermediate_values.items() if k in before} == before
    metrics = [json.loads(x) for x in (Path(victim.user_attrs["dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics][:len(before)] == sorted(before)
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number
               and ATTR_REJECTED not in t.user_attrs]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.params == dead.params and retry.user_attrs[ATTR_KEY] == dead.user_attrs[ATTR_KEY]
    assert retry.user_attrs["seed"] == dead.user_attrs["seed"]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    info = json.loads((Path(retry.user_attrs["dir"]) / "trial.json").read_text())
    assert info["retry_of"] == victim.number and info["resumed"] is True
    # Resumed from the dead trial's checkpoint: the epochs it had finished read the same.
    for e, v in before.items():
        if e in retry.intermediate_values:
            assert retry.intermediate_values[e] == pytest.approx(v)


def test_sigkilled_worker_trial_is_failed_and_rerun(tmp_path):
    """Two workers; one is SIGKILLed mid-trial; the other fails its trial after the grace period and re-runs it."""
    out, budget, url = tmp_path / "kill", 5, f"sqlite:///{tmp_path / 'kill' / 'study.db'}"
    proc = subprocess.Popen(search_cmd(out, budget, "--workers", "2", epochs=3, subset=320), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = wait_for_running_trial(url, "kill", proc)
        before = dict(victim.intermediate_values)
        os.kill(victim.user_attrs["pid"], signal.SIGKILL)
        # Export works while the search runs (the killed trial reads RUNNING until its grace period ends).
        from ktg_fast.search import cli

        assert cli.main(["export", "--out", str(out)]) == 0
        assert re.search(rf"\n\| {victim.number} \| (RUNNING|LOST) \|", (out / "trials.md").read_text())
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "ended with signal 9" in stderr and "search complete: 5 trials" in stderr
    study = load(url, "kill")
    check_books(study, budget)
    check_killed_and_retried(study, victim, before)


@pytest.mark.slow
def test_rerun_after_the_only_worker_was_killed(tmp_path):
    """The whole search is SIGKILLed mid-trial; running the command again finishes the study exactly."""
    out, budget, url = tmp_path / "rerun", 4, f"sqlite:///{tmp_path / 'rerun' / 'study.db'}"
    proc = subprocess.Popen(search_cmd(out, budget, epochs=3, subset=320), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        victim = wait_for_running_trial(url, "rerun", proc)
        before = dict(victim.intermediate_values)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert load(url, "rerun").trials[victim.number].state == TrialState.RUNNING  # nobody failed it yet
    r = run_search([sys.executable, "-m", "ktg_fast.search", "--out", str(out), "--no-progress"])
    assert "joined study 'rerun'" in r.stderr and "search complete: 4 trials" in r.stderr
    lost = json.loads((out / "trials" / f"{victim.number:05d}" / "trial.json").read_text())
    assert lost["state"] == "LOST", lost
    study = load(url, "rerun")
    check_books(study, budget)
    check_killed_and_retried(study, victim, before)
