"""Simultaneous training (Algorithm 1), schedules, checkpoints, exact resume, NaN stops, pretraining."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ktg_fast as kf
from ktg_fast.graph import Graph, Node, preset
from ktg_fast.models import get_model
from ktg_fast.recipe import TrainConfig, default_milestones, lr_at_epoch, make_optimizer
from ktg_fast.steps import EagerStep
from ktg_fast.data import DataSpec
from ktg_fast.io import CheckpointError
from ktg_fast.trainer import NonFiniteLossError, RunExistsError, Trainer

from helpers import exploding_model, small_config, synthetic_data

REPO = Path(__file__).resolve().parents[1]


def small_cfg(**kw):
    return small_config(**{"epochs": 2, **kw})


synth = synthetic_data


def test_recipe_defaults_and_schedule():
    assert default_milestones("cifar100", 200) == [60, 120, 180]
    assert default_milestones("tiny-imagenet", 80) == [40, 60, 70]
    assert default_milestones("cifar10", 10) == [3, 6, 9]
    assert default_milestones("cifar10", 1) == []
    assert lr_at_epoch(0.1, 59, [60, 120, 180], 0.1) == 0.1
    assert lr_at_epoch(0.1, 60, [60, 120, 180], 0.1) == pytest.approx(0.01)
    assert lr_at_epoch(0.1, 199, [60, 120, 180], 0.1) == pytest.approx(1e-4)
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.batch_size) == (0.1, 0.9, True, 5e-4, 64)
    with pytest.raises(ValueError, match="epochs must be"):
        TrainConfig(epochs=0).validate()


def test_simultaneous_step_equals_per_node_optimizers():
    """One step of the whole graph == per-node losses, each with its own optimizer, on the same outputs."""
    torch.manual_seed(0)
    graph = Graph([Node("resnet8"), Node("resnet8"), Node("wrn10_1")],
                  [["cutoff", "through", "linear", "through"],
                   ["cutoff", "cutoff", "through", "correct"],
                   ["cutoff", "through", "cutoff", "through"],
                   ["cutoff", "linear", "through", "cutoff"]], temperature=2.0)
    nets = [get_model(n.model, num_classes=10) for n in graph.nodes]
    ref = copy.deepcopy(nets)
    cfg = small_cfg()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    progress = torch.tensor(0.3)
    step = EagerStep(graph, nets, cfg)
    for _ in range(3):
        step(x, y, progress)

    opts = [make_optimizer([list(n.parameters())], [cfg.lr], cfg) for n in ref]
    for _ in range(3):
        for n in ref:
            n.train()
        logits = torch.stack([n(x) for n in ref])
        res = kf.graph_loss(logits, y, graph.gates, temperature=2.0, progress=progress)
        for t, opt in enumerate(opts):
            opt.zero_grad()
            res.node_loss[t].backward(retain_graph=True)
        for opt in opts:
            opt.step()
    for a, b in zip(nets, ref):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)


def test_training_learns_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    t = Trainer(preset("dml", nodes=2, model="resnet8"), synth(val_size=200, train_subset=640, eval_subset=200),
                small_cfg(epochs=2), out, step="eager", progress=False)
    final = t.run()
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert len(final["val_acc"]) == 2 and len(final["test_acc"]) == 2
    assert min(final["test_acc"]) > 30.0  # 10 classes: chance is 10 %
    assert (out / "checkpoint.pt").exists() and (out / "graph.yaml").exists()
    assert Graph.load(out / "graph.yaml") == preset("dml", nodes=2, model="resnet8")
    # The saved node reproduces the reported accuracy.
    net = get_model("resnet8", num_classes=10)
    from ktg_fast.nodes import load_model_checkpoint

    ckpt = load_model_checkpoint(out / "nodes" / "node1_resnet8.pt", net)
    assert ckpt["test_acc"] == final["test_acc"][0]
    # Killed after the last checkpoint, before final.json, mid-way through a metrics line: resume finishes.
    (out / "final.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "trai')
    again = Trainer(preset("dml", nodes=2, model="resnet8"), synth(val_size=200, train_subset=640, eval_subset=200),
                    small_cfg(epochs=2), out, step="eager", progress=False).run(resume=True)
    assert again["test_acc"] == final["test_acc"] and (out / "final.json").exists()
    # The cut line is dropped and nothing was retrained.
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(RunExistsError, match="--resume"):
        Trainer(preset("dml", nodes=2, model="resnet8"), synth(val_size=200, train_subset=384), small_cfg(), out,
                progress=False).run()


def test_linear_gate_progress_runs_from_1_over_kend_to_1(tmp_path):
    seen = []
    kf.register_gate("spy", lambda ctx: (seen.append(float(ctx.progress)), 1.0)[1])
    try:
        g = Graph([Node("resnet8")], [["cutoff", "spy"], ["cutoff", "cutoff"]])
        t = Trainer(g, synth(train_subset=128), small_cfg(epochs=2, batch_size=32), tmp_path / "r",
                    step="eager", progress=False)
        t.run()
    finally:
        kf.gates.unregister_gate("spy")
    k_end = 2 * 4
    assert seen == pytest.approx([k / k_end for k in range(1, k_end + 1)])


def test_step_choice_weighs_the_expected_steps_not_the_budget(tmp_path, monkeypatch):
    """A pruned search trial trains far fewer steps than its epoch budget: the step choice (compile or not)
    sees the expected steps; the linear gate's schedule still runs over the whole budget."""
    from ktg_fast import trainer as trainer_mod

    seen, make_step = [], trainer_mod.make_step

    def spy(*args, **kwargs):
        seen.append(kwargs["total_steps"])
        return make_step(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "make_step", spy)
    monkeypatch.setattr(trainer_mod.Trainer, "run", lambda self, resume=False: self._load_data() or self._build())
    g = preset("dml", models=["resnet8", "resnet8"])
    for expected, steps in ((None, 10 * 4), (2.5, 10), (0.1, 1), (50, 10 * 4)):  # 4 iterations per epoch
        t = Trainer(g, synth(train_subset=128), small_cfg(epochs=10), tmp_path / f"r{expected}", step="eager",
                    progress=False, expected_epochs=expected)
        t.run()
        assert seen[-1] == steps and t.k_end == 10 * 4


