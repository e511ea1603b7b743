"""Bad input a new user types: each is refused with one line naming the problem and the fix."""
from __future__ import annotations

import subprocess
import sys

import pytest

import ktg_fast
from ktg_fast.graph import GraphError, load_graph
from ktg_fast.reproduce.__main__ import main as reproduce_main
from ktg_fast.reproduce.runner import ReproduceError
from ktg_fast.train import main as train_main


def _cli(module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=60)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr  # no usage dump, no traceback
    return lines[0]


# ------------------------------------------------------------------------- 1. preset keyword typos
@pytest.mark.parametrize("name, kw, bad, accepted", [
    ("dml", {"modles": ["resnet8", "resnet8"]}, "'modles'", "nodes, model, models"),
    ("dml", {"node": 3}, "'node'", "nodes, model, models"),
    ("vanilla", {"nodes": 3}, "'nodes'", "model"),
    ("kd", {"temp": 4.0}, "'temp'", "model, teacher, temperature, checkpoint"),
])
def test_preset_refuses_an_unknown_keyword_and_lists_the_accepted(name, kw, bad, accepted):
    with pytest.raises(GraphError) as e:  # a ValueError
        ktg_fast.preset(name, **kw)
    msg = str(e.value)
    assert f"graph preset {name!r}" in msg and f"unknown keyword {bad}" in msg and msg.endswith(f"accepts {accepted}")
    with pytest.raises(GraphError, match=bad):  # the path --graph takes too
        load_graph(name, **kw)


def test_preset_keywords_that_exist_still_work():
    assert [n.model for n in ktg_fast.preset("dml", model="resnet8").nodes] == ["resnet8", "resnet8"]
    assert [n.model for n in ktg_fast.preset("dml", nodes=3, model="resnet8").nodes] == ["resnet8"] * 3
    assert [n.model for n in ktg_fast.preset("dml", models=["resnet8", "wrn16_2"]).nodes] == ["resnet8", "wrn16_2"]
    assert ktg_fast.preset("kd", model="resnet8", teacher="resnet20", temperature=4.0).temperature == 4.0
    assert [n.model for n in ktg_fast.preset("vanilla", model="resnet8").nodes] == ["resnet8"]


@pytest.mark.parametrize("kw, words", [
    ({"nodes": 3, "models": ["resnet8", "resnet8"]}, ["nodes=3", "2 models"]),
    ({"model": "resnet8", "models": ["resnet8", "resnet8"]}, ["not both"]),
    ({"models": "resnet8"}, ["list of model names", "model='resnet8'"]),
])
def test_dml_refuses_keywords_it_would_ignore(kw, words):
    with pytest.raises(GraphError) as e:
        ktg_fast.preset("dml", **kw)
    for w in words:
        assert w in str(e.value)


def test_train_cli_refuses_a_flag_the_preset_ignores(tmp_path, keep_logging):
    out = tmp_path / "o"
    with pytest.raises(GraphError, match="graph preset 'vanilla' got unknown keyword 'nodes'; it accepts model"):
        train_main(["--graph", "vanilla", "--nodes", "3", "--dataset", "synthetic", "--out", str(out),
                    # if the flag were ignored again, train for a moment, not the paper's 200 epochs
                    "--epochs", "1", "--train-subset", "32", "--eval-subset", "32", "--batch-size", "32",
                    "--model", "resnet8", "--device", "cpu", "--step", "eager", "--no-progress"])
    assert not out.exists()


# --------------------------------------------------------------------------------- 2. empty --seeds
def test_reproduce_empty_seeds_is_one_line(tmp_path):
    out = tmp_path / "o"
    line = _one_error_line(_cli("ktg_fast.reproduce", "--dataset", "synthetic", "--out", str(out), "--seeds", ""))
    assert line == "error: --seeds: give at least one seed, e.g. --seeds 0 1 2 (or leave the flag out for the " \
                   "paper's five, 0 1 2 3 4)"
    assert not out.exists()


