"""Issue 11, trainer and train/pretrain command lines: nothing lost, nothing cryptic.

Each test reproduces one defect of the issue (its number in the name) with tiny settings:
synthetic data, resnet8, one or two epochs of a few batches.
"""
import errno
import json
import os
import random
import re
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktg_fast import cli_common, io as kio, pretrain, train
from ktg_fast.graph import preset
from ktg_fast.io import CheckpointError, append_jsonl, atomic_write_text, check_state_dict, load_checkpoint
from ktg_fast.models import get_model
from ktg_fast.nodes import load_model_checkpoint, save_model_checkpoint
from ktg_fast.run_files import read_metrics
from ktg_fast.trainer import NonFiniteLossError, Trainer

from helpers import exploding_model, small_config, synthetic_data

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
TINY = ["--dataset", "synthetic", "--train-subset", "64", "--eval-subset", "32", "--batch-size", "32",
        "--epochs", "1", "--step", "eager", "--no-progress"]


def run_main(main, argv, monkeypatch, capsys):
    """Run ``main`` under ``run_cli`` in-process, as ``python -m`` would: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    with pytest.raises(SystemExit) as exc:
        cli_common.run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def train_cli(argv, monkeypatch, capsys):
    return run_main(train.main, argv, monkeypatch, capsys)


def one_error_line(code, err):
    """Exit 2, and the last stderr line is the one ``error:`` line, with no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def small(**kw):
    return small_config(**{"epochs": 1, **kw})


def synth(**kw):
    return synthetic_data(**{"train_subset": 64, "eval_subset": 32, **kw})


# ----------------------------------------------------------------------------- 3, 14
def test_3_14_refused_resume_writes_nothing_and_names_the_differing_flags(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = train_cli(["--graph", "vanilla", "--model", "resnet8", "--out", str(out), *TINY],
                             monkeypatch, capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = train_cli(["--graph", "dml", "--model", "resnet8", "--out", str(out), "--resume", "--lr", "0.2",
                              *TINY], monkeypatch, capsys)
    line = one_error_line(code, err)
    assert "--lr 0.1 in the checkpoint, 0.2 now" in line
    assert "--graph 1 node (resnet8) in the checkpoint, 2 nodes (resnet8, resnet8) now" in line
    assert "{" not in line and "cutoff" not in line  # the fields that differ, not two whole dicts
    assert "another --out folder" in line
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # graph.yaml, metrics.jsonl, checkpoint.pt untouched


def test_14_resume_without_checkpoint_says_it_starts_fresh(tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level("INFO", logger="ktg_fast")
    code, _, err = train_cli(["--graph", "vanilla", "--model", "resnet8", "--out", str(tmp_path / "new"), "--resume",
                              *TINY], monkeypatch, capsys)
    assert code == 0, err
    assert f"no checkpoint in {tmp_path / 'new'} to resume: starting a fresh run" in caplog.text
    # A finished run whose checkpoint went: --resume refuses rather than train anew over its results.
    (tmp_path / "new" / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "new").iterdir() if p.is_file()}
    code, _, err = train_cli(["--graph", "vanilla", "--model", "resnet8", "--out", str(tmp_path / "new"), "--resume",
                              *TINY], monkeypatch, capsys)
    assert code == 2 and "holds a finished run (final.json) but no checkpoint.pt to resume" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "new").iterdir() if p.is_file()} == before


def test_14_pretrain_has_out_and_readme_semantics_in_repo(tmp_path, monkeypatch, capsys):
    work = tmp_path / "teacher-run"
    code, out, err = run_main(pretrain.main, ["--model", "resnet8", "--teachers", str(tmp_path / "t"),
                                              "--out", str(work), *TINY], monkeypatch, capsys)
    assert code == 0, err
    assert "to resume" not in err  # a first pretraining has nothing to resume and does not say so
    assert (work / "checkpoint.pt").is_file() and (tmp_path / "t" / "synthetic" / "resnet8.pt").is_file()
    # Its "use another --out folder" advice now names a flag pretrain has.
    code, _, err = run_main(pretrain.main, ["--model", "resnet8", "--teachers", str(tmp_path / "t"),
                                            "--out", str(work), *TINY, "--lr", "0.3"], monkeypatch, capsys)
    assert "another --out folder" in one_error_line(code, err)
    links = re.findall(r"\]\(([^)#]*SEMANTICS\.md)\)", README)
    assert links and all((REPO / link).is_file() for link in links), links
    assert (REPO / "docs" / "SEMANTICS.md").is_file()


