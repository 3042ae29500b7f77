"""Which first layers TrAct can precondition exactly, decided before training starts.

TrAct's closed form assumes the layer computes z = W·x, x being the rows ``unfold`` builds from
the layer's input with the layer's own padding, stride and dilation. That holds for
``nn.Linear`` / ``nn.Conv1d/2d/3d`` themselves and for subclasses that do not override how they
compute their output. A subclass whose ``forward`` (or ``_conv_forward``) is its own may pad its
input differently, or use a transform of W (weight standardisation, fake quantisation): the
statistics would then belong to a different computation, silently. So such a layer is refused
by name, with two exceptions:

- timm's ``Conv2dSame`` (the stems of ``tf_efficientnet_*``, ``tf_mobilenetv3_*`` and others),
  whose forward is exactly a zero TF "SAME" padding of the input followed by a plain convolution.
  ``pads_tf_same`` recognises it (and the TF-SAME padding of timm's ``StdConv2dSame`` /
  ``ScaledStdConv2dSame``), and ``unfold`` pads the rows the same way.
- classes the user vouches for (``trusted``): TrAct then treats the layer as its ``nn`` base
  class (plus the TF-SAME padding above), preconditioning the gradient of the raw weight.

Layers whose weight is computed (parametrizations, ``torch.nn.utils.weight_norm``) or not yet
materialised (``nn.LazyLinear`` / ``nn.LazyConv*d`` before their first forward) are refused too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn
from torch.nn.parameter import is_lazy

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: timm's classes that pad their input TF-"SAME" inside forward (``same_pad``: only when set).
_TIMM_TF_SAME = {"Conv2dSame": False, "StdConv2dSame": True, "ScaledStdConv2dSame": True}

#: Why timm's weight-standardising classes are not z = W·x in their parameter W.
_TIMM_WEIGHT_TRANSFORMS = {
    "StdConv2d": "standardises its weight inside forward (weight standardisation)",
    "StdConv2dSame": "standardises its weight inside forward (weight standardisation)",
    "ScaledStdConv2d": "standardises and rescales its weight inside forward (scaled WS)",
    "ScaledStdConv2dSame": "standardises and rescales its weight inside forward (scaled WS)",
}


def _owner(cls: type, method: str) -> type:
    """The class in ``cls``'s MRO whose own definition of ``method`` instances run."""
    return next(c for c in cls.__mro__ if method in vars(c))


def _timm_name(cls: type) -> str | None:
    """``cls.__name__`` if ``cls`` is defined in the timm package, else None."""
    module = getattr(cls, "__module__", "") or ""
    return cls.__name__ if module == "timm" or module.startswith("timm.") else None


def pads_tf_same(layer: nn.Module) -> bool:
    """Whether the layer's forward zero-pads its input TF-"SAME" itself, then convolves unpadded.

    TF "SAME" (timm's ``pad_same``): per spatial dim of size i, kernel k, stride s, dilation d,
    total = max((⌈i/s⌉ − 1)·s + (k − 1)·d + 1 − i, 0), left = total // 2, right = the rest.
    Recognised for the forward of timm's ``Conv2dSame``, and of ``StdConv2dSame`` /
    ``ScaledStdConv2dSame`` built with dynamic padding (``same_pad``); all leave the layer's own
    padding at 0 and its padding_mode at 'zeros', which is checked.
    """
    if not isinstance(layer, nn.Conv2d):
        return False
    name = _timm_name(_owner(type(layer), "forward"))
    if name not in _TIMM_TF_SAME:
        return False
    if _TIMM_TF_SAME[name] and getattr(layer, "same_pad", False) is not True:
        return False
    return tuple(layer.padding) == (0, 0) and layer.padding_mode == "zeros"


def _base(layer: nn.Module) -> type[nn.Module]:
    return next(t for t in SUPPORTED_LAYERS if isinstance(layer, t))


def check_trusted(trusted: Iterable[object] | type) -> tuple[type[nn.Module], ...]:
    """Validate ``trusted_layers``: subclasses of the supported ``nn`` layers (or one of them)."""
    if isinstance(trusted, type):
        trusted = (trusted,)
    out: list[type[nn.Module]] = []
    for i, cls in enumerate(trusted):
        if not isinstance(cls, type) or not issubclass(cls, SUPPORTED_LAYERS):
            raise TypeError(
                f"trusted_layers[{i}] must be a subclass of nn.Linear or nn.Conv1d/2d/3d "
                f"(the class itself, not an instance), got {cls!r}"
            )
        out.append(cls)
    return tuple(out)


