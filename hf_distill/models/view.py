"""One view of any model's stages, read from what its library declares.

:func:`model_view` answers, for any classifier or backbone, "where are its stages and what do they
give": module name (a hook point for :class:`~hf_distill.models.taps.FeatureTaps`), channels or token width,
reduction (input pixels per feature position), layout, and for tokens the number of prefix tokens
and the grid the others lie on. FitNets ``hint_layers="auto"``, BYOT's automatic exits, SFTN and
``hf-distill layers`` all start from it. The stages are found, first rule that applies:

1. ``model.stage_modules`` (a list of module names) declared on the model;
2. timm: ``model.feature_info`` (module name, channels, reduction of every feature level, which
   timm declares for nearly every family);
3. transformers: ``output_hidden_states=True`` - each hidden state after the embeddings is matched
   to the module whose output it is (``reshaped_hidden_states``, where the model gives them, give
   the token grid of hierarchical models such as Swin);
4. any other module: a probe of its children by output shape (the last child of each run of
   equal spatial size ends a stage); no or an ambiguous answer is refused.

One dry forward at the model's own input size then gives every stage's shape and layout. Stem-level
levels (reduction below 4) are dropped while at least two stages remain; isotropic models (every
stage at one reduction: ViT, Mixer ...) are grouped into 4 evenly spaced stages by default; models
that list more than 6 blocks at several reductions keep the last block of each reduction.

Tokens become maps on the model's own grid at any input size, non-square too (:meth:`ModelView.
token_grid`): the grid is the input size divided by the stage's reduction, and the prefix tokens are
what is left over (counted from the model's own output, not guessed from names).

Running a model from the middle is in :mod:`hf_distill.models.middle`.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .calling import is_timm_model, is_transformers_model
from .layouts import NCHW, NHWC, TOKENS, VECTOR, feature_tensor, to_nchw
from .specs import input_spec
from .stages import even_ends
from .taps import _DryRun, _first_param, default_call

__all__ = ["Stage", "ModelView", "StagesNotFoundError", "model_view", "token_grid", "tokens_to_map",
           "stage_image_size", "format_stages"]


# what a user can pass instead when no stages are found (trainer arguments, or a list on the model)
NAME_THEM = "name the layers instead (hint_layers, byot_exits; or a stage_modules list on the model)"


class StagesNotFoundError(ValueError):
    """The model's stages cannot be found (or not unambiguously); the message says what to pass instead."""


@dataclass(frozen=True)
class Stage:
    name: str                      # module name in model.named_modules(): the hook point
    channels: int                  # channels (maps) or token width (tokens)
    reduction: float               # input pixels per feature position (stride), from the probe
    layout: str                    # nchw / nhwc / tokens
    shape: tuple[int, ...]         # output shape at the probe
    grid: tuple[int, int]          # spatial grid at the probe (tokens: of the patch tokens)
    num_prefix_tokens: int = 0     # class / distillation / register tokens before the patch tokens


@dataclass
class ModelView:
    """The stages of a model (see the module docstring). ``source`` says where they were read from."""

    stages: list[Stage]
    source: str
    image_size: tuple[int, int]
    isotropic: bool = False

    def names(self, num_groups: int | None = None) -> list[str]:
        """Stage module names: all (hierarchical models) or 4 evenly spaced (isotropic), or ``num_groups``."""
        names = [s.name for s in self.stages]
        k = num_groups if num_groups is not None else (4 if self.isotropic else None)
        return names if k is None or k >= len(names) else [names[j] for j in even_ends(len(names), k)]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def middle(self) -> str:
        names = self.names()
        return names[len(names) // 2]

    def describe(self) -> list[dict]:
        return [{"name": s.name, "channels": s.channels, "reduction": s.reduction, "layout": s.layout,
                 "shape": s.shape, "prefix_tokens": s.num_prefix_tokens} for s in self.stages]


def format_stages(view: "ModelView") -> str:
    """The stages as an aligned text table (``hf-distill layers``)."""
    picked = set(view.names())
    rows = [("stage", "channels", "reduction", "layout", "grid", "prefix", "default")]
    rows += [(s.name, str(s.channels), f"{s.reduction:g}", s.layout, f"{s.grid[0]}x{s.grid[1]}",
              str(s.num_prefix_tokens), "*" if s.name in picked else "") for s in view.stages]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"stages from {view.source} at {view.image_size[0]}x{view.image_size[1]}; * = used by default "
                 f"(FitNets auto: {view.middle()}; BYOT exits after all but the last)")
    return "\n".join(lines)


