"""Forward-hook feature taps: intermediate activations for FitNets hints, BYOT exits and SFTN.

A *tap* is a forward hook on a named submodule (a name as in ``model.named_modules()``) that
records the module's output on every forward pass::

    taps = FeatureTaps(student, ["layer2", "layer3"])
    logits = student(x)
    feats = taps.pop()            # {"layer2": tensor, "layer3": tensor}, and the taps are empty again
    hint = to_nchw(feats["layer2"], taps.layouts["layer2"])

Names are checked when the taps are built: a wrong name raises :class:`LayerNotFoundError`
listing the closest valid names. ``hf-distill layers MODEL`` (or :func:`describe_layers`) lists
every module with its output shape and layout, and marks the stage outputs that make good hints.

The layouts of tapped tensors and their conversions are in :mod:`hf_distill.models.layouts`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .calling import is_timm_model, is_transformers_model
from .layouts import LAYOUTS, NCHW, NHWC, TOKENS, VECTOR, _NDIM, _check_layout, _layout_of, feature_tensor, num_prefix_tokens, \
    pool_features, resize_map, to_nchw
from .specs import input_spec


__all__ = [
    "LAYOUTS",
    "NCHW",
    "NHWC",
    "TOKENS",
    "VECTOR",
    "FeatureTaps",
    "LayerNotFoundError",
    "default_call",
    "describe_layers",
    "feature_tensor",
    "format_layers",
    "infer_layout",
    "num_prefix_tokens",
    "pool_features",
    "probe_shapes",
    "resize_map",
    "resolve_module",
    "to_nchw",
]
_LIST_HINT = "list them all with `hf-distill layers MODEL` or `[n for n, _ in model.named_modules()]`"


# ---------------------------------------------------------------------------------------------
# Module names
# ---------------------------------------------------------------------------------------------


class LayerNotFoundError(KeyError):
    """A layer name that is not in ``model.named_modules()``; the message lists close names."""

    def __init__(self, message: str, name: str = "", suggestions: Sequence[str] = ()):
        super().__init__(message)
        self.name = name
        self.suggestions = list(suggestions)

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


def _close_names(name: str, names: Sequence[str], n: int = 5) -> list[str]:
    # Names that end with what was asked ("layer.0" for "vit.layers.0"-style prefixes) first,
    # then the ones difflib finds similar.
    suffix = [c for c in names if c.endswith("." + name)]
    similar = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    out: list[str] = []
    for c in suffix + similar:
        if c not in out:
            out.append(c)
    return out[:n]


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model.named_modules()`` (``""`` is the model itself).

    A model wrapped in ``DistributedDataParallel`` / ``DataParallel`` also accepts the names of
    the wrapped model (without the ``module.`` prefix). Raises :class:`LayerNotFoundError`.
    """
    if not isinstance(name, str):
        raise TypeError(f"layer names are strings, got {type(name).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))  # aliases of a module too
    if name in modules:
        return modules[name]
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and f"module.{name}" in modules:
        return modules[f"module.{name}"]
    names = [n for n, _ in model.named_modules() if n]
    close = _close_names(name, names)
    if close:
        hint = "closest names: " + ", ".join(repr(c) for c in close)
    else:
        top = [n for n in names if "." not in n][:10]
        hint = "no similar name; top-level modules: " + ", ".join(repr(c) for c in top)
    raise LayerNotFoundError(
        f"no module named {name!r} in {type(model).__name__}; {hint}. You can {_LIST_HINT}.",
        name=name,
        suggestions=close,
    )


def infer_layout(
    model: nn.Module, name: str, tensor: torch.Tensor, overrides: Mapping[str, str] | None = None
) -> str:
    """Layout (``"nchw"``, ``"nhwc"``, ``"tokens"`` or ``"vector"``) of module ``name``'s output.

    The rules are in the docstring of :mod:`hf_distill.models.layouts`; an entry for ``name`` in
    ``overrides`` always wins.
    """
    if overrides and name in overrides:
        return _check_layout(overrides[name])
    return _layout_of(model, resolve_module(model, name), tensor)


# ---------------------------------------------------------------------------------------------
# Taps
# ---------------------------------------------------------------------------------------------


class _TapsComplete(Exception):
    """Raised by a tap hook to stop a forward once every tapped layer has run."""


class FeatureTaps:
    """Records the outputs of named submodules on every forward pass.

    One forward hook per distinct module is registered at construction (names are resolved
    first, so a wrong one fails here); the same module tapped under two names (or twice) gets
    one hook. Each hook stores ``feature_tensor(output)`` - no copy, detached only with
    ``detach=True`` - so the stored tensors keep their autograd graph for hint losses.

    The store is cleared when the model's own forward starts (a pre-hook on ``model``), so
    :attr:`features` always holds one forward pass; a module called twice in one pass keeps
    its last output. Call :meth:`pop` after using the features so no activations are held
    between steps. The hooks sit on the submodules, so wrapping the model in DDP or moving it to
    another device afterwards keeps them working. Use as a context manager, or call
    :meth:`remove`.

    ``layouts`` overrides the inferred layout of some tapped layers (keys must be tapped layer
    names, values one of :data:`LAYOUTS`); the others are inferred at their first capture.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        layouts: Mapping[str, str] | None = None,
        detach: bool = False,
    ):
        if isinstance(layers, str):
            layers = [layers]
        self.model = model
        self.detach = bool(detach)
        self._layers: list[str] = list(dict.fromkeys(layers))  # dedupe, keep order
        modules = {name: resolve_module(model, name) for name in self._layers}
        self._overrides: dict[str, str] = {}
        for name, layout in (layouts or {}).items():
            if name not in modules:
                raise ValueError(f"layout override for {name!r}, which is not a tapped layer ({self._layers})")
            self._overrides[name] = _check_layout(layout)
        self._layouts: dict[str, str] = dict(self._overrides)
        self._features: dict[str, torch.Tensor] = {}
        self._stop_when_complete = False
        # One hook per module object, storing under every name it was tapped as.
        by_module: dict[int, tuple[nn.Module, list[str]]] = {}
        for name, module in modules.items():
            by_module.setdefault(id(module), (module, []))[1].append(name)
        self._handles = [module.register_forward_hook(self._hook(names)) for module, names in by_module.values()]
        self._handles.append(model.register_forward_pre_hook(self._clear))

    def _clear(self, module, args) -> None:
        self._features.clear()

    def _hook(self, names: list[str]):
        store = self._features

        def hook(module, args, output):
            t = feature_tensor(output)
            if self.detach:
                t = t.detach()
            for name in names:
                store[name] = t
                if name not in self._layouts:
                    layout = _layout_of(self.model, module, t)
                    self._layouts[name] = layout
                elif t.ndim != _NDIM[self._layouts[name]]:
                    raise ValueError(
                        f"layer {name!r} gave a {t.ndim}-D output {tuple(t.shape)} but its layout is "
                        f"{self._layouts[name]!r} ({_NDIM[self._layouts[name]]}-D)"
                    )
            if self._stop_when_complete and len(store) == len(self._layers):
                raise _TapsComplete

        return hook

    def run_until_complete(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Call ``fn`` (a forward of the tapped model) but stop it as soon as every tapped layer
        has produced its output; the layers after them do not run. Returns :meth:`pop`.

        The stop is raised from the tap's hook, so forward hooks registered later on the last
        tapped module do not run either (pre-hooks do)."""
        self._stop_when_complete = True
        try:
            fn(*args, **kwargs)
        except _TapsComplete:
            pass
        finally:
            self._stop_when_complete = False
        missing = [n for n in self._layers if n not in self._features]
        if missing:
            raise RuntimeError(f"the forward finished without running the tapped layers {missing}")
        return self.pop()

    @property
    def layers(self) -> list[str]:
        """The tapped layer names, in the order given (duplicates dropped)."""
        return list(self._layers)

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of the last forward pass (a new dict; the tensors are not copied)."""
        return dict(self._features)

    def set_layouts(self, layouts: Mapping[str, str]) -> None:
        """Record known layouts of tapped layers (e.g. from :func:`probe_features`) before the first capture;
        overrides given at construction stay."""
        for name, layout in layouts.items():
            if name in self._layers and name not in self._overrides:
                self._layouts[name] = _check_layout(layout)

    @property
    def layouts(self) -> dict[str, str]:
        """``{name: layout}`` for the overridden layers and those captured at least once."""
        return {n: self._layouts[n] for n in self._layers if n in self._layouts}

    def pop(self) -> dict[str, torch.Tensor]:
        """The last forward pass's features; the taps hold none afterwards."""
        out = dict(self._features)
        self._features.clear()
        return out

    def clear(self) -> None:
        self._features.clear()

    def remove(self) -> None:
        """Remove every hook and drop the stored features (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, name: object) -> bool:
        return name in self._layers

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "" if self.active else ", removed"
        return f"FeatureTaps({type(self.model).__name__}, {self._layers}{state})"


# ---------------------------------------------------------------------------------------------
# Dry runs
# ---------------------------------------------------------------------------------------------


def default_call(model: nn.Module, x: torch.Tensor) -> Any:
    """Forward ``x`` the way the model's library expects (``pixel_values=`` for transformers)."""
    if is_transformers_model(model):
        return model(pixel_values=x)
    return model(x)


def _first_param(model: nn.Module) -> torch.Tensor | None:
    for p in model.parameters():
        return p
    for b in model.buffers():
        return b
    return None


class _DryRun:
    """Eval mode + no_grad for one forward, restoring every submodule's own mode afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()
        return self

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        for m, training in self.modes:
            m.training = training


def probe_shapes(
    model: nn.Module,
    layers: Sequence[str],
    example: torch.Tensor,
    call: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Output shape of each layer for ``example``, from one forward in eval mode without grad.

    The train/eval mode of every submodule is restored afterwards. ``call(model, x)`` runs the
    forward (default :func:`default_call`). A layer the forward never reached is a
    ``RuntimeError``.
    """
    call = call or default_call
    ref = _first_param(model)
    if ref is not None and example.device != ref.device:
        example = example.to(ref.device)
    with FeatureTaps(model, layers, detach=True) as taps, _DryRun(model):
        call(model, example)
        feats = taps.pop()
    missing = [n for n in taps.layers if n not in feats]
    if missing:
        raise RuntimeError(f"layers {missing} were not run by the forward pass; tap layers the forward uses")
    return {n: tuple(feats[n].shape) for n in taps.layers}


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[-2], size[-1])


