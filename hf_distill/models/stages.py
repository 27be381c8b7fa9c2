"""A classifier viewed as ``stem -> stages[0..K-1] -> head``.

Several distillation methods need to run a model piece by piece:

* SFTN attaches *student branches*: the rest of the student is run from the output of an
  intermediate teacher stage (:meth:`StagedModel.forward_from`);
* Be-Your-Own-Teacher puts an exit after every stage and, at inference, runs stage by stage and
  stops early (:meth:`StagedModel.stem`, :meth:`StagedModel.run_stage`, :meth:`StagedModel.head`);
* FitNets' ``"auto"`` hint layer is the middle stage (:func:`stage_names`).

:func:`split_model` builds such a view without copying any parameter.  For the built-in families
the split reproduces the model's own ``forward`` operation by operation, so
``split(x)`` is bit-identical to ``model(x)`` (``.logits`` for transformers models), and the output
of stage ``i`` is exactly the output of the module named ``stage_names[i]`` in the normal forward
(forward hooks registered on those names see the same tensors).

Why these hand-written splits remain: stages themselves are found for any model by
:mod:`hf_distill.models.view` (from what timm / transformers declare), and any model can be run from
the middle by :class:`hf_distill.models.middle.MiddleRunner` (its own forward, the stage output
substituted, verified on a probe). But that runner also computes the stages before the branch point
(without gradients, on a stand-in input); a split written out here runs only the later stages, so SFTN
branches and early exit are cheaper for these families, and :func:`hf_distill.models.middle.run_from_middle`
uses it first.

Built-in families (detected by class, never by instance name), as ``stem | stages | head``:

* timm ``ResNet`` (ResNet, ResNet-D, WideResNet ...): conv1, bn1, act1, maxpool | layer1 .. layer4 |
  forward_head
* timm ``ConvNeXt``: stem | stages.0 .. stages.3 | norm_pre, forward_head
* timm ``EfficientNet`` (EfficientNet, MobileNetV2 ...): conv_stem, bn1 | blocks.0 .. blocks.N-1 |
  conv_head, bn2, forward_head
* timm ``MobileNetV3``: conv_stem, bn1 | blocks.0 .. blocks.N-1 | forward_head (global_pool,
  conv_head, norm_head, act2, flatten, classifier)
* timm ``RegNet``: stem | s1 .. s4 | final_conv, forward_head
* timm ``VGG``: (nothing) | features.<j> ending at every MaxPool | any remaining features,
  pre_logits, head
* timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT): patch_embed, _pos_embed, patch_drop,
  norm_pre | ``num_groups`` (default 4) groups of blocks as even as possible, each named after its
  last block (``blocks.2, blocks.5, ...``) | norm, forward_head
* transformers ``ResNetForImageClassification``: resnet.embedder | resnet.encoder.stages.<i> |
  resnet.pooler, classifier
* transformers ``ConvNextForImageClassification``: convnext.embeddings | convnext.encoder.stages.<i> |
  convnext.layernorm(mean over H, W), classifier
* transformers ``ViTForImageClassification``: dtype cast, vit.embeddings | ``num_groups`` groups of
  vit.layers (``vit.encoder.layer`` in older transformers, best effort) | vit.layernorm, [CLS] token, classifier

For these, ``stage_names`` alone regroups the built-in units (``["layer2", "layer4"]``).
A subclass that overrides ``forward`` / ``forward_features`` is not treated as built-in.

Anything else can be split by declaring it: ``split_model(model, stage_names=[...], stem=[...],
head=[...])``, each a
sequence of module names applied in order; see :class:`UnsupportedModelError`.

timm's ``grad_checkpointing`` flag is ignored: the split runs the stages plainly (same values, more
memory).  transformers' per-layer checkpointing (``GradientCheckpointingLayer``) still applies,
because the layers are called as modules.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .stage_families import _hf_families, _Spec, _timm_families

__all__ = [
    "StagedModel",
    "UnsupportedModelError",
    "split_model",
    "stage_names",
    "PSEUDO_MODULES",
]

# A step is a module name (called as ``model.get_submodule(name)(h)``, or one of the
# pseudo-names) or a picklable callable ``fn(model, h) -> h``.
Step = Union[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]]


def _pseudo_flatten(h: torch.Tensor) -> torch.Tensor:
    return torch.flatten(h, 1)


def _pseudo_avgpool(h: torch.Tensor) -> torch.Tensor:
    if h.dim() == 4:  # [B, C, H, W] -> [B, C]
        return F.adaptive_avg_pool2d(h, 1).flatten(1)
    if h.dim() == 3:  # [B, N, C] tokens -> [B, C]
        return h.mean(dim=1)
    if h.dim() == 2:
        return h
    raise ValueError(f"'avgpool' expects a [B, C, H, W] or [B, N, C] tensor, got shape {tuple(h.shape)}")


#: Pseudo-module names accepted in declared splits (used only when the model has no submodule of
#: that name): ``"flatten"`` = ``torch.flatten(h, 1)``; ``"avgpool"`` = global average pool to
#: ``[B, C]`` (``adaptive_avg_pool2d(h, 1).flatten(1)`` for 4-D maps, mean over tokens for 3-D).
PSEUDO_MODULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flatten": _pseudo_flatten,
    "avgpool": _pseudo_avgpool,
}

# One line, naming only what exists: split_model's keywords (the trainer finds stages itself, see
# hf_distill.models.view, and runs models from the middle without a split where none is written here).
_DECLARE_HELP = ("declare it: split_model(model, stage_names=[...], stem=[...], head=[...]), module names as in "
                 "model.named_modules() applied in order (head may use 'flatten', 'avgpool'; `hf-distill layers "
                 "MODEL` lists them)")


class UnsupportedModelError(ValueError):
    """The model is not a built-in family and no (valid) stem / stages / head split was declared.

    The message (one line) says how to declare one: ``split_model(model, stage_names=..., stem=...,
    head=...)``.
    """


def _apply_step(model: nn.Module, step: Step, h):
    if isinstance(step, str):
        try:
            module = model.get_submodule(step)
        except AttributeError:
            pseudo = PSEUDO_MODULES.get(step)
            if pseudo is None:
                raise
            return pseudo(h)
        return module(h)
    return step(model, h)


def _step_label(step: Step) -> str:
    if isinstance(step, str):
        return step
    if isinstance(step, functools.partial):
        args = ", ".join(repr(a) for a in step.args)
        return f"{step.func.__name__.lstrip('_')}({args})"
    return getattr(step, "__name__", repr(step)).lstrip("_")


class StagedModel(nn.Module):
    """View of a classifier as stem -> stages[0..K-1] -> head; shares the model's parameters (no copies).

    Attributes:
        model: the wrapped model (a registered submodule, so ``parameters()``, ``train()``,
            ``to()`` ... act on it).
        stage_names: dotted module names (as in ``model.named_modules()``) whose outputs are the
            stage outputs.
        family: which split was used (e.g. ``"timm.ResNet"``, ``"declared"``).

    ``forward(x)`` returns the logits tensor (also for transformers models, whose own forward
    returns an output object with ``.logits``).
    """

    def __init__(
        self,
        model: nn.Module,
        stem: Sequence[Step],
        stages: Sequence[Sequence[Step]],
        head: Sequence[Step],
        stage_names: Sequence[str],
        family: str = "declared",
    ):
        super().__init__()
        if len(stages) == 0:
            raise ValueError("a StagedModel needs at least one stage")
        if len(stages) != len(stage_names):
            raise ValueError(f"{len(stages)} stages but {len(stage_names)} stage names")
        self.model = model
        self._stem_steps: tuple[Step, ...] = tuple(stem)
        self._stage_steps: tuple[tuple[Step, ...], ...] = tuple(tuple(s) for s in stages)
        self._head_steps: tuple[Step, ...] = tuple(head)
        self.stage_names: list[str] = list(stage_names)
        self.family = family

    # ------------------------------------------------------------------ pieces
    def stem(self, x):
        """Input -> input of stage 0."""
        h = x
        for step in self._stem_steps:
            h = _apply_step(self.model, step, h)
        return h

    def run_stage(self, i: int, h):
        """Input of stage ``i`` -> output of stage ``i`` (= output of module ``stage_names[i]``)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"stage index {i} out of range for {len(self)} stages")
        for step in self._stage_steps[i]:
            h = _apply_step(self.model, step, h)
        return h

    def head(self, h):
        """Output of the last stage -> logits."""
        for step in self._head_steps:
            h = _apply_step(self.model, step, h)
        return h

    # ------------------------------------------------------------------ compositions
    def forward(self, x):
        """stem -> all stages -> head; equals the model's own logits."""
        return self.forward_from(0, self.stem(x))

    def forward_from(self, i: int, h):
        """Run stages ``i .. K-1`` then the head on ``h``, the input of stage ``i``.

        ``h`` is ``stem(x)`` for ``i == 0`` and the output of stage ``i - 1`` otherwise;
        ``i == K`` runs the head only.
        """
        k = len(self)
        if not 0 <= i <= k:
            raise IndexError(f"forward_from: stage index {i} not in [0, {k}]")
        for j in range(i, k):
            h = self.run_stage(j, h)
        return self.head(h)

    def forward_stages(self, x):
        """Return ``(stage_outputs, logits)`` in one pass (``stage_outputs[i]`` = output of stage i)."""
        h = self.stem(x)
        outputs = []
        for i in range(len(self)):
            h = self.run_stage(i, h)
            outputs.append(h)
        return outputs, self.head(h)

    def __len__(self) -> int:
        return len(self._stage_steps)

    # ------------------------------------------------------------------ introspection
    def describe(self) -> dict:
        """Human-readable description of the split: ``{"family", "stem", "stages", "head"}``."""
        return {
            "family": self.family,
            "stem": [_step_label(s) for s in self._stem_steps],
            "stages": [[_step_label(s) for s in stage] for stage in self._stage_steps],
            "head": [_step_label(s) for s in self._head_steps],
        }

    def check(self, x, atol: float = 0.0) -> None:
        """Raise ``AssertionError`` unless ``self(x)`` matches the model's own logits
        (exactly by default). Useful to validate a declared split; runs under ``no_grad``."""
        with torch.no_grad():
            ref = _logits(self.model(x))
            out = self(x)
        if isinstance(ref, (tuple, list)) or isinstance(out, (tuple, list)):
            pairs = list(zip(ref, out)) if isinstance(ref, (tuple, list)) else [(ref, out)]
        else:
            pairs = [(ref, out)]
        for r, o in pairs:
            ok = torch.equal(r, o) if atol == 0 else torch.allclose(r, o, atol=atol, rtol=0)
            if not ok:
                diff = (r.float() - o.float()).abs().max().item() if r.shape == o.shape else "shape mismatch"
                raise AssertionError(
                    f"staged forward differs from the model's forward (max abs diff {diff}); "
                    f"split: {self.describe()}"
                )

    def extra_repr(self) -> str:
        return f"family={self.family!r}, stage_names={self.stage_names}"


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def even_ends(n: int, k: int) -> list[int]:
    """Indices (into a list of ``n``) of the ends of ``k`` groups as even as possible."""
    k = max(1, min(k, n))
    base, rem = divmod(n, k)
    ends, pos = [], -1
    for g in range(k):
        pos += base + (1 if g < rem else 0)
        ends.append(pos)
    return ends