def token_grid(n_tokens: int, image_size: Sequence[int] | None, reduction: float | None,
               probe_grid: tuple[int, int] | None = None, expected_prefix: int | None = None
               ) -> tuple[int, int, int]:
    """``(prefix, h, w)``: how ``n_tokens`` split into prefix tokens and an ``h x w`` patch grid for an
    input of ``image_size`` at ``reduction`` pixels per token (floor or ceil: padded models round up),
    else the probe's grid; the split leaving ``expected_prefix`` tokens wins, then none, then the
    fewest (at most 8). Else the largest square with at most 8 tokens left over."""
    candidates = []
    if image_size is not None and reduction:
        H, W = int(image_size[-2]), int(image_size[-1])
        for f in (math.floor, math.ceil):
            candidates.append((max(1, int(f(H / reduction))), max(1, int(f(W / reduction)))))
    if probe_grid is not None:
        candidates.append(tuple(probe_grid))
    fits = [(n_tokens - h * w, h, w) for h, w in candidates if 0 <= n_tokens - h * w <= 8]
    if fits:
        return min(fits, key=lambda f: (f[0] != expected_prefix, f[0]))
    for prefix in ([expected_prefix] if expected_prefix is not None else []) + list(range(0, 9)):
        side = math.isqrt(max(n_tokens - prefix, 0))
        if side and side * side == n_tokens - prefix:
            return prefix, side, side
    raise ValueError(f"{n_tokens} tokens do not fill a patch grid for input {tuple(image_size or ())} "
                     f"at stride {reduction}")


# ------------------------------------------------------------------------------------------ discovery
_CACHE: "weakref.WeakKeyDictionary[nn.Module, ModelView]" = weakref.WeakKeyDictionary()


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _own_size(model: nn.Module) -> tuple[int, int]:
    from .taps import _own_image_size

    try:
        return tuple(_own_image_size(model))
    except Exception:  # noqa: BLE001 - a model without a declared size gets the default
        return tuple(input_spec(model).image_size)


def _probe_input(model: nn.Module, size) -> torch.Tensor:
    ref = _first_param(model)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, _in_chans(model), *size, generator=g).to(device=device, dtype=dtype)


def _in_chans(model: nn.Module) -> int:
    from .specs import declares_input_spec

    if not declares_input_spec(model):  # a plain module: its first convolution says
        conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        if conv is not None:
            return int(conv.in_channels)
    return input_spec(model).in_chans


def _timm_feature_info(model: nn.Module) -> dict[str, float]:
    """``{module: reduction}`` from timm's ``feature_info`` (modules of the model only)."""
    info = getattr(model, "feature_info", None)
    if hasattr(info, "get_dicts"):
        info = info.get_dicts()
    if not isinstance(info, (list, tuple)):
        return {}
    modules = dict(model.named_modules())
    out = {}
    for e in info:
        name = e.get("module") if isinstance(e, dict) else None
        module = modules.get(name) if name else None
        while (isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(module)
               and type(module).forward is nn.Module.forward):
            # a container the forward iterates (never calls): its last member gives the level's output
            last = list(module.named_children())[-1][0]
            name, module = f"{name}.{last}", modules[f"{name}.{last}"]
        if module is not None:
            out[name] = float(e.get("reduction") or 0)
    return out


def _as_map_candidates(t: torch.Tensor, shape) -> list[torch.Tensor]:
    """The ways a module output ``t`` may be the ``[B, C, H, W]`` intermediate of ``shape``."""
    b, c, h, w = shape
    out = []
    if t.ndim == 4 and tuple(t.shape) == tuple(shape):
        out.append(t)
    if t.ndim == 4 and tuple(t.shape) == (b, h, w, c):
        out.append(t.permute(0, 3, 1, 2))
    if t.ndim == 3 and t.shape[0] == b and t.shape[2] == c and 0 <= t.shape[1] - h * w <= 8:
        out.append(t[:, t.shape[1] - h * w:].transpose(1, 2).reshape(b, c, h, w))
    return out