def test_nan_loss_names_node_and_step(tmp_path):
    with exploding_model(from_call=3):
        g = Graph([Node("resnet8"), Node("exploding")],
                  [["cutoff", "through", "through"], ["cutoff", "cutoff", "cutoff"], ["cutoff", "cutoff", "cutoff"]])
        g.gates[0][2] = "through"
        g.validate()
        t = Trainer(g, synth(train_subset=256), small_cfg(epochs=1, check_every=2), tmp_path / "r",
                    step="eager", progress=False)
        with pytest.raises(NonFiniteLossError, match=r"step 3 \(epoch 1\) in node 2 \(exploding\)"):
            t.run()


def _cli(args, env=None, check=True):
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-m", "ktg_fast.train", *args], capture_output=True, text=True, env=e,
                       cwd=REPO, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def _weights(run_dir):
    ckpt = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)
    return ckpt["nets"], ckpt["momentum"]


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    # On the CPU even on a GPU machine: bit-identical weights after resume need deterministic kernels,
    # which cuDNN's autotuned convolutions are not.
    args = ["--graph", "dml", "--model", "resnet8", "--dataset", "synthetic", "--train-subset", "256",
            "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--loader", "torch", "--no-progress",
            "--step", "eager", "--device", "cpu"]
    _cli(args + ["--out", str(tmp_path / "full")])
    # 8 steps per epoch: kill in the middle of epoch 2 with a real SIGKILL.
    r = subprocess.run([sys.executable, str(REPO / "tests" / "sigkill_at_step.py"), "12", "ktg_fast.train", *args,
                        "--out", str(tmp_path / "cut")], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == -9, r.stderr
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1
    _cli(args + ["--out", str(tmp_path / "cut"), "--resume"])
    (a_nets, a_mom), (b_nets, b_mom) = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for sa, sb in zip(a_nets, b_nets):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    for ma, mb in zip(a_mom, b_mom):
        for k in ma:
            assert torch.equal(ma[k], mb[k]), k
    full = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_acc"] for r in full] == [r["test_acc"] for r in cut]


def test_cli_seeds_table_and_errors(tmp_path):
    out = tmp_path / "multi"
    r = _cli(["--graph", "dml", "--model", "resnet8", "--dataset", "synthetic", "--train-subset", "128",
              "--epochs", "1", "--batch-size", "32", "--seeds", "0", "1", "--out", str(out), "--no-progress",
              "--loader", "torch"])
    finals = [json.loads((out / f"seed{s}" / "final.json").read_text()) for s in (0, 1)]
    table = (out / "results.md").read_text()
    assert table in r.stdout
    import statistics

    for t in (0, 1):
        vals = [f["test_acc"][t] for f in finals]
        assert f"{statistics.fmean(vals):.2f} +- {statistics.stdev(vals):.2f}" in table.splitlines()[2 + t]

    bad = _cli(["--graph", "dlm", "--dataset", "synthetic", "--out", str(tmp_path / "x")], check=False)
    assert bad.returncode == 2 and "'dlm' is neither a graph preset (vanilla, dml, kd)" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli(["--graph", "dml", "--dataset", "cifar10", "--data-root", str(tmp_path / "nodata"),
                "--out", str(tmp_path / "y")], check=False)
    assert bad.returncode == 2 and str(tmp_path / "nodata") in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli(["--graph", "kd", "--model", "resnet8", "--teacher", "resnet8", "--dataset", "synthetic",
                "--teachers", str(tmp_path / "t"), "--out", str(tmp_path / "z")], check=False)
    assert bad.returncode == 2 and "python -m ktg_fast.pretrain --model resnet8" in bad.stderr


def test_pretrain_then_kd_keeps_teacher_frozen(tmp_path):
    from ktg_fast.teachers import pretrain_teacher

    teachers = tmp_path / "teachers"
    path = pretrain_teacher("resnet8", synth(train_subset=256), small_cfg(epochs=1), teacher_dir=teachers,
                            step="eager", progress=False)
    assert path == teachers / "synthetic" / "resnet8.pt"
    before = torch.load(path, weights_only=True)["state_dict"]
    g = preset("kd", model="resnet8", teacher="resnet8")
    t = Trainer(g, synth(train_subset=256), small_cfg(epochs=1), tmp_path / "kd", step="eager",
                teacher_dir=teachers, progress=False)
    t.run()
    after = t.train_step.nets[1].state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k].cpu()), k  # weights and BatchNorm statistics untouched
    assert not t.train_step.nets[1].training


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_end_to_end(tmp_path):
    """Real data: DML of two small ResNets on a Fashion-MNIST subset learns well above chance."""
    data = DataSpec("fashion-mnist", val_size=1000, train_subset=2048, eval_subset=1000, loader="torch")
    final = Trainer(preset("dml", nodes=2, model="resnet8"), data, small_cfg(epochs=2, batch_size=64, lr=0.1),
                    tmp_path / "fm", progress=False).run()
    assert final["val_acc"][0] > 60.0 and final["test_acc"][1] > 60.0  # chance is 10 %


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_tiny_imagenet_folder_trains_through_each_loader(tmp_path, loader):
    """Image folders reach the trainer as files (DALI decodes them) or decoded in memory."""
    import numpy as np

    from ktg_fast.data import dali_status
    from test_data import write_tiny_imagenet

    if loader == "dali" and not dali_status()[0]:
        pytest.skip(dali_status()[1])
    write_tiny_imagenet(tmp_path / "data", np.random.default_rng(0), per_class=6)
    data = DataSpec("tiny-imagenet", root=str(tmp_path / "data"), loader=loader)
    t = Trainer(preset("vanilla", model="resnet8"), data, small_cfg(epochs=1, batch_size=6), tmp_path / "run",
                step="eager", progress=False)
    final = t.run()
    assert t.loader_kind == loader and t.num_classes == 3 and t.in_channels == 3
    assert len(final["test_acc"]) == 1  # the labelled val folder serves as the test split
    assert final["step"] == 3  # 18 images, batch 6, last incomplete batch dropped