@pytest.mark.parametrize("seeds, words", [
    ([], ["--seeds: give at least one seed", "--seeds 0 1 2"]),
    (["", " "], ["--seeds: give at least one seed"]),
    (["0", "x"], ["--seeds: 'x' is not a whole number", "--seeds 0 1 2"]),
    (["0", "1", "0"], ["--seeds repeats a seed"]),
])
def test_reproduce_bad_seeds_are_refused(tmp_path, keep_logging, seeds, words):
    out = tmp_path / "o"
    with pytest.raises(ReproduceError) as e:
        reproduce_main(["--dataset", "synthetic", "--out", str(out), "--dry-run", "--seeds", *seeds])
    for w in words:
        assert w in str(e.value)
    assert not out.exists()


def test_reproduce_seeds_in_one_value_are_read(tmp_path, keep_logging):
    from ktg_fast.reproduce.__main__ import build_parser, settings_from_args

    p = build_parser()
    for value in (["0", "1", "2"], ["0 1 2"], ["0,1,2"]):
        s = settings_from_args(p, p.parse_args(["--dataset", "synthetic", "--out", str(tmp_path), "--seeds", *value]))
        assert s.seeds == (0, 1, 2)


# ----------------------------------------------------------------------------- 3. unknown --dataset
KNOWN_DATASETS = "the known datasets are cifar10, cifar100, fashion-mnist, tiny-imagenet and synthetic"


def test_reproduce_unknown_dataset_names_the_flag(tmp_path, keep_logging):
    out = tmp_path / "o"
    with pytest.raises(ValueError) as e:
        reproduce_main(["--dataset", "nosuch", "--out", str(out), "--dry-run"])
    assert str(e.value) == f"--dataset: unknown dataset 'nosuch'; {KNOWN_DATASETS}"
    assert not out.exists()


def test_train_unknown_dataset_names_the_flag_before_making_out(tmp_path):
    out = tmp_path / "o"
    line = _one_error_line(_cli("ktg_fast.train", "--graph", "vanilla", "--dataset", "nosuch", "--out", str(out)))
    assert line == f"error: --dataset: unknown dataset 'nosuch'; {KNOWN_DATASETS}"
    assert not out.exists()  # checked while the flags are parsed, before --out is created


def test_dataset_spellings_still_accepted(tmp_path, keep_logging):
    from ktg_fast.reproduce.__main__ import build_parser, settings_from_args

    p = build_parser()
    args = p.parse_args(["--dataset", "Fashion_MNIST", "--out", str(tmp_path)])
    assert args.dataset == "Fashion_MNIST" and settings_from_args(p, args).dataset == "fashion-mnist"


# ------------------------------------------------------------------------------ 4. unknown --models
@pytest.mark.parametrize("models, bad", [
    (["foo"], "unknown model 'foo'"),
    (["resnet8", "foo", "bar"], "unknown models 'foo', 'bar'"),
])
def test_reproduce_unknown_model_is_one_clear_sentence(tmp_path, keep_logging, models, bad):
    out = tmp_path / "o"
    with pytest.raises(ReproduceError) as e:
        reproduce_main(["--dataset", "synthetic", "--out", str(out), "--dry-run", "--models", *models])
    msg = str(e.value)
    assert msg.startswith(f"--models: {bad}; the known models are resnet8, ")
    assert "wrn28_2" in msg and "resnet{6n+2}" in msg and "--models resnet8 resnet14 wrn10_1" in msg
    assert ".;" not in msg and "\n" not in msg and "register_model" not in msg
    assert not out.exists()


def test_reproduce_impossible_model_names_it(tmp_path, keep_logging):
    with pytest.raises(ReproduceError) as e:
        reproduce_main(["--dataset", "synthetic", "--out", str(tmp_path / "o"), "--dry-run",
                        "--models", "resnet8", "resnet14", "resnet33"])
    msg = str(e.value)
    assert msg.startswith("--models: 'resnet33': ") and "6n+2" in msg and ".;" not in msg and ". (" not in msg
