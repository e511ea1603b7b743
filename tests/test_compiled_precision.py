"""bf16 under the compiled step, and a short bf16 training on real data, against fp32 on the CPU.

Apart from tests/test_compiled_step.py (whose helpers, tolerances and Inductor cache it uses) so that the
two test workers share the compile-heavy tests (pytest-xdist gives whole files to one worker).
bf16 against fp32: measured <= 3e-3 after 5 steps at lr 0.01; the bound is 1e-2.
"""
from __future__ import annotations

import copy

import pytest
import torch

from ktg_fast.graph import preset
from ktg_fast.recipe import TrainConfig
from ktg_fast.steps import CompiledStep, EagerStep

from test_compiled_step import CFG, FASHION, STEPS, assert_states_close, batches, build, max_diff, mixed_graph

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_bf16_compiled_stays_within_tolerance_of_fp32(compile_cache) -> None:
    """bf16 (autocast forward, fp32 loss and weights) within 1e-2 of fp32 after 5 steps, and visibly bf16."""
    graph = mixed_graph()
    nets = build(graph)
    ref, ref16 = copy.deepcopy(nets), copy.deepcopy(nets)
    step = CompiledStep(graph, nets, CFG, precision="bf16")
    fp32, eager16 = EagerStep(graph, ref, CFG), EagerStep(graph, ref16, CFG, precision="bf16")
    for k, (x, y) in enumerate(batches()):
        loss, logits = step(x, y, k / STEPS)
        l32, _ = fp32(x, y, k / STEPS)
        eager16(x, y, k / STEPS)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        torch.testing.assert_close(loss, l32, rtol=2e-2, atol=2e-2)
    assert step.kind == "compiled"
    assert all(p.dtype == torch.float32 for net in step.nets for p in net.state_dict().values()
               if p.is_floating_point())  # weights and BatchNorm statistics stay fp32
    assert_states_close(step.nets, fp32.nets, 1e-2)
    assert max_diff(step.nets, fp32.nets) > 1e-5  # autocast really ran (fp32 paths agree to ~1e-6 here)
    assert_states_close(step.nets, eager16.nets, 1e-2)  # the eager step's bf16 is the same computation


# ------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_bf16_reaches_fp32_accuracy(tmp_path) -> None:
    """A short Fashion-MNIST DML run (2 x resnet8) in bf16 ends within 2 points of the same run in fp32."""
    from ktg_fast.data import DataSpec
    from ktg_fast.trainer import Trainer

    data = DataSpec("fashion-mnist", val_size=2000, train_subset=4096, eval_subset=2000, loader="torch")
    acc = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(epochs=2, batch_size=64, lr=0.1, seed=0, precision=precision)  # the recipe's field
        t = Trainer(preset("dml", nodes=2, model="resnet8"), data, cfg, tmp_path / precision, device="cpu",
                    step="eager", progress=False)
        final = t.run()
        assert t.train_step.precision == precision and final["precision"] == precision
        acc[precision] = final["val_acc"]
    assert min(acc["fp32"]) > 60.0, acc  # it learned (chance is 10 %)
    for node in range(2):
        assert acc["bf16"][node] >= acc["fp32"][node] - 2.0, acc