def test_cli_precision_flag_reaches_the_step(tmp_path):
    """--precision bf16: the forward runs in bf16 (recorded in final.json), weights stay fp32."""
    out = tmp_path / "bf16"
    _cli(["--graph", "dml", "--model", "resnet8", "--dataset", "synthetic", "--train-subset", "64", "--epochs", "1",
          "--batch-size", "32", "--out", str(out), "--no-progress", "--loader", "torch", "--device", "cpu",
          "--step", "fused", "--precision", "bf16"])
    final = json.loads((out / "final.json").read_text())
    assert final["precision"] == "bf16" and final["step_path"] == "fused"
    nets, _ = _weights(out)
    assert all(v.dtype == torch.float32 for sd in nets for v in sd.values() if v.is_floating_point())
    r = _cli(["--graph", "dml", "--model", "resnet8", "--dataset", "synthetic", "--out", str(tmp_path / "x"),
              "--precision", "fp8"], check=False)
    assert r.returncode == 2 and "--precision" in r.stderr


def test_fp16_on_the_cpu_warns_that_it_is_slow(tmp_path):
    """fp16 on the CPU is emulated on most processors (many times slower than fp32): said once, with
    what to use instead; bf16 and fp32 say nothing, nor does fp16 on CUDA."""
    from ktg_fast.steps import precision_warning

    msg = precision_warning("cpu", "fp16")
    assert msg and "use bf16" in msg and "or fp32" in msg
    assert precision_warning("cpu", "bf16") is None and precision_warning("cpu", "fp32") is None
    assert precision_warning("cuda", "fp16") is None
    r = _cli(["--graph", "vanilla", "--model", "resnet8", "--dataset", "synthetic", "--train-subset", "32",
              "--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "fp16"), "--no-progress", "--device",
              "cpu", "--step", "eager", "--precision", "fp16", "--seeds", "0", "1"])  # said once, not per seed
    assert r.stderr.count("--precision fp16 on the CPU is usually many times slower than fp32") == 1, r.stderr


