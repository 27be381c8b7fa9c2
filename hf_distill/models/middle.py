"""Running a model from one of its stages on (:func:`run_from_middle`), for BYOT and SFTN.

Running a model from the middle (:class:`MiddleRunner`) substitutes a stage's output inside the
model's own forward (forward hooks), and is verified at construction on a probe, bit-identical to
``model(x)``; when it is not, it is refused with one line.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .calling import logits_of
from .layouts import feature_tensor
from .taps import FeatureTaps, _DryRun, default_call, resolve_module
from .view import StagesNotFoundError, _in_chans, _own_size, _probe_input, _unwrap

__all__ = ["MiddleRunner", "run_from_middle"]


class _Stop(Exception):
    pass


def _substitute(output: Any, h: torch.Tensor) -> Any:
    """``output`` with its feature tensor (as :func:`feature_tensor` finds it) replaced by ``h``."""
    if isinstance(output, torch.Tensor):
        return h
    target = feature_tensor(output)
    if isinstance(output, (tuple, list)):
        items = [h if v is target else v for v in output]
        return type(output)(items) if isinstance(output, list) else tuple(items)
    if isinstance(output, dict):
        for k, v in output.items():
            if v is target:
                output[k] = h
        return output
    raise TypeError(f"cannot substitute into an output of type {type(output).__name__}")


def _slice_batch(output: Any, keep: torch.Tensor, batch: int) -> Any:
    if isinstance(output, torch.Tensor):
        return output[keep] if output.ndim and output.shape[0] == batch else output
    if isinstance(output, (tuple, list)):
        items = [_slice_batch(v, keep, batch) for v in output]
        return items if isinstance(output, list) else tuple(items)
    if isinstance(output, dict):
        for k, v in list(output.items()):
            output[k] = _slice_batch(v, keep, batch)
        return output
    return output


class MiddleRunner:
    """Runs a model from one of its stages on, inside the model's own forward.

    ``forward_from(i, h)`` runs the model on a stand-in input without gradients up to stage ``i - 1``,
    whose output a forward hook replaces by ``h``; the rest of the model's own forward runs on ``h``
    with gradients. So no split of the model has to be written or derived: the model's forward is the
    split. :meth:`verify` checks on a probe that the result is bit-identical to ``model(x)`` (nothing
    but the stage output carries the input on), which construction does.
    """

    def __init__(self, model: nn.Module, stage_names: Sequence[str], call: Callable | None = None,
                 in_chans: int | None = None):
        self.model = model
        self.stage_names = list(stage_names)
        self.call = call or default_call
        self.in_chans = in_chans or _in_chans(model)
        for n in self.stage_names:
            resolve_module(model, n)

    def __len__(self) -> int:
        return len(self.stage_names)

    def _input_like(self, h: torch.Tensor, image_size) -> torch.Tensor:
        dtype = h.dtype if h.is_floating_point() else torch.float32
        return torch.zeros(h.shape[0], self.in_chans, *image_size, dtype=dtype, device=h.device)

    def forward_from(self, i: int, h: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Logits of the model run from the output ``h`` of stage ``i - 1`` (``image_size``: the input
        size the stand-in input has, the size at which stage ``i - 1`` gives ``h``'s shape)."""
        if not 1 <= i <= len(self.stage_names):
            raise IndexError(f"forward_from: stage index {i} not in [1, {len(self.stage_names)}]")
        module = resolve_module(self.model, self.stage_names[i - 1])
        grad = torch.is_grad_enabled()
        state = {"done": False}

        def pre(m, args, kwargs=None):
            torch.set_grad_enabled(False)  # the stand-in's stages before the branch point are not trained

        def hook(m, args, output):
            torch.set_grad_enabled(grad)
            if state["done"]:
                raise RuntimeError(f"stage module {self.stage_names[i - 1]!r} runs more than once per forward")
            state["done"] = True
            return _substitute(output, h)

        handles = [self.model.register_forward_pre_hook(pre), module.register_forward_hook(hook)]
        try:
            out = self.call(self.model, self._input_like(h, image_size))
        finally:
            for handle in handles:
                handle.remove()
            torch.set_grad_enabled(grad)
        if not state["done"]:
            raise RuntimeError(f"the forward did not run stage module {self.stage_names[i - 1]!r}")
        return logits_of(out)

    def run_with_exits(self, x: torch.Tensor, on_stage: Callable[[int, torch.Tensor], torch.Tensor | None]):
        """One forward of ``x``; after stage ``i < K - 1`` ``on_stage(i, h)`` returns the rows to keep
        (``None``: all), and only those are computed further. Returns the final logits of the kept
        rows, or ``None`` when none is left."""
        handles, alive = [], {"n": x.shape[0]}
        for i, name in enumerate(self.stage_names[:-1]):
            def hook(m, args, output, i=i):
                keep = on_stage(i, feature_tensor(output))
                if keep is None:
                    return None
                if not bool(keep.any()):
                    raise _Stop
                batch = alive["n"]
                alive["n"] = int(keep.sum())
                return _slice_batch(output, keep, batch)
            handles.append(resolve_module(self.model, name).register_forward_hook(hook))
        try:
            return logits_of(self.call(self.model, x))
        except _Stop:
            return None
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def verify(self, x: torch.Tensor) -> None:
        """Raise :class:`StagesNotFoundError` (one line) unless running from every stage reproduces
        ``model(x)`` bit-identically on ``x`` (eval mode; modes restored)."""
        with _DryRun(self.model):
            ref = logits_of(self.call(self.model, x))
            with FeatureTaps(self.model, self.stage_names, detach=True) as taps:
                self.call(self.model, x)
                feats = taps.pop()
            for i, name in enumerate(self.stage_names[:-1], start=1):
                try:
                    out = self.forward_from(i, feats[name], x.shape[-2:])
                    same = out.shape == ref.shape and torch.equal(out, ref)
                except Exception as err:  # noqa: BLE001
                    raise StagesNotFoundError(f"running {type(self.model).__name__} from {name!r} fails: "
                                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                                              ) from None
                if not same:
                    raise StagesNotFoundError(f"{type(self.model).__name__} run from {name!r} differs from its own "
                                              "forward (its later layers see more than that stage's output)")


def run_from_middle(model: nn.Module, stage_names: Sequence[str]):
    """Something with ``forward_from`` over ``stage_names``: the hand-written split of
    :mod:`hf_distill.models.stages` where it covers the model (it runs only the later stages, where the
    runner also runs the earlier ones, without gradients, on a stand-in input), else a
    :class:`MiddleRunner` verified on a probe. Raises :class:`StagesNotFoundError` (one line)."""
    from .stages import UnsupportedModelError, split_model

    model = _unwrap(model)
    try:
        return split_model(model, stage_names=list(stage_names))
    except UnsupportedModelError:
        pass
    runner = MiddleRunner(model, stage_names)
    runner.verify(_probe_input(model, _own_size(model)))
    return runner