def _own_image_size(model: nn.Module) -> tuple[int, int]:
    # timm keeps the default-config size in pretrained_cfg even when the model was created with
    # another img_size; its patch embedding knows the real one.
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if is_timm_model(model) and img_size is not None:
        return _pair(img_size)
    return tuple(input_spec(model).image_size)


_STAGE_CONTAINERS = ("stages", "layers", "layer")


def _known_stage_names(model: nn.Module) -> set[str]:
    """timm ``feature_info`` modules (of the model or a wrapped timm model) and transformers
    ``...stages.N`` / ``...layers.N`` / ``...layer.N`` (the outermost such level only)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        if hasattr(info, "get_dicts"):
            info = info.get_dicts()
        if isinstance(info, (list, tuple)):
            for entry in info:
                if isinstance(entry, dict) and isinstance(entry.get("module"), str) and entry["module"]:
                    names.add(f"{prefix}.{entry['module']}" if prefix else entry["module"])
    if is_transformers_model(model):
        for name, _ in model.named_modules():
            parts = name.split(".")
            hits = [i for i in range(len(parts) - 1) if parts[i] in _STAGE_CONTAINERS and parts[i + 1].isdigit()]
            if len(hits) == 1 and hits[0] == len(parts) - 2:
                names.add(name)
    return names


def describe_layers(
    model: nn.Module,
    image_size: int | Sequence[int] | None = 224,
    in_chans: int | None = None,
    max_depth: int | None = None,
) -> list[dict]:
    """Every named module with its output shape and layout, in forward order.

    One dry forward (eval mode, no grad, modes restored) on a zero image of ``image_size``
    (``None``: the model's own size) and ``in_chans`` channels (``None``: from
    :func:`hf_distill.models.input_spec`). Modules whose output holds no tensor and the model
    itself are left out; ``max_depth`` keeps names with at most that many dotted parts. Rows are
    ``{"name", "type", "shape", "layout", "stage"}``; ``stage`` marks the stages
    :func:`hf_distill.models.view.model_view` discovers (timm ``feature_info``, transformers hidden
    states, a plain module's children by output shape); where it finds none, timm ``feature_info``
    modules and transformers ``stages.N`` / ``layers.N`` / ``layer.N``, else the modules whose
    (3-D/4-D) output shape differs from the next output's.
    """
    spec = input_spec(model)
    in_chans = int(in_chans or spec.in_chans)
    h, w = _pair(image_size) if image_size is not None else _own_image_size(model)
    ref = _first_param(model)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    x = torch.zeros(1, in_chans, h, w, dtype=dtype, device=device)

    named = [(n, m) for n, m in model.named_modules() if n]
    if max_depth is not None:
        named = [(n, m) for n, m in named if n.count(".") + 1 <= max_depth]
    seen: dict[str, dict] = {}  # insertion order = order of the first output

    def make_hook(name: str):
        def hook(module, args, output):
            if name in seen:
                return
            try:
                t = feature_tensor(output)
            except TypeError:
                return
            try:
                layout = _layout_of(model, module, t)
            except ValueError:
                layout = "-"
            seen[name] = {"name": name, "type": type(module).__name__, "shape": tuple(t.shape), "layout": layout}

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in named]
    try:
        with _DryRun(model):
            default_call(model, x)
    finally:
        for handle in handles:
            handle.remove()
    rows = list(seen.values())

    try:  # the stages hf_distill.models.view discovers (what FitNets auto, BYOT and SFTN use)
        from .view import model_view

        known = {s.name for s in model_view(model).stages}
    except ValueError:
        known = _known_stage_names(model)
    if known:
        for row in rows:
            row["stage"] = row["name"] in known
    else:
        composite = {n for n, m in named if next(m.children(), None) is not None}
        candidates = composite if any(r["name"] in composite for r in rows) else {r["name"] for r in rows}
        for i, row in enumerate(rows):
            nxt = rows[i + 1]["shape"] if i + 1 < len(rows) else None
            row["stage"] = (
                row["name"] in candidates and len(row["shape"]) in (3, 4) and nxt is not None and nxt != row["shape"]
            )
    return rows


def format_layers(rows: Sequence[Mapping[str, Any]]) -> str:
    """An aligned text table of :func:`describe_layers` rows (``*`` marks the stage outputs)."""
    header = ("name", "type", "shape", "layout", "stage")
    table = [header] + [
        (
            str(r.get("name", "")),
            str(r.get("type", "")),
            "x".join(str(d) for d in r.get("shape", ())),
            str(r.get("layout", "")),
            "*" if r.get("stage") else "",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"{len(rows)} modules; * = stage output (hint-layer candidate)")
    return "\n".join(lines)


def probe_features(
    model: nn.Module,
    layers: Sequence[str],
    example: torch.Tensor,
    layouts: Mapping[str, str] | None = None,
    call: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{layer: (shape, layout)}`` from one dry forward (eval mode, no grad, modes restored)."""
    if not layers:
        return {}
    call = call or default_call
    ref = _first_param(model)
    if ref is not None and example.device != ref.device:
        example = example.to(ref.device)
    with FeatureTaps(model, layers, layouts=layouts, detach=True) as taps, _DryRun(model):
        call(model, example)
        feats = taps.pop()
        found = taps.layouts
    missing = [n for n in taps.layers if n not in feats]
    if missing:
        raise RuntimeError(f"layers {missing} were not run by the forward pass; tap layers the forward uses")
    return {n: (tuple(feats[n].shape), found[n]) for n in taps.layers}