def test_checkpoint_of_an_earlier_version_still_resumes(tmp_path):
    """A checkpoint whose recipe lacks fields added since (precision, channels_last) and holds one
    removed since (extra) resumes; a real difference is still refused."""
    args = ["--graph", "dml", "--model", "resnet8", "--dataset", "synthetic", "--train-subset", "64",
            "--epochs", "1", "--batch-size", "32", "--loader", "torch", "--no-progress", "--device", "cpu",
            "--step", "eager", "--out", str(tmp_path / "r")]
    _cli(args)
    ck_path = tmp_path / "r" / "checkpoint.pt"
    ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    cfg = ck["fingerprint"]["config"]
    cfg.pop("precision"), cfg.pop("channels_last")
    cfg["extra"] = {}
    torch.save(ck, ck_path)
    r = _cli(args + ["--resume"], check=False)
    assert r.returncode == 0, r.stderr
    r = _cli(args + ["--resume", "--lr", "0.2"], check=False)
    assert r.returncode == 2 and "--lr" in r.stderr


@pytest.mark.parametrize("write_kind,read_kind", [("eager", "fused"), ("fused", "eager")])
def test_fp16_checkpoint_keeps_each_nodes_loss_scale(tmp_path, write_kind, read_kind):
    """fp16: a short run's checkpoint holds each node's loss scale and growth tracker, a resume (on either
    step path) restores them instead of starting at 2^16 again, and a checkpoint without them still loads."""
    g = preset("dml", models=["resnet8", "resnet8"])
    data, cfg = synth(train_subset=64), small_cfg(epochs=1, precision="fp16")
    t = Trainer(g, data, cfg, tmp_path / "r", device="cpu", step=write_kind, progress=False)
    t.run()
    ck_path = tmp_path / "r" / "checkpoint.pt"
    ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    written = t.train_step.loss_scale_state()
    assert set(ck["loss_scale"]) == {"scale", "growth_tracker"}
    for k in written:
        assert torch.equal(ck["loss_scale"][k], written[k]), k
    assert ck["loss_scale"]["scale"].shape == (2,) and ck["loss_scale"]["growth_tracker"].dtype == torch.int32

    def resumed():
        t2 = Trainer(g, data, cfg, tmp_path / "r", device="cpu", step=read_kind, progress=False)
        t2._load_data()
        t2._build()
        assert t2.train_step.loss_scale_state()["scale"].tolist() == [2.0 ** 16] * 2  # fresh before the restore
        assert t2._restore(t2._read_checkpoint()) == (1, 2)
        return t2.train_step.loss_scale_state()

    # Values no fresh scaler has: a resume that dropped them would read 2^16 and 0.
    ck["loss_scale"] = {"scale": torch.tensor([2.0 ** 9, 2.0 ** 13]),
                        "growth_tracker": torch.tensor([3, 1700], dtype=torch.int32)}
    torch.save(ck, ck_path)
    state = resumed()
    assert state["scale"].tolist() == [2.0 ** 9, 2.0 ** 13] and state["growth_tracker"].tolist() == [3, 1700]
    del ck["loss_scale"]  # a checkpoint written before the loss scales were saved
    torch.save(ck, ck_path)
    state = resumed()
    assert state["scale"].tolist() == [2.0 ** 16] * 2 and state["growth_tracker"].tolist() == [0, 0]
    ck["loss_scale"] = {"scale": torch.ones(3), "growth_tracker": torch.zeros(3, dtype=torch.int32)}
    torch.save(ck, ck_path)
    with pytest.raises(CheckpointError, match="loss-scale scale is \\(3,\\), not one value for each of 2 nodes"):
        resumed()