def _build_from_spec(model, spec: _Spec, stage_names, num_groups) -> StagedModel:
    unit_names = [n for n, _ in spec.units]
    index = {n: i for i, n in enumerate(unit_names)}
    if stage_names is None:
        k = num_groups if num_groups is not None else spec.default_groups
        if k is None or k >= len(spec.candidates):
            ends_names = list(spec.candidates)
        else:
            if k < 1:
                raise ValueError(f"num_groups must be >= 1, got {k}")
            ends_names = [spec.candidates[j] for j in even_ends(len(spec.candidates), k)]
    else:
        ends_names = list(stage_names)
        bad = [n for n in ends_names if n not in spec.candidates]
        if bad or not ends_names:
            raise UnsupportedModelError(
                f"{type(model).__name__} ({spec.family}): stage names {bad or ends_names} cannot end a "
                f"stage of the built-in split (valid, in order: {spec.candidates}); to split it otherwise, "
                + _DECLARE_HELP
            )
        idx = [index[n] for n in ends_names]
        if any(b <= a for a, b in zip(idx, idx[1:])):
            raise UnsupportedModelError(
                f"{type(model).__name__} ({spec.family}): stage names must be distinct and in forward "
                f"order; got {ends_names}. Valid stage names, in order: {spec.candidates}."
            )
    stages, start = [], 0
    for name in ends_names:
        end = index[name]
        stages.append([step for _, step in spec.units[start:end + 1]])
        start = end + 1
    # units after the last stage (only when the caller stopped early) belong to the head
    head = [step for _, step in spec.units[start:]] + spec.head
    return StagedModel(model, spec.stem, stages, head, ends_names, family=spec.family)


