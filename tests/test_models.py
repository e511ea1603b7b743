"""Tests of ktg_fast.models: shapes, sizes, initialisation, names, registry, vmap, gradients."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ktg_fast.models import (
    BasicBlock,
    CifarResNet,
    UnknownModelError,
    WideResNet,
    available_models,
    canonical_model_name,
    get_model,
    is_model,
    register_model,
    unregister_model,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ["resnet8", "wrn10_1", "resnet20", "wrn16_2"])
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28), (3, 64)])
def test_output_shape(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=7, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet32", "wrn28_2"])
def test_paper_models_forward(name: str) -> None:
    model = get_model(name, num_classes=100).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)


def test_odd_spatial_sizes_match_between_shortcut_and_conv() -> None:
    # 28 -> 14 -> 7 -> 4: the stride-2 subsample and stride-2 conv must agree on odd sizes.
    model = get_model("resnet8", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 13, 13)).shape == (2, 3)


# ---------------------------------------------------------------- sizes and structure


@pytest.mark.parametrize(
    "name,lo,hi",
    [("resnet32", 0.46e6, 0.48e6), ("resnet110", 1.70e6, 1.75e6), ("wrn28_2", 1.46e6, 1.49e6)],
)
def test_parameter_counts_at_100_classes(name: str, lo: float, hi: float) -> None:
    assert lo <= n_params(get_model(name, num_classes=100)) <= hi


@pytest.mark.parametrize("depth", [8, 20, 56])
def test_resnet_is_6n_plus_2_layers_with_parameter_free_shortcuts(depth: int) -> None:
    model = get_model(f"resnet{depth}", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth
    assert all(c.kernel_size == (3, 3) for c in convs)  # no 1x1 projection shortcuts


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    block = BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 9, 9)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 5, 5)
    kept = x[:, :, ::2, ::2]
    # The 16 input channels appear once, unchanged; the 16 added channels are exactly zero.
    inner = s[:, 8:24]
    torch.testing.assert_close(inner, kept, rtol=0, atol=0)
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("depth,k,n_1x1", [(28, 2, 3), (16, 4, 3), (10, 1, 2)])
def test_wrn_structure(depth: int, k: int, n_1x1: int) -> None:
    model = get_model(f"wrn{depth}_{k}", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == depth - 3  # stem + 2 per block
    assert sum(c.kernel_size == (1, 1) for c in convs) == n_1x1  # projections where shape changes
    assert model.fc.in_features == 64 * k
    assert max(c.out_channels for c in convs) == 64 * k


# ---------------------------------------------------------------- initialisation


def test_resnet_init_statistics() -> None:
    torch.manual_seed(0)
    model = get_model("resnet110", num_classes=100)
    w = model.blocks[-1].conv2.weight  # 64 x 64 x 3 x 3 = 36,864 weights
    expected = math.sqrt(2.0 / (3 * 3 * 64))
    assert abs(w.std().item() / expected - 1) < 0.03
    assert abs(w.mean().item()) < 0.05 * expected
    first = model.conv1.weight  # std depends on out_channels only, not in_channels
    assert abs(first.std().item() / math.sqrt(2.0 / (9 * 16)) - 1) < 0.2
    fc = model.fc.weight  # Kaiming-normal: std sqrt(2 / fan_in) with fan_in 64
    assert abs(fc.std().item() / math.sqrt(2.0 / 64) - 1) < 0.05
    assert (model.fc.bias == 0).all()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()


def test_wrn_init_statistics() -> None:
    torch.manual_seed(0)
    model = get_model("wrn28_2", num_classes=100)
    w = model.blocks[-1].conv2.weight  # 128 x 128 x 3 x 3
    assert abs(w.std().item() / math.sqrt(2.0 / (9 * 128)) - 1) < 0.02
    proj = model.blocks[-4].shortcut.weight  # first block of stage 3: 1x1, 64 -> 128
    assert proj.shape == (128, 64, 1, 1)
    assert abs(proj.std().item() / math.sqrt(2.0 / 128) - 1) < 0.05
    assert (model.fc.bias == 0).all()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()


def test_same_seed_same_weights() -> None:
    torch.manual_seed(3)
    a = get_model("resnet8", num_classes=10)
    torch.manual_seed(3)
    b = get_model("resnet8", num_classes=10)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "spelling,canonical",
    [
        ("resnet32", "resnet32"),
        ("ResNet32", "resnet32"),
        ("resnet-32", "resnet32"),
        ("RESNET_110", "resnet110"),
        (" resnet8 ", "resnet8"),
        ("resnet1202", "resnet1202"),
        ("wrn28_2", "wrn28_2"),
        ("WRN-28-2", "wrn28_2"),
        ("wrn_28_2", "wrn28_2"),
        ("WRN-16-8", "wrn16_8"),
        ("wide_resnet28_10", "wrn28_10"),
        ("WideResNet-10-1", "wrn10_1"),
    ],
)
def test_canonical_model_name(spelling: str, canonical: str) -> None:
    assert canonical_model_name(spelling) == canonical
    assert is_model(spelling)


def test_pattern_names_build_the_right_architecture() -> None:
    r = get_model("ResNet-14", num_classes=5)
    assert isinstance(r, CifarResNet) and r.depth == 14
    w = get_model("WRN-16-3", num_classes=5)
    assert isinstance(w, WideResNet) and (w.depth, w.widen_factor) == (16, 3)


def test_available_models_lists_paper_models_and_patterns() -> None:
    names = available_models()
    for n in ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "wrn28_2"):
        assert n in names
    assert names[-2:] == ["resnet{6n+2}", "wrn{6n+4}_{k}"]
    assert names.index("resnet8") < names.index("resnet20") < names.index("resnet110")


def test_unknown_name_raises_key_error_with_help() -> None:
    with pytest.raises(KeyError) as info:
        get_model("vgg16", num_classes=10)
    assert isinstance(info.value, UnknownModelError)
    msg = str(info.value)
    assert "'vgg16'" in msg and "resnet32" in msg and "wrn{6n+4}_{k}" in msg and "register_model" in msg
    assert not is_model("vgg16")


@pytest.mark.parametrize(
    "name,needle",
    [("resnet33", "6n+2"), ("resnet2", "6n+2"), ("wrn27_2", "6n+4"), ("wrn28_0", "widen factor"), ("wrn28", "widen factor")],
)
def test_bad_depth_or_width_raises_value_error(name: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
        get_model(name, num_classes=10)
    assert not is_model(name)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 10, "in_channels": 0}, {"num_classes": 2.5}])
def test_bad_sizes_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="positive int"):
        get_model("resnet8", **kwargs)


def test_non_string_name_raises_type_error() -> None:
    with pytest.raises(TypeError, match="str"):
        canonical_model_name(32)  # type: ignore[arg-type]
    assert not is_model(32)  # type: ignore[arg-type]


def test_constructor_kwargs_pass_through() -> None:
    torch.manual_seed(0)
    model = get_model("wrn10_1", num_classes=4, dropout=0.5)
    assert all(b.dropout == 0.5 for b in model.blocks)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))  # dropout active in training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    assert all(b.dropout == 0.0 for b in get_model("wrn28_2", num_classes=4).blocks)  # paper default
    with pytest.raises(ValueError, match="dropout"):
        get_model("wrn10_1", num_classes=4, dropout=1.5)


# ---------------------------------------------------------------- custom registration


@pytest.fixture
def tiny_registered():
    @register_model("TinyCNN")
    def tinycnn(*, num_classes: int, in_channels: int = 3, width: int = 8) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(width, num_classes),
        )

    yield tinycnn
    unregister_model("tinycnn")


def test_custom_model_by_name(tiny_registered) -> None:
    assert "tinycnn" in available_models()
    assert is_model("TINYCNN") and canonical_model_name("TinyCNN") == "tinycnn"
    model = get_model("tinycnn", num_classes=6, in_channels=1, width=5)
    assert model[0].out_channels == 5 and model[0].in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 6)
    with pytest.raises(ValueError, match="already registered"):
        register_model("tinycnn")(tiny_registered)
    register_model("tinycnn", overwrite=True)(tiny_registered)  # explicit replacement is fine


def test_unregister() -> None:
    register_model("scratch_net")(lambda *, num_classes, in_channels=3: nn.Linear(in_channels, num_classes))
    assert is_model("scratch_net")
    unregister_model("scratch_net")
    assert not is_model("scratch_net")
    with pytest.raises(KeyError):
        unregister_model("scratch_net")
    with pytest.raises(ValueError, match="built-in"):
        unregister_model("resnet32")


def test_registration_errors() -> None:
    with pytest.raises(ValueError, match="must start with a letter"):
        register_model("32net")
    with pytest.raises(TypeError, match="callable"):
        register_model("notcallable")(42)  # type: ignore[arg-type]
    register_model("returns_none")(lambda *, num_classes, in_channels=3: None)
    try:
        with pytest.raises(TypeError, match="not an nn.Module"):
            get_model("returns_none", num_classes=2)
    finally:
        unregister_model("returns_none")


# ---------------------------------------------------------------- vmap and gradients


def _vmapped(models: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")  # structure only; weights come from the stacks

    def run(p, b, inp):
        return functional_call(base, (p, b), (inp,))

    return vmap(run, in_dims=(0, 0, None))(params, buffers, x), buffers


@pytest.mark.parametrize("name", ["resnet8", "wrn10_1"])
def test_vmap_over_stacked_copies_matches_each_model_eval(name: str) -> None:
    torch.manual_seed(0)
    models = [get_model(name, num_classes=10).eval() for _ in range(2)]
    for m in models:  # non-trivial running statistics so eval-mode BN matters
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 20, 20)
    out, _ = _vmapped(models, x)
    with torch.no_grad():
        ref = torch.stack([m(x) for m in models])
    assert out.shape == (2, 4, 10)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1])  # the copies really differ


def test_vmap_train_mode_updates_stacked_batchnorm_buffers() -> None:
    # What a fused node group relies on: train-mode BN under vmap with stacked buffers.
    torch.manual_seed(1)
    models = [get_model("resnet8", num_classes=10).train() for _ in range(2)]
    x = torch.randn(4, 3, 16, 16)
    out, buffers = _vmapped(models, x)
    ref = torch.stack([m(x) for m in models])  # updates each model's own buffers once
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for key in ("bn1.running_mean", "blocks.2.bn2.running_var"):
        stacked = torch.stack([dict(m.named_buffers())[key] for m in models])
        torch.testing.assert_close(buffers[key], stacked)
    assert (buffers["bn1.num_batches_tracked"] == 1).all()


@pytest.mark.parametrize("name", ["resnet8", "wrn10_1"])
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=10).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