def _timm_intermediates(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Modules whose outputs are what timm's ``forward_intermediates`` returns (for models whose
    ``feature_info`` names modules the forward does not call)."""
    fn = getattr(model, "forward_intermediates", None)
    if fn is None:
        return []
    try:
        inter, seen = _record_outputs(model, x, lambda m, t: m.forward_intermediates(t, intermediates_only=True))
    except Exception:  # noqa: BLE001 - not implemented for this model
        return []
    names = []
    for feat in inter if isinstance(inter, (list, tuple)) else []:
        if not isinstance(feat, torch.Tensor) or feat.ndim != 4:
            continue
        hits = [n for n, t in seen if any(torch.equal(c, feat) for c in _as_map_candidates(t, feat.shape))]
        if hits:
            name = min(reversed(hits), key=lambda n: n.count("."))
            if name not in names:
                names.append(name)
    return names


def _timm_token_grids(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """``{module: (h, w)}`` for the token outputs that timm's ``forward_intermediates`` lays as maps at ``x``'s
    size: the model's own grid (non-square inputs, models without one ``patch_embed`` such as Twins)."""
    if getattr(model, "forward_intermediates", None) is None:
        return {}
    try:
        inter, seen = _record_outputs(model, x, lambda m, t: m.forward_intermediates(t, intermediates_only=True))
    except Exception:  # noqa: BLE001 - not implemented for this model
        return {}
    grids = {}
    for feat in inter if isinstance(inter, (list, tuple)) else []:
        if isinstance(feat, torch.Tensor) and feat.ndim == 4:
            for n, t in seen:
                if t.ndim == 3 and n not in grids and any(torch.equal(c, feat)
                                                          for c in _as_map_candidates(t, feat.shape)):
                    grids[n] = (int(feat.shape[-2]), int(feat.shape[-1]))
    return grids


def _record_outputs(model, x, call, **kw) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """The model output and ``(name, feature tensor)`` of every module call, in call-finish order."""
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def fn(module, args, output):
            try:
                seen.append((name, feature_tensor(output)))
            except TypeError:
                pass
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with _DryRun(model):
            out = call(model, x, **kw) if kw else call(model, x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride())