def test_pretrain_never_replaces_another_runs_teacher_silently(tmp_path, monkeypatch, capsys, caplog):
    """Following "use another --out folder" trained a new teacher over the one every `checkpoint: pretrained`
    graph loads.  Now that takes --replace; a rerun of the run that wrote it still completes; the teacher
    records its training-set size and a run that loads it says which file it took."""
    teachers = tmp_path / "t"
    dest = teachers / "synthetic" / "resnet8.pt"
    first = ["--model", "resnet8", "--teachers", str(teachers), *TINY]
    code, _, err = run_main(pretrain.main, first, monkeypatch, capsys)
    assert code == 0, err
    original = dest.read_bytes()
    assert torch.load(dest, weights_only=True)["train_subset"] == 64
    other = tmp_path / "other-run"
    line = one_error_line(*run_main(pretrain.main, [*first, "--out", str(other), "--lr", "0.3"], monkeypatch,
                                    capsys)[::2])
    assert f"teacher {dest} already exists (resnet8, 1 epoch on 64 training images, test " in line, line
    assert "Pass --replace to train a new resnet8 in its place, or --teachers DIR to keep both" in line
    assert dest.read_bytes() == original and not other.exists()  # refused before anything was made
    code, _, err = run_main(pretrain.main, first, monkeypatch, capsys)  # the run that wrote it: same file again
    assert code == 0 and dest.read_bytes() == original, err
    code, _, err = run_main(pretrain.main, [*first, "--out", str(other), "--lr", "0.3", "--replace"], monkeypatch,
                            capsys)
    assert code == 0 and dest.read_bytes() != original, err
    with caplog.at_level("INFO", logger="ktg_fast"):
        code, _, err = run_main(train.main, ["--graph", "kd", "--model", "resnet8", "--teacher", "resnet8",
                                             "--teachers", str(teachers), "--out", str(tmp_path / "kd"), *TINY],
                                monkeypatch, capsys)
    assert code == 0, err
    assert f"frozen node 2: {dest} (resnet8, 1 epoch on 64 training images, test " in caplog.text


# ----------------------------------------------------------------------------- 5
@pytest.mark.parametrize("flag,value", [("--eval-subset", "-5"), ("--train-subset", "0")])
def test_5_nonpositive_subsets_are_refused(tmp_path, monkeypatch, capsys, flag, value):
    args = ["--graph", "vanilla", "--model", "resnet8", "--dataset", "synthetic", "--out", str(tmp_path / "r"),
            flag, value]
    monkeypatch.setattr(sys, "argv", ["prog", *args])
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    assert exc.value.code == 2
    assert f"argument {flag}: must be at least 1, got {value} (leave the flag out to use every image)" \
        in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match=f"{flag} must be a whole number >= 1"):
        Trainer(preset("vanilla", model="resnet8"), synth(**{flag[2:].replace("-", "_"): int(value)}), small(),
                tmp_path / "r")