def check(layer: nn.Module, where: str, trusted: tuple[type[nn.Module], ...] = ()) -> None:
    """Refuse a first layer whose z is not W·x over the rows ``unfold`` builds (see module doc).

    ``layer`` must already be an instance of a supported layer; ``where`` names it in messages
    (e.g. ``"first_layer[0]"``). Raises ``ValueError`` for an unmaterialised lazy layer and
    ``TypeError`` otherwise.
    """
    cls = type(layer)
    base = _base(layer)
    weight = layer.weight
    if isinstance(weight, Tensor) and is_lazy(weight):
        raise ValueError(
            f"{where} ({cls.__name__}) is not materialised yet: its weight's shape is unknown "
            "until its first forward pass. Run one forward pass (e.g. model(example_input)), "
            "then create the inner optimizer(s) and TrActOptimizer."
        )
    if not isinstance(weight, nn.Parameter):
        raise TypeError(
            f"{where} ({cls.__name__}): its weight is computed, not an nn.Parameter (a "
            "parametrization such as weight_norm / spectral_norm, or torch.nn.utils."
            "weight_norm), so z = W·x does not hold for a parameter TrAct could precondition. "
            "Remove the parametrization from the first layer."
        )
    methods = ("forward",) if base is nn.Linear else ("forward", "_conv_forward")
    for method in methods:
        owner = _owner(cls, method)
        mro = cls.__mro__
        vouched = any(c in trusted for c in mro[: mro.index(owner) + 1])
        if owner in SUPPORTED_LAYERS or vouched:
            continue
        if method == "forward" and _timm_name(owner) == "Conv2dSame" and pads_tf_same(layer):
            continue
        raise TypeError(_refusal(where, layer, owner, method, base))


def _refusal(where: str, layer: nn.Module, owner: type, method: str, base: type) -> str:
    cls = type(layer)
    name = f"{cls.__module__}.{cls.__qualname__}"
    timm = _timm_name(owner)
    if timm in _TIMM_WEIGHT_TRANSFORMS:
        why = f"{_TIMM_WEIGHT_TRANSFORMS[timm]}, so z is not W·x in its parameter W"
    elif hasattr(layer, "weight_fake_quant"):
        why = "fake-quantises its weight inside forward (quantisation-aware training)"
    else:
        why = (
            f"overrides {method} (in {owner.__qualname__}), so TrAct cannot tell how it computes "
            f"z from x and W: padding, cropping or a weight transform inside {method} would make "
            "the statistics silently wrong"
        )
    return (
        f"{where} is a {name}, a subclass of nn.{base.__name__} that {why}. TrAct's update "
        f"assumes z = W·x as nn.{base.__name__} computes it. If you vouch for the layer (its "
        "forward computes what its nn base class computes, or you accept preconditioning the "
        f"raw weight's gradient as if it did), pass trusted_layers=[{name}] to TrActOptimizer."
    )


def as_layers(first_layer: object, trusted: tuple[type[nn.Module], ...] = ()) -> list[nn.Module]:
    """``first_layer`` (a layer or a sequence of layers) as a checked list: each one supported
    (``check``), none twice. Raises ``TypeError``/``ValueError`` naming ``first_layer[i]``."""
    if isinstance(first_layer, nn.Module):
        layers = [first_layer]
    elif isinstance(first_layer, Sequence) and not isinstance(first_layer, (str, bytes)):
        layers = list(first_layer)
    else:
        raise TypeError(
            "first_layer must be an nn.Linear / nn.Conv1d / nn.Conv2d / nn.Conv3d module, or a "
            f"list of them (e.g. model.conv1, or find_first_layers(model, x)); got {first_layer!r}"
        )
    if not layers:
        raise ValueError("first_layer: give a layer or a non-empty sequence of layers")
    names = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_LAYERS)
    for i, layer in enumerate(layers):
        if not isinstance(layer, SUPPORTED_LAYERS):
            raise TypeError(
                f"first_layer[{i}] is a {type(layer).__name__}; TrAct supports {names}. "
                "Pass the module that first multiplies the raw input (e.g. model.conv1)."
            )
        check(layer, f"first_layer[{i}]", trusted)
        if any(layer is other for other in layers[:i]):
            raise ValueError(f"first_layer[{i}] appears twice; give each layer once")
    return layers