def _transformers_candidates(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Modules whose outputs are the model's hidden states (after the embeddings), and the grids
    ``reshaped_hidden_states`` give for token stages."""
    out, seen = _record_outputs(model, x, lambda m, t: m(pixel_values=t, output_hidden_states=True))
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        return [], {}
    reshaped = getattr(out, "reshaped_hidden_states", None) or [None] * len(hidden)
    per_state = []
    for j, hs in enumerate(hidden):
        if not isinstance(hs, torch.Tensor) or hs.ndim not in (3, 4):
            continue
        hits = [n for n, t in seen if _same(t, hs)]
        if not hits:
            hits = [n for n, t in seen if t.shape == hs.shape and torch.equal(t, hs)]
        if not hits and hs.ndim == 4:  # tokens the encoder reshapes into a map outside any module (PVTv2)
            hits = [n for n, t in seen if t.ndim == 3
                    and any(torch.equal(c, hs) for c in _as_map_candidates(t, hs.shape))]
        if j == 0 and any("embed" in n.rpartition(".")[2] for n in hits):
            continue  # the embeddings' output (ViT, ResNet ...): the stem; PVT-like models start with a stage
        if hits:
            per_state.append((j, hs, hits))
    # the stage modules are siblings (encoder.layers.N): prefer the container most hidden states come from
    parents: dict[str, int] = {}
    for _, _, hits in per_state:
        for p in {n.rpartition(".")[0] for n in hits}:
            parents[p] = parents.get(p, 0) + 1
    common = max(parents, key=lambda p: (parents[p], p.count("."))) if parents else None
    names, grids = [], {}
    for j, hs, hits in per_state:
        siblings = [n for n in hits if n.rpartition(".")[0] == common]
        name = siblings[-1] if siblings else min(hits, key=lambda n: n.count("."))
        if name in names:
            continue
        names.append(name)
        r = reshaped[j] if j < len(reshaped) else None
        if isinstance(r, torch.Tensor) and r.ndim == 4 and hs.ndim == 3:
            # NCHW (Swin, FocalNet) or channels-last (Hiera): the channels are the tokens' width; when both fit
            # (as many channels as rows), the grid with the input's aspect ratio
            c, (H, W) = hs.shape[-1], x.shape[-2:]
            fits = [(int(r.shape[2]), int(r.shape[3]))] if r.shape[1] == c else []
            fits += [(int(r.shape[1]), int(r.shape[2]))] if r.shape[3] == c else []
            grids[name] = min(fits or [tuple(r.shape[-2:])], key=lambda g: abs(H / g[0] - W / g[1]))
        elif hs.ndim == 4 and dict(seen).get(name) is not None and dict(seen)[name].ndim == 3:
            grids[name] = (int(hs.shape[-2]), int(hs.shape[-1]))
    return names, grids


def _probe_children(model: nn.Module, x: torch.Tensor, call) -> list[str]:
    """Stage ends of a plain module: the last of each run of children with equal spatial size."""
    _, seen = _record_outputs(model, x, call)
    container = model
    while True:  # descend into a single trunk holding most parameters (e.g. `features`, `backbone`)
        kids = list(container.named_children())
        total = sum(p.numel() for p in container.parameters()) or 1
        trunk = [(n, m) for n, m in kids if sum(p.numel() for p in m.parameters()) > 0.6 * total
                 and len(list(m.children())) >= 3]
        if len(trunk) != 1:
            break
        container = trunk[0][1]
    prefix = next((n for n, m in model.named_modules() if m is container), "")
    kid_names = {f"{prefix}.{n}" if prefix else n for n, _ in container.named_children()}
    calls = [(n, t) for n, t in seen if n in kid_names and t.ndim in (3, 4)]
    if len({n for n, _ in calls}) != len(calls):
        raise StagesNotFoundError(f"{type(model).__name__}: a child module runs more than once per forward, so "
                                  f"its stages are ambiguous; {NAME_THEM}")
    groups: list[tuple[Any, str]] = []
    for n, t in calls:
        key = tuple(t.shape[2:]) if t.ndim == 4 else (t.shape[1],)
        if groups and groups[-1][0] == key:
            groups[-1] = (key, n)
        else:
            groups.append((key, n))
    return [n for _, n in groups]


def model_view(model: nn.Module, call: Callable | None = None) -> ModelView:
    """The :class:`ModelView` of ``model`` (computed once per model object; see the module docstring).

    Raises :class:`StagesNotFoundError` (one line) when no stages can be found."""
    model = _unwrap(model)
    cached = _CACHE.get(model)
    if cached is not None:
        return cached
    call = call or default_call
    size = _own_size(model)
    x = _probe_input(model, size)
    grids: dict[str, tuple[int, int]] = {}
    reductions: dict[str, float] = {}
    declared = getattr(model, "stage_modules", None)
    if isinstance(declared, (list, tuple)) and declared and all(isinstance(n, str) for n in declared):
        names, source = list(declared), "declared stage_modules"
    elif is_timm_model(model) and _timm_feature_info(model):
        reductions = _timm_feature_info(model)
        names, source = list(reductions), "timm feature_info"
    elif is_transformers_model(model):
        try:
            names, grids = _transformers_candidates(model, x)
        except (TypeError, ValueError, RuntimeError):
            names = []
        source = "transformers hidden_states" + (" (reshaped)" if grids else "")
    else:
        names, source = [], ""
    if not names:
        source = "probe of children"
        try:
            names = _probe_children(model, x, call)
        except StagesNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - the dry forward itself fails
            raise StagesNotFoundError(f"cannot probe the stages of {type(model).__name__} "
                                      f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                                      f"{NAME_THEM}") from None
    try:
        view = _measure(model, names, source, x, size, grids, reductions, call)
    except StagesNotFoundError:
        if not is_timm_model(model):
            raise
        names = _timm_intermediates(model, x)
        view = _measure(model, names, "timm forward_intermediates", x, size, grids, {}, call)
    _CACHE[model] = view
    return view


def _measure(model, names, source, x, size, grids, reductions, call) -> ModelView:
    from .taps import probe_features

    try:
        probe = _probe_each(model, names, x, call, probe_features)
    except Exception as err:  # noqa: BLE001 - any failure of the dry forward is the same refusal
        raise StagesNotFoundError(f"cannot probe the stages of {type(model).__name__} ({source}: "
                                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                                  f"{NAME_THEM}") from None
    H, W = size
    stages = []
    own = None  # timm: the grids forward_intermediates lays the tokens on at this size, read once
    for name in names:
        if name not in probe:
            continue
        shape, layout = probe[name]
        if layout == VECTOR or shape[0] != x.shape[0]:  # pooled, or not one row per image (TNT's pixel tokens)
            continue
        if layout == TOKENS:
            n, channels = shape[1], shape[2]
            stride = reductions.get(name) or _patch_stride(model)
            if own is None:
                own = _timm_token_grids(model, x) if is_timm_model(model) else {}
            try:
                if name in own:  # the model's own grid wins over one guessed from a stride
                    (h, w), prefix = own[name], n - own[name][0] * own[name][1]
                elif grids.get(name) is None and not stride:
                    raise ValueError
                else:
                    prefix, h, w = token_grid(n, size, stride, grids.get(name), _expected_prefix(model))
            except ValueError:
                prefix, h, w = _grid_from_count(n)
        else:
            channels = shape[1] if layout == NCHW else shape[-1]
            h, w = (shape[2], shape[3]) if layout == NCHW else (shape[1], shape[2])
            prefix = 0
        reduction = round(max(H / max(h, 1), W / max(w, 1)), 3)
        stages.append(Stage(name, int(channels), reduction, layout, tuple(shape), (int(h), int(w)), int(prefix)))
    if stages and any(s.reduction >= 4 for s in stages):
        kept = [s for s in stages if s.reduction >= 4]
        stages = kept if len(kept) >= 2 else stages
    if len(stages) < 2:
        raise StagesNotFoundError(
            f"{type(model).__name__}: found {len(stages)} stage(s) ({source or 'no declaration'}); {NAME_THEM}")
    reductions = {s.reduction for s in stages}
    isotropic = len(reductions) == 1 and len(stages) > 4
    if not isotropic and len(stages) > 6:  # every block listed (transformers MobileNet): one per reduction level
        last = {s.reduction: s.name for s in stages}
        stages = [s for s in stages if last[s.reduction] == s.name]
    return ModelView(stages, source, tuple(size), isotropic)


def _probe_each(model, names, x, call, probe_features):
    try:
        return probe_features(model, names, x, call=call)
    except RuntimeError:  # some declared modules are not run by this forward: keep those that are
        out = {}
        for n in names:
            try:
                out.update(probe_features(model, [n], x, call=call))
            except RuntimeError:
                continue
        return out


def _expected_prefix(model: nn.Module) -> int | None:
    from .layouts import num_prefix_tokens

    try:
        return num_prefix_tokens(model)
    except Exception:  # noqa: BLE001
        return None


def _patch_stride(model: nn.Module) -> float | None:
    """Pixels per token of a patch-embedding model (timm ``patch_embed.patch_size``, transformers
    ``config.patch_size``), else ``None``."""
    pe = getattr(model, "patch_embed", None)
    p = getattr(pe, "patch_size", None)
    if p is None and is_transformers_model(model):
        p = getattr(model.config, "patch_size", None)
        vision = getattr(model.config, "vision_config", None)
        if p is None and vision is not None:
            p = getattr(vision, "patch_size", None)
    if isinstance(p, (tuple, list)):
        p = p[0]
    return float(p) if isinstance(p, (int, float)) and p else None


def _grid_from_count(n: int) -> tuple[int, int, int]:
    for prefix in range(0, 9):
        side = math.isqrt(max(n - prefix, 0))
        if side and side * side == n - prefix:
            return prefix, side, side
    return 0, n, 1


def tokens_to_map(t: torch.Tensor, stage: Stage, image_size: Sequence[int] | None = None) -> torch.Tensor:
    """A ``[B, C, H, W]`` map from a stage output of any layout, tokens laid on the model's own grid for
    an input of ``image_size`` (default: the probe's)."""
    if stage.layout != TOKENS:
        return to_nchw(t, stage.layout)
    n = t.shape[1]
    if image_size is None and n == stage.shape[1]:
        prefix, h, w = stage.num_prefix_tokens, *stage.grid
    else:
        prefix, h, w = token_grid(n, image_size, stage.reduction, stage.grid if n == stage.shape[1] else None,
                                  stage.num_prefix_tokens)
    return to_nchw(t, TOKENS, prefix, grid_size=(h, w))



def stage_image_size(stage: Stage, h: torch.Tensor) -> tuple[int, int]:
    """The input size at which ``stage`` gives a feature of ``h``'s grid (maps: spatial size times the
    stage's reduction; tokens: the probe's size, token models keep their grid)."""
    if stage.layout == NCHW and h.ndim == 4:
        gh, gw = h.shape[-2], h.shape[-1]
    elif stage.layout == NHWC and h.ndim == 4:
        gh, gw = h.shape[1], h.shape[2]
    else:
        gh, gw = stage.grid
    return (max(1, round(gh * stage.reduction)), max(1, round(gw * stage.reduction)))