def test_one_seed_table_has_no_std():
    from ktg_fast.graph import preset
    from ktg_fast.report import seeds_table

    graph = preset("dml", models=["resnet8", "resnet8"]).to_dict()
    one = seeds_table([{"graph": graph, "seed": 0, "test_acc": [81.5, 80.25]}])
    assert "of seed 0 (one seed: no std)" in one and "| 81.50 |" in one and "+-" not in one
    two = seeds_table([{"graph": graph, "seed": s, "test_acc": [80.0 + s, 79.0]} for s in (0, 1)])
    assert "over seeds 0, 1" in two and "| 80.50 +- 0.71 |" in two


def test_convolution_autotuning_is_set_for_cuda_runs_only(monkeypatch):
    from ktg_fast.device import autotune_convolutions

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    autotune_convolutions(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    autotune_convolutions(torch.device("cuda", 0))  # a device object needs no GPU
    assert torch.backends.cudnn.benchmark is True


def test_time_estimates_leave_the_compile_out():
    """A first epoch of 100 s of which 90 s compiled: 9 more epochs take 90 s, not 900 s."""
    from ktg_fast.run_files import early_estimate_line, estimate_line

    line = estimate_line(0, 100.0, 10, warmup_s=90.0)
    assert "(1 min 30 s of it compiling or capturing, paid once)" in line and "(10 epochs) takes about 3 min 10 s" in line, line
    plain = estimate_line(0, 100.0, 10)
    assert "paid once" not in plain and "(10 epochs) takes about 16 min 40 s" in plain, plain
    assert "takes about 16 min 40 s" in early_estimate_line(10, 1.0, 1000, 10)  # 10 batches/s, 10 x 1000


def test_durations_read_the_same_everywhere():
    """One formatter: sentences (run logs, export notes) and compact cells (status line, export table)."""
    from ktg_fast.run_files import format_duration

    assert [format_duration(s) for s in (0.25, 42, 425, 16000, 266400)] == \
        ["0.2 s", "42 s", "7 min 5 s", "4 h 26 min", "3 d 2 h"]
    assert [format_duration(s, compact=True) for s in (42, 185, 3725)] == ["42s", "3m05s", "1h02m"]
    assert {format_duration(v, compact=c) for v in (None, float("nan"), float("inf")) for c in (False, True)} == {"?"}


def test_milestones_past_the_last_epoch_are_warned_about(tmp_path, caplog):
    g = preset("dml", models=["resnet8", "resnet8"])
    with caplog.at_level("WARNING", logger="ktg_fast"):
        Trainer(g, synth(train_subset=64), small_cfg(epochs=3, milestones=[2, 3, 5]), tmp_path / "r", progress=False)
    assert "learning-rate milestones 3, 5 never reached in 3 epochs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ktg_fast"):
        Trainer(g, synth(train_subset=64), small_cfg(epochs=3, milestones=[1, 2]), tmp_path / "s", progress=False)
    assert "never reached" not in caplog.text


def test_the_trainer_leaves_a_steps_warm_up_out_of_its_estimate(tmp_path, monkeypatch):
    """A step whose first calls compile (steady_after 2): the epoch-end estimate gets their time as warm-up."""
    import time as time_mod

    from ktg_fast import trainer as trainer_mod

    seen, real_call = [], EagerStep.__call__
    monkeypatch.setattr(EagerStep, "steady_after", 2)

    def slow_first(self, *a, **k):
        self._n = getattr(self, "_n", 0) + 1
        if self._n <= 2:
            time_mod.sleep(0.7)  # "compiling"
        return real_call(self, *a, **k)

    monkeypatch.setattr(EagerStep, "__call__", slow_first)
    monkeypatch.setattr(trainer_mod, "estimate_line", lambda epoch, s, epochs, warmup_s=0.0: seen.append(warmup_s) or "")
    g = preset("dml", models=["resnet8", "resnet8"])
    Trainer(g, synth(train_subset=128), small_cfg(epochs=2), tmp_path / "r", step="eager", progress=False).run()
    assert len(seen) == 1 and 1.4 <= seen[0] < 1.4 + 5.0, seen