# Methods whose override by a subclass makes the built-in split unsafe.
_FORWARD_METHODS = ("forward", "forward_features")


def _find_family(model: nn.Module):
    for base, make_spec in _timm_families() + _hf_families():
        if isinstance(model, base):
            for meth in _FORWARD_METHODS:
                base_fn = getattr(base, meth, None)
                if base_fn is not None and getattr(type(model), meth, None) is not base_fn:
                    raise UnsupportedModelError(
                        f"{type(model).__name__} subclasses {base.__module__}.{base.__name__} but overrides "
                        f"`{meth}`, so the built-in {base.__name__} split may not reproduce it; " + _DECLARE_HELP
                    )
            return make_spec
    return None


# ====================================================================== public API
def _check_names(model: nn.Module, names: Sequence[str], what: str, allow_pseudo: bool) -> None:
    def known(n) -> bool:
        if not isinstance(n, str) or n == "":
            return False
        try:
            model.get_submodule(n)
            return True
        except AttributeError:
            return allow_pseudo and n in PSEUDO_MODULES

    bad = [n for n in names if not known(n)]
    if bad:
        children = [n for n, _ in model.named_children()]
        raise UnsupportedModelError(
            f"{type(model).__name__}: unknown module name(s) {bad} in {what} (top-level children: "
            f"{', '.join(children[:8])}); " + _DECLARE_HELP
        )


