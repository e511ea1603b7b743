"""Models by name: built-in CIFAR ResNets and Wide ResNets, plus user-registered ones.

Names are case-insensitive.  Besides the registered names, two patterns build
any depth: ``resnet{6n+2}`` (e.g. ``resnet8``, ``resnet1202``) and
``wrn{6n+4}_{k}`` (e.g. ``wrn28_2``, ``wrn10_1``).  Friendly spellings such as
``ResNet-32``, ``WRN-28-2`` or ``wide_resnet28_10`` are accepted.

Pattern names are bounded (:data:`MAX_RESNET_DEPTH`, :data:`MAX_WRN_DEPTH`,
:data:`MAX_WRN_WIDEN`) so that a typo such as ``resnet99999998`` is refused
at once instead of exhausting memory; build a bigger network yourself and
register it with :func:`register_model`.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from torch import nn

from .resnet import CifarResNet, resnet_blocks_per_stage
from .wide_resnet import WideResNet, wrn_blocks_per_stage

__all__ = [
    "MAX_RESNET_DEPTH",
    "MAX_WRN_DEPTH",
    "MAX_WRN_WIDEN",
    "ModelFactory",
    "UnknownModelError",
    "available_models",
    "canonical_model_name",
    "get_model",
    "is_model",
    "register_model",
    "unregister_model",
]


# A factory: ``fn(*, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module``.
ModelFactory = Callable[..., nn.Module]


class UnknownModelError(KeyError):
    """A model name that is neither registered nor one of the patterns."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


RESNET_PATTERN = "resnet{6n+2}"
WRN_PATTERN = "wrn{6n+4}_{k}"
_RESNET_RE = re.compile(r"^resnet[-_ ]?(\d+)$")
_WRN_RE = re.compile(r"^(?:wrn|wide[-_ ]?resnet)[-_ ]?(\d+)[-_ x](\d+)$")
_WRN_NO_K_RE = re.compile(r"^(?:wrn|wide[-_ ]?resnet)[-_ ]?(\d+)$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_.\-]*$")

# Bounds of the pattern names: resnet1202 is the deepest CIFAR ResNet of He et al.
# (19 M parameters); wrn100_16 has about 400 M parameters (1.6 GB of fp32 weights).
MAX_RESNET_DEPTH = 1202
MAX_WRN_DEPTH = 100
MAX_WRN_WIDEN = 16

_FACTORIES: dict[str, ModelFactory] = {}
_BUILTIN: set[str] = set()


def register_model(name: str, *, overwrite: bool = False) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``factory(*, num_classes, in_channels=3, **kwargs) -> nn.Module`` as ``name``.

    Example::

        @register_model("tinycnn")
        def tinycnn(*, num_classes: int, in_channels: int = 3) -> nn.Module:
            return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, num_classes))

    Names are stored lower case.  A registered name takes precedence over the
    ``resnet``/``wrn`` patterns; replacing an existing name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name.strip().lower()):
        raise ValueError(
            f"model name {name!r} must start with a letter and contain only letters, digits, '_', '-' or '.'"
        )
    key = name.strip().lower()

    def decorator(factory: ModelFactory) -> ModelFactory:
        if not callable(factory):
            raise TypeError(f"register_model({name!r}) must decorate a callable factory, got {factory!r}")
        if key in _FACTORIES and not overwrite:
            raise ValueError(
                f"a model named {key!r} is already registered; pass overwrite=True to replace it"
            )
        _FACTORIES[key] = factory
        _BUILTIN.discard(key)
        return factory

    return decorator


def unregister_model(name: str) -> None:
    """Remove a user-registered model (built-in names cannot be removed)."""
    key = name.strip().lower()
    if key in _BUILTIN:
        raise ValueError(f"built-in model {key!r} cannot be removed")
    if key not in _FACTORIES:
        raise _unknown(name)
    del _FACTORIES[key]


def available_models() -> list[str]:
    """Registered names (natural order: resnet8 before resnet20) then the patterns ``resnet{6n+2}``, ``wrn{6n+4}_{k}``."""
    return sorted(_FACTORIES, key=_natural_key) + [RESNET_PATTERN, WRN_PATTERN]