def test_cpu_threads_flag_is_checked_and_applied(tmp_path, monkeypatch, capsys, keep_threads):
    """train --cpu-threads: 0 is refused naming the flag; N sets torch's threads (what a packed search trial
    needs to be retrained bit for bit)."""
    base = ["--graph", "vanilla", "--model", "resnet8", "--dataset", "synthetic", "--train-subset", "32",
            "--eval-subset", "32", "--epochs", "1", "--batch-size", "16", "--no-progress", "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        train.main([*base, "--out", str(tmp_path / "r0"), "--cpu-threads", "0"])
    assert exc.value.code == 2 and "argument --cpu-threads: must be at least 1, got 0" in capsys.readouterr().err
    torch.set_num_threads(2)
    assert train.main([*base, "--out", str(tmp_path / "r1"), "--cpu-threads", "1"]) == 0
    assert torch.get_num_threads() == 1


# ----------------------------------------------------------------------------- 8
@pytest.fixture(scope="module")
def node_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "resnet8_100.pt"
    save_model_checkpoint(path, get_model("resnet8", num_classes=100), name="resnet8", num_classes=100, in_channels=3)
    return path


def _damaged(kind, src, dest):
    data = src.read_bytes()
    if kind == "random bytes":
        dest.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    elif kind == "truncated":
        dest.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        dest.write_bytes(b"")
    return dest


@pytest.mark.parametrize("kind,match", [
    ("random bytes", "not a PyTorch checkpoint"),
    ("truncated", "truncated or damaged"),
    ("empty", "empty or cut short"),
])
def test_8_unreadable_checkpoint_is_one_line(tmp_path, node_ckpt, kind, match):
    path = _damaged(kind, node_ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_model_checkpoint(path, get_model("resnet8", num_classes=100))
    msg = str(e.value)
    assert str(path) in msg and match in msg and "\n" not in msg
    assert "weights_only" not in msg


@pytest.mark.parametrize("model,kw,match", [
    ("resnet8", dict(num_classes=10), r"tensor fc\.weight has shape \(100, 64\) in the file, \(10, 64\) in the model "
                                      r"\(trained for 100 classes, this dataset has 10\)"),
    ("resnet8", dict(num_classes=100, in_channels=1), r"shape \(16, 3, 3, 3\) in the file, \(16, 1, 3, 3\) in the "
                                                      r"model \(trained on 3-channel images, these have 1\)"),
    ("wrn10_1", dict(num_classes=100), r"another architecture: .*e\.g\. "),
])
def test_8_checkpoint_of_another_model_names_tensor_and_shape(node_ckpt, model, kw, match):
    with pytest.raises(CheckpointError, match=match) as e:
        check_state_dict(get_model(model, **kw), torch.load(node_ckpt, weights_only=True)["state_dict"], node_ckpt)
    assert str(node_ckpt) in str(e.value) and "\n" not in str(e.value)


def test_8_cli_graph_checkpoint_of_other_class_count(tmp_path, node_ckpt, monkeypatch, capsys):
    g = tmp_path / "g.yaml"
    g.write_text(f"nodes:\n  - {{model: resnet8, checkpoint: {node_ckpt}}}\n"
                 "gates:\n  - [cutoff, through]\n  - [cutoff, cutoff]\n")
    code, _, err = train_cli(["--graph", str(g), "--out", str(tmp_path / "r"), *TINY], monkeypatch, capsys)
    line = one_error_line(code, err)
    assert str(node_ckpt) in line and "fc.weight" in line and "(100, 64)" in line


def test_8_23_resume_of_damaged_or_crafted_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--graph", "vanilla", "--model", "resnet8", "--out", str(out), *TINY]
    assert train_cli(args, monkeypatch, capsys)[0] == 0
    (out / "checkpoint.pt").write_bytes(os.urandom(1000))
    line = one_error_line(*train_cli(args + ["--resume"], monkeypatch, capsys)[::2])
    assert str(out / "checkpoint.pt") in line and "weights_only" not in line
    # A crafted checkpoint: full unpickling would run code (create a file) before any check.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"epoch": 1, "payload": Evil()}, out / "checkpoint.pt")
    line = one_error_line(*train_cli(args + ["--resume"], monkeypatch, capsys)[::2])
    assert not marker.exists()
    assert "Python object" in line and "never unpickled" in line


# ----------------------------------------------------------------------------- 9
def test_9_out_is_a_file_or_not_writable_checked_before_data(tmp_path, monkeypatch, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    line = one_error_line(*train_cli(["--graph", "vanilla", "--out", str(f), *TINY], monkeypatch, capsys)[::2])
    assert f"--out {f} is a file, not a folder" in line
    # /sys refuses new folders even to root; the missing dataset shows the data is not loaded first.
    line = one_error_line(*train_cli(["--graph", "vanilla", "--out", "/sys/ktg-test-out", "--dataset", "cifar10",
                                      "--data-root", str(tmp_path / "nodata")], monkeypatch, capsys)[::2])
    assert "--out /sys/ktg-test-out cannot be written" in line


def test_9_full_disk_while_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's checkpoint: part written, then the disk is full
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(kio.torch, "save", save)
    code, _, err = train_cli(["--graph", "vanilla", "--model", "resnet8", "--out", str(out), *TINY[:-5],
                              "--epochs", "2", "--step", "eager", "--no-progress"], monkeypatch, capsys)
    line = one_error_line(code, err)
    assert f"cannot write {out / 'checkpoint.pt'}: no space left on device" in line
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1  # the previous checkpoint is intact
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_9_file_size_limit_in_a_real_process(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # checkpoint.pt is ~600 KB

    r = subprocess.run([sys.executable, "-m", "ktg_fast.train", "--graph", "vanilla", "--model", "resnet8",
                        "--out", str(tmp_path / "run"), *TINY], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=limit, timeout=300)
    line = one_error_line(r.returncode, r.stderr)
    assert "checkpoint.pt: file too large" in line and "ulimit -f" in line


# ----------------------------------------------------------------------------- 12
def _raiser(e):
    def main():
        raise e
    return main


@pytest.mark.parametrize("exc,match", [
    (lambda: OSError(errno.EACCES, "Permission denied", "/x/y"), "error: /x/y: permission denied"),
    (lambda: __import__("sqlalchemy.exc").exc.OperationalError("SELECT", {}, Exception("database is locked")),
     "error: storage error (OperationalError)"),
    (lambda: __import__("optuna").exceptions.StorageInternalError("lost"), "error: storage error"),
    (lambda: CheckpointError("ck.pt: damaged"), "error: ck.pt: damaged"),
    (lambda: KeyError("no such thing"), "error: no such thing"),
    (lambda: NonFiniteLossError("non-finite loss"), "error: non-finite loss"),
])
def test_12_one_handler_for_expected_failures(monkeypatch, capsys, exc, match):
    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as e:
        cli_common.run_cli(_raiser(exc()))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(match) and len(err.splitlines()) == 1, err
    monkeypatch.setattr(sys, "argv", ["prog", "--verbose"])
    with pytest.raises(SystemExit) as e:
        cli_common.run_cli(_raiser(exc()))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" in err and match in err


def test_12_bugs_keep_their_traceback_and_search_uses_the_handler(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(TypeError):
        cli_common.run_cli(_raiser(TypeError("a bug")))
    # Each entry point goes through the handler: bad input is one error line and exit 2, not a traceback.
    for module in ("ktg_fast.search", "ktg_fast.train", "ktg_fast.pretrain"):
        r = subprocess.run([sys.executable, "-m", module, "--out", str(tmp_path / module), "--dataset", "nosuch"],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (module, r.stderr)
        assert r.stderr.startswith("error:") and "nosuch" in r.stderr, (module, r.stderr)


# ----------------------------------------------------------------------------- 13
def test_13_nan_stop_quotes_node_lr_and_no_phantom_checkpoint(tmp_path):
    from ktg_fast.graph import Graph, Node

    with exploding_model():
        g = Graph([Node("resnet8"), Node("exploding")],
                  [["cutoff", "through", "through"], ["cutoff", "cutoff", "cutoff"], ["cutoff", "cutoff", "cutoff"]])
        t = Trainer(g, synth(), small(lr=0.1, node_lr=[0.05, 0.3], check_every=1), tmp_path / "r", step="eager",
                    progress=False)
        with pytest.raises(NonFiniteLossError) as e:
            t.run()
    msg = str(e.value)
    assert "node 2 (exploding)" in msg and "node 2's is 0.3" in msg
    assert "last good checkpoint" not in msg and "no checkpoint was written" in msg
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- 15
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_15_output_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "x")
        t = Trainer(preset("vanilla", model="resnet8"), synth(), small(), tmp_path / "r", step="eager",
                    progress=False)
        t.run()
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == mode
    for name in ("checkpoint.pt", "final.json", "graph.yaml", "metrics.jsonl", "nodes/node1_resnet8.pt"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == mode, name


# ----------------------------------------------------------------------------- 17, 20
def test_17_20_first_epoch_estimate_loader_line_and_clean_logs(tmp_path):
    """A real process writing to a file: time estimate, no misleading loader line, no escape codes."""
    r = subprocess.run([sys.executable, "-m", "ktg_fast.train", "--graph", "vanilla", "--model", "resnet8",
                        "--out", str(tmp_path / "run"), *[a for a in TINY if a != "--no-progress"],
                        "--epochs", "2"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"epoch 1 took .* the whole run \(2 epochs\) takes about \d+(\.\d)? s at this speed",
                     r.stderr), r.stderr
    assert "requested --loader" not in r.stderr  # no --loader was given
    assert "\x1b[" not in r.stderr and "\r" not in r.stderr  # no progress-bar control codes in a log file
    assert "epoch 2/2: loss" in r.stderr  # a plain line per epoch instead


def test_20_help_and_download_messages_speak_flags(tmp_path, monkeypatch):
    from ktg_fast.data import DatasetNotFoundError, fashion_mnist, load_dataset

    help_text = " ".join(train.build_parser().format_help().split())
    assert "the run itself with one seed, <out>/seed<N>/ per seed with several" in help_text
    assert "With one seed the run is written into ``<out>`` itself" in help_text
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian-copy")
    for name in ("cifar10", "fashion-mnist"):
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset(name, tmp_path / "nodata", split="train")
        assert "pass --download" in str(e.value) and "pass download=True" not in str(e.value)


# ----------------------------------------------------------------------------- 19
@pytest.mark.parametrize("content,match", [
    ({"study.db": "", "search.json": "{}"}, r"holds a graph search \(search.json, study.db\)"),
    ({"notes.txt": "mine"}, r"holds files a training run does not write \(notes.txt\)"),
])
def test_19_out_holding_another_kind_is_refused(tmp_path, monkeypatch, capsys, content, match):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in content.items():
        (out / name).write_text(text)
    line = one_error_line(*train_cli(["--graph", "vanilla", "--model", "resnet8", "--out", str(out), *TINY],
                                     monkeypatch, capsys)[::2])
    assert re.search(match, line), line
    assert sorted(p.name for p in out.iterdir()) == sorted(content)  # nothing added


def test_19_readme_examples_use_separate_folders():
    outs = {}
    for cmd, out in re.findall(r"python -m ktg_fast\.(train|search|pretrain)\b[^\n]*?--out (\S+)", README):
        outs.setdefault(out, set()).add(cmd)
    mixed = {o: c for o, c in outs.items() if len(c) > 1}
    assert not mixed, mixed


# ----------------------------------------------------------------------------- 17, 18, 22, 23 (README)
def test_17_18_22_23_readme():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert ". .venv/bin/activate" in quick  # said once, then plain `python` everywhere
    blocks = "".join(re.findall(r"```bash\n(.*?)```", README, re.S))
    assert "python -m" in blocks and ".venv/bin/python" not in blocks  # one spelling in every example
    retrain = re.search(r"python -m ktg_fast\.train --graph runs/demo/best/graph\.yaml[^\n`]*", README)
    assert retrain and "--epochs" in retrain.group(0) and "--train-subset" in retrain.group(0)
    assert "has been lent" not in README and "the issue's" not in README
    assert "weights_only=True" in README and "you trust" in README


# ----------------------------------------------------------------------------- 24
def test_24_killed_before_first_checkpoint_keeps_one_record_per_epoch(tmp_path, monkeypatch):
    out = tmp_path / "run"

    class Killed(BaseException):
        pass

    def killed(self, epoch, step):
        raise Killed()

    with monkeypatch.context() as m:  # epoch 1's metrics line is written, then the process dies
        m.setattr(Trainer, "_save_checkpoint", killed)
        with pytest.raises(Killed):
            Trainer(preset("vanilla", model="resnet8"), synth(), small(epochs=2), out, step="eager",
                    progress=False).run()
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    Trainer(preset("vanilla", model="resnet8"), synth(), small(epochs=2), out, step="eager",
            progress=False).run(resume=True)
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_24_partial_first_line_is_dropped(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "train_lo')  # killed while writing the first line
    Trainer(preset("vanilla", model="resnet8"), synth(), small(), out, step="eager", progress=False).run(resume=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    # append_jsonl itself never glues a record onto a fragment.
    p = tmp_path / "m.jsonl"
    p.write_text('{"epoch": 1}\n{"epoch": 2, "tr')
    append_jsonl(p, {"epoch": 2})
    assert [json.loads(line) for line in p.read_text().splitlines()] == [{"epoch": 1}, {"epoch": 2}]


# ------------------------------------------------------------ a bad flag is one line
@pytest.mark.parametrize("command", ["train", "pretrain", "search", "search export", "reproduce"])
def test_a_bad_flag_is_one_error_line_naming_it(command, capsys, tmp_path):
    from ktg_fast.reproduce import __main__ as reproduce
    from ktg_fast.search import cli as search_cli

    mains = {"train": train.main, "pretrain": pretrain.main, "search": search_cli.main,
             "search export": lambda a: search_cli.main(["export", *a]), "reproduce": reproduce.main}
    with pytest.raises(SystemExit) as e:
        mains[command](["--out", str(tmp_path / "o"), "--epochs", "x"] if command != "search export"
                       else ["--out", str(tmp_path / "o"), "--top", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and "usage:" not in err, err  # not argparse's screen of options
    assert err.startswith(f"python -m ktg_fast.{command}: error: argument ") and "'x'" in err, err
    assert f"(all options: python -m ktg_fast.{command} --help)" in err
    assert not (tmp_path / "o").exists()


def test_export_names_a_missing_folder(tmp_path):
    from ktg_fast.search import cli as search_cli
    from ktg_fast.search.space import SearchError

    with pytest.raises(SearchError, match=r"--out .*nosuch does not exist: give the folder a search wrote"):
        search_cli.main(["export", "--out", str(tmp_path / "nosuch")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SearchError, match=r"empty holds no search.json: give the folder a search wrote"):
        search_cli.main(["export", "--out", str(tmp_path / "empty")])


# ------------------------------------------------------------ SIGTERM as Ctrl-C, exit 143
@pytest.mark.parametrize("signal_name, code, said", [("INT", 130, "interrupted"), ("TERM", 143, "stopped by SIGTERM")])
def test_a_stopped_train_says_how_to_resume_and_resumes(tmp_path, signal_name, code, said):
    out = tmp_path / "run"
    args = ["--graph", "dml", "--model", "resnet8", *TINY, "--epochs", "2", "--step", "eager", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KTG_KILL_SIGNAL": signal_name}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "sigkill_at_step.py"), "3", "ktg_fast.train", *args],
                       capture_output=True, text=True, env=env, timeout=180, cwd=REPO)
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{said}; rerun with --resume to continue" in r.stderr
    r = subprocess.run([sys.executable, "-m", "ktg_fast.train", *args, "--resume", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["epoch"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2]


# ------------------------------------------------------------ one run at a time per --out
HOLD = ("import sys, time; from pathlib import Path; from ktg_fast.locks import folder_lock\n"
        "with folder_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(300)\n")


def test_a_second_run_into_a_busy_out_is_refused_and_a_killed_holder_frees_it(tmp_path, monkeypatch, capsys):
    out, work = tmp_path / "run", tmp_path / "teacher-run"
    out.mkdir()
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holders = [subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdout=subprocess.PIPE, text=True, env=env)
               for d in (out, work)]
    try:
        assert [h.stdout.readline().strip() for h in holders] == ["held", "held"]
        code, _, err = train_cli(["--graph", "vanilla", "--model", "resnet8", *TINY, "--out", str(out)],
                                 monkeypatch, capsys)
        line = one_error_line(code, err)
        assert f"another training run is writing to {out} (process {holders[0].pid})" in line, line
        assert "choose another --out folder" in line
        code, _, err = run_main(pretrain.main, ["--model", "resnet8", "--teachers", str(tmp_path / "t"),
                                                "--out", str(work), *TINY], monkeypatch, capsys)
        line = one_error_line(code, err)
        assert f"another pre-training of teacher resnet8 is writing to {work} (process {holders[1].pid})" in line
        assert sorted(p.name for p in out.iterdir()) == [".ktg-run.lock"]  # the refused run wrote nothing
        assert not (tmp_path / "t" / "synthetic" / "resnet8.pt").exists()
    finally:
        for h in holders:
            h.kill()  # as a crash: the lock file stays behind, the flock goes with the process
            h.wait()
    assert (out / ".ktg-run.lock").exists()
    code, _, err = train_cli(["--graph", "vanilla", "--model", "resnet8", *TINY, "--out", str(out)],
                             monkeypatch, capsys)
    assert code == 0, err
    assert (out / "final.json").is_file() and not (out / ".ktg-run.lock").exists()


def test_a_graph_where_no_node_sees_a_label_is_warned_about(tmp_path, caplog):
    from ktg_fast.graph import Graph

    ring = Graph.from_dict({"nodes": ["resnet8"] * 3, "gates": [["cutoff"] * 4,
                                                                ["cutoff", "cutoff", "through", "cutoff"],
                                                                ["cutoff", "cutoff", "cutoff", "through"],
                                                                ["cutoff", "through", "cutoff", "cutoff"]]})
    assert ring.label_free and not preset("dml", nodes=3).label_free
    assert not preset("kd").label_free  # the teacher was trained on labels
    path = tmp_path / "ring.yaml"
    ring.save(path)
    for graph, warned in ((str(path), True), ("dml", False)):
        caplog.clear()
        args = train.build_parser().parse_args(["--graph", graph, "--dataset", "synthetic", "--out", str(tmp_path)])
        with caplog.at_level("WARNING", logger="ktg_fast"):
            train.load_graph_arg(args)
        said = [r.getMessage() for r in caplog.records if "sees a label" in r.getMessage()]
        assert bool(said) == warned, said
        assert all("give a node a label edge (gates[0][t])" in m for m in said)


def test_a_missing_teacher_is_named_before_the_data_loads(tmp_path, monkeypatch):
    from ktg_fast.nodes import TeacherNotFoundError

    def no_data(self):
        raise AssertionError("the data was loaded before the teacher was checked")

    monkeypatch.setattr(Trainer, "_load_data", no_data)
    graph = preset("kd", model="resnet8", teacher="resnet14")
    trainer = Trainer(graph, synth(), small(), tmp_path / "run", teacher_dir=tmp_path / "t", progress=False)
    with pytest.raises(TeacherNotFoundError, match=r"no pre-trained resnet14 for synthetic at .*python -m "
                                                   r"ktg_fast.pretrain --model resnet14"):
        trainer.run()
    assert not (tmp_path / "run").exists()


def test_a_closed_stdout_pipe_ends_quietly():
    """``python -m ktg_fast.search export ... | head -3``: no "error: Broken pipe", the status of SIGPIPE."""
    code = ("from ktg_fast.cli_common import run_cli\n"
            "def main():\n    for i in range(200000):\n        print('line', i)\n    return 0\n"
            "run_cli(main)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.readline() == b"line 0\n"
    p.stdout.close()  # as head does after its lines
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and err == "", err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_export_top_below_one_is_refused(tmp_path, capsys, value):
    from ktg_fast.search import cli as search_cli

    with pytest.raises(SystemExit) as exc:
        search_cli.main(["export", "--out", str(tmp_path), "--top", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument --top: must be at least 1, got {value}" in err
    assert "every image" not in err