def split_model(
    model: nn.Module,
    stage_names: Sequence[str] | None = None,
    stem: Sequence[str] | None = None,
    head: Sequence[str] | None = None,
    *,
    num_groups: int | None = None,
) -> StagedModel:
    """Split ``model`` into stem -> stages -> head (parameters are shared, nothing is copied).

    Args:
        model: a classifier (timm model or transformers ``*ForImageClassification``, or any module
            when the split is declared).
        stage_names: module names whose outputs are the stage outputs.  For a built-in family this
            alone regroups the built-in units (e.g. ``["layer2", "layer4"]`` for a ResNet or any
            blocks of a ViT); with ``stem`` and ``head`` it declares a sequential split.
        stem: module names applied in order before stage 0 (declared split; may be empty).
        head: module names applied in order after the last stage (declared split); the
            pseudo-names ``"flatten"`` and ``"avgpool"`` are allowed.
        num_groups: number of stages for the built-in families (ViT blocks are grouped into
            ``num_groups`` groups as even as possible, default 4; CNN stages likewise, default
            all natural stages).  Ignored for declared splits.

    Raises:
        UnsupportedModelError: not a built-in family and no complete declaration, or invalid
            names; the message explains how to declare the split.
    """
    if isinstance(model, StagedModel):
        if stage_names is None and stem is None and head is None and num_groups is None:
            return model
        model = model.model

    if stem is not None or head is not None:
        if stage_names is None or stem is None or head is None:
            declared = (("stage_names", stage_names), ("stem", stem), ("head", head))
            missing = [n for n, v in declared if v is None]
            raise UnsupportedModelError(
                f"{type(model).__name__}: incomplete split declaration, missing {missing}; " + _DECLARE_HELP
            )
        for what, names in (("stage_names", stage_names), ("stem", stem), ("head", head)):
            if isinstance(names, str):
                raise UnsupportedModelError(f"{what} must be a sequence of module names, got the string {names!r}")
        if len(stage_names) == 0:
            raise UnsupportedModelError(f"{type(model).__name__}: `stage_names` is empty; " + _DECLARE_HELP)
        _check_names(model, stem, "stem", allow_pseudo=True)
        _check_names(model, stage_names, "stage_names", allow_pseudo=False)
        _check_names(model, head, "head", allow_pseudo=True)
        return StagedModel(
            model, list(stem), [[n] for n in stage_names], list(head), list(stage_names), family="declared"
        )

    if isinstance(stage_names, str):
        raise UnsupportedModelError(f"stage_names must be a sequence of module names, got the string {stage_names!r}")
    make_spec = _find_family(model)
    if make_spec is None:
        children = [n for n, _ in model.named_children()]
        what = "" if stage_names is None else " (stage names alone are not enough for it)"
        shown = ", ".join(children[:8]) + (", ..." if len(children) > 8 else "")
        raise UnsupportedModelError(
            f"no hand-written split for {type(model).__name__}{what} (children: {shown}); " + _DECLARE_HELP
        )
    return _build_from_spec(model, make_spec(model), stage_names, num_groups)


def stage_names(model: nn.Module, num_groups: int | None = None) -> list[str]:
    """Stage output module names of the built-in split of ``model`` (see :func:`split_model`)."""
    if isinstance(model, StagedModel):
        return list(model.stage_names)
    return list(split_model(model, num_groups=num_groups).stage_names)