def _natural_key(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _unknown(name: object) -> UnknownModelError:
    return UnknownModelError(
        f"unknown model {name!r}; known models: {', '.join(available_models())}. "
        "To add one, decorate a factory fn(*, num_classes, in_channels=3) -> nn.Module "
        "with @ktg_fast.models.register_model('name')."
    )


def canonical_model_name(name: str) -> str:
    """The canonical spelling of a model name: ``"ResNet-32"`` -> ``"resnet32"``, ``"WRN-28-2"`` -> ``"wrn28_2"``.

    Raises:
        KeyError (:class:`UnknownModelError`): neither registered nor a pattern.
        ValueError: a pattern with an impossible depth or width (``resnet33``, ``wrn27_2``), or
            one over the bounds (:data:`MAX_RESNET_DEPTH`, :data:`MAX_WRN_DEPTH`, :data:`MAX_WRN_WIDEN`).
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _FACTORIES:
        return key
    if m := _RESNET_RE.match(key):
        depth = _bounded(name, m.group(1), MAX_RESNET_DEPTH, "a CIFAR ResNet's depth", f"resnet{MAX_RESNET_DEPTH}")
        resnet_blocks_per_stage(depth)  # raises ValueError on a bad depth
        return f"resnet{depth}"
    if m := _WRN_RE.match(key):
        best = f"wrn{MAX_WRN_DEPTH}_{MAX_WRN_WIDEN}"
        depth = _bounded(name, m.group(1), MAX_WRN_DEPTH, "a Wide ResNet's depth", best)
        k = _bounded(name, m.group(2), MAX_WRN_WIDEN, "a Wide ResNet's widen factor k", best)
        wrn_blocks_per_stage(depth, k)
        return f"wrn{depth}_{k}"
    if m := _WRN_NO_K_RE.match(key):
        raise ValueError(
            f"model name {name!r} lacks the widen factor k: write wrn{{depth}}_{{k}}, e.g. wrn{m.group(1)}_2"
        )
    raise _unknown(name)


def _bounded(name: str, digits: str, limit: int, what: str, largest: str) -> int:
    """``int(digits)``, or a ValueError naming ``limit`` when it is larger (checked before converting huge strings)."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(limit)) or int(digits) > limit:
        shown = digits if len(digits) <= 12 else f"{digits[:6]}... ({len(digits)} digits)"
        short = name if len(name) <= 40 else name[:37] + "..."
        raise ValueError(
            f"model {short!r}: {what} is at most {limit} in the registry's names (up to {largest}), "
            f"got {shown}; for a bigger network build it yourself and add it with "
            "@ktg_fast.models.register_model('name')"
        )
    return int(digits)


def is_model(name: str) -> bool:
    """Whether ``name`` resolves to a model (registered, or a pattern with a valid depth)."""
    try:
        canonical_model_name(name)
    except (KeyError, ValueError, TypeError):
        return False
    return True


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def get_model(name: str, *, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: a registered name or pattern, any friendly spelling (see :func:`canonical_model_name`).
        num_classes: size of the output logits.
        in_channels: image channels (3 RGB, 1 grayscale).
        **kwargs: passed to the constructor, e.g. ``dropout=0.3`` for a Wide ResNet.

    Returns:
        An ``nn.Module`` whose ``forward(x)`` maps (B, in_channels, H, W) to (B, num_classes).
    """
    num_classes = _positive_int(num_classes, "num_classes")
    in_channels = _positive_int(in_channels, "in_channels")
    key = canonical_model_name(name)
    if key in _FACTORIES:
        model = _FACTORIES[key](num_classes=num_classes, in_channels=in_channels, **kwargs)
    else:
        model = _build_pattern(key, num_classes, in_channels, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory of model {key!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _build_pattern(key: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    """Build a canonical pattern name (``resnet{d}`` or ``wrn{d}_{k}``)."""
    if m := _RESNET_RE.match(key):
        return CifarResNet(int(m.group(1)), num_classes, in_channels, **kwargs)
    m = _WRN_RE.match(key)
    assert m is not None, key  # canonical_model_name only returns registered or pattern names
    return WideResNet(int(m.group(1)), int(m.group(2)), num_classes, in_channels, **kwargs)


def _builtin(name: str) -> None:
    """Register a pattern name explicitly so it shows in :func:`available_models`."""

    def factory(*, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        return _build_pattern(name, num_classes, in_channels, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"Built-in {name}."
    register_model(name)(factory)
    _BUILTIN.add(name)


# The models of the paper (and resnet8, a tiny one for tests and smoke runs).
for _name in ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "wrn16_2", "wrn28_2", "wrn40_2"):
    _builtin(_name)
del _name
