"""Intermediate classifiers ("exits") and the multi-exit model with depth-adaptive inference.

Used by Be Your Own Teacher (docs/methods.md). An exit after stage ``i`` is a
*bottleneck* that brings the stage's features to the deepest feature's shape, then a
*classifier* (global pooling + linear). Feature maps get, per halving of the spatial size, a
depthwise-separable block (depthwise 3x3 stride 2, pointwise 1x1 doubling the channels, BN,
ReLU between blocks; ``bottleneck="sepconv"``, the default, light like the original SepConv
exits) and a 1x1 convolution where the deepest channel count is not reached yet; or full
strided 3x3 convolutions + BN + ReLU and a 1x1 convolution (``"conv"``, ~7x the parameters).
Both end with BatchNorm (no ReLU) so they can match any F_K. Token
sequences (ViT/DeiT) get LayerNorm + Linear over channels and classify the class token (or
the mean token when there is none).

:class:`MultiExitModel` is what ``byot_export_exits=True`` saves: the student in its native
format plus ``exits.safetensors`` / ``exits_config.json``. It offers ``mode="deepest"``
(plain model), ``"ensemble"`` (mean of all classifiers' probabilities) and ``"early_exit"``
(run stage by stage; a sample leaves at the first exit whose max softmax reaches the
threshold, and is not computed further).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layouts import NCHW, NHWC, TOKENS, to_nchw

EXITS_WEIGHTS = "exits.safetensors"
EXITS_CONFIG = "exits_config.json"


@dataclass
class ExitSpec:
    """Shapes an exit is built from (saved with exported multi-exit models)."""

    layer: str
    in_shape: tuple[int, ...]
    in_layout: str
    out_shape: tuple[int, ...]
    out_layout: str
    num_classes: int
    num_prefix_tokens: int = 0
    bottleneck: str = "conv"  # exits saved before "sepconv" existed have no such field
    # token grids at the probe (hf_distill.models.view), for tokens compared as maps (hierarchical token
    # models, tokens facing maps); None: square
    in_grid: Optional[tuple[int, int]] = None
    out_grid: Optional[tuple[int, int]] = None
    out_prefix: Optional[int] = None  # the deepest feature's prefix tokens (None: num_prefix_tokens)
    as_map: bool = False  # compare maps even between tokens (another exit of the model changes the token count)

    def __post_init__(self):
        for f in ("in_grid", "out_grid", "in_shape", "out_shape"):
            if getattr(self, f) is not None:
                setattr(self, f, tuple(getattr(self, f)))


BOTTLENECKS = ("sepconv", "conv")


def _channels(shape, layout) -> int:
    return shape[-1] if layout in (NHWC, TOKENS) else shape[1]


def _spatial(shape, layout, grid, prefix) -> int:
    if layout == NCHW:
        return shape[-2]
    if layout == NHWC:
        return shape[1]
    return grid[0] if grid is not None else max(1, math.isqrt(max(shape[1] - prefix, 1)))


def _grid_for(t: torch.Tensor, prefix: int, grid) -> Optional[tuple[int, int]]:
    return tuple(grid) if grid is not None and t.shape[1] - prefix == grid[0] * grid[1] else None


def tokens_as_map(t: torch.Tensor, layout: str, prefix: int, grid=None) -> torch.Tensor:
    """``to_nchw`` on the probe's (possibly non-square) token grid when the count is the probe's."""
    return to_nchw(t, layout, prefix, grid_size=_grid_for(t, prefix, grid) if layout == TOKENS else None)


class ExitHead(nn.Module):
    """Bottleneck to the deepest feature's shape, then pooling + linear classifier."""

    def __init__(self, spec: ExitSpec):
        super().__init__()
        self.spec = spec
        c_in, c_out = _channels(spec.in_shape, spec.in_layout), _channels(spec.out_shape, spec.out_layout)
        out_prefix = spec.num_prefix_tokens if spec.out_prefix is None else spec.out_prefix
        self.out_prefix = out_prefix
        # tokens stay tokens when the exit's and the deepest token counts agree (ViT); hierarchical token
        # models (Swin, PVT ...) compare maps on their grids
        self.tokens = (spec.in_layout == TOKENS and spec.out_layout == TOKENS and not spec.as_map
                       and spec.in_shape[1] - spec.num_prefix_tokens == spec.out_shape[1] - out_prefix)
        if self.tokens:
            self.bottleneck = nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, c_out))
            self.norm = nn.LayerNorm(c_out)
        else:
            if spec.bottleneck not in BOTTLENECKS:
                raise ValueError(f"exit bottleneck must be one of {BOTTLENECKS}, got '{spec.bottleneck}'")
            h_in = _spatial(spec.in_shape, spec.in_layout, spec.in_grid, spec.num_prefix_tokens)
            h_out = _spatial(spec.out_shape, spec.out_layout, spec.out_grid, out_prefix)
            steps = max(0, int(math.floor(math.log2(max(h_in, 1) / max(h_out, 1)) + 1e-6)))
            layers: list[nn.Module] = []
            c = c_in
            if spec.bottleneck == "conv":  # the first layout (kept as is: saved exits reload)
                for _ in range(steps):
                    c_next = min(c_out, c * 2)
                    layers += [nn.Conv2d(c, c_next, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_next),
                               nn.ReLU(inplace=True)]
                    c = c_next
                layers += [nn.Conv2d(c, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
            else:
                for _ in range(steps):
                    c_next = min(c_out, c * 2)
                    if layers:
                        layers.append(nn.ReLU(inplace=True))
                    layers += [nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False),
                               nn.Conv2d(c, c_next, 1, bias=False), nn.BatchNorm2d(c_next)]
                    c = c_next
                if c != c_out or not layers:
                    if layers:
                        layers.append(nn.ReLU(inplace=True))
                    layers += [nn.Conv2d(c, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
            self.bottleneck = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_out, spec.num_classes)

    def target_size(self) -> tuple[int, int] | None:
        if self.tokens:
            return None
        s = self.spec
        if s.out_layout == TOKENS:
            if s.out_grid is not None:
                return tuple(s.out_grid)
            side = max(1, math.isqrt(max(s.out_shape[1] - self.out_prefix, 1)))
            return side, side
        return (s.out_shape[-2], s.out_shape[-1]) if s.out_layout == NCHW else (s.out_shape[1], s.out_shape[2])

    def features(self, h: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """The bottlenecked feature F_i, in the deepest feature's common layout, at spatial ``size``
        (the deepest feature's actual size; default: its size in the probe the exit was built from)."""
        if self.tokens:
            return self.bottleneck(h)
        y = self.bottleneck(tokens_as_map(h, self.spec.in_layout, self.spec.num_prefix_tokens, self.spec.in_grid))
        size = tuple(size) if size is not None else self.target_size()
        if tuple(y.shape[-2:]) != size:
            y = F.adaptive_avg_pool2d(y, size)
        return y

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            pooled = f[:, 0] if self.spec.num_prefix_tokens else f.mean(1)
            return self.classifier(self.norm(pooled))
        return self.classifier(f.mean(dim=(-2, -1)))

    def forward(self, h: torch.Tensor, size: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(h, size)
        return self.classify(f), f


def deepest_target(f_k: torch.Tensor, layout: str, num_prefix_tokens: int = 0, as_map: bool = False,
                   grid=None) -> torch.Tensor:
    """The deepest feature F_K in the layout exits produce (NCHW maps, or tokens as they are unless
    ``as_map``: the exits compare maps)."""
    return f_k if layout == TOKENS and not as_map else tokens_as_map(f_k, layout, num_prefix_tokens, grid)


class MultiExitModel(nn.Module):
    """A student with its exits, for depth-adaptive inference. Load with :meth:`from_pretrained`."""

    def __init__(self, student: nn.Module, exits: nn.ModuleList, stage_names: Sequence[str], staged=None):
        super().__init__()
        from .middle import run_from_middle

        self.student = student
        self.exits = exits
        # ``staged``: a StagedModel (hand-written or declared split) or a verified MiddleRunner
        staged = staged if staged is not None else run_from_middle(student, list(stage_names))
        if isinstance(staged, nn.Module):
            self.staged = staged
        else:  # a MiddleRunner is not a module (it must not register the student twice)
            self.__dict__["staged"] = staged
        if len(exits) != len(self.staged) - 1:
            raise ValueError(f"{len(exits)} exits for {len(self.staged)} stages: need one per stage but the last")

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, mode: str = "deepest", early_exit_threshold: float | None = None):
        """Logits, and for ``early_exit`` also the exit index each sample used (``K`` = deepest).

        ``mode``: ``deepest`` (the plain student), ``ensemble`` (mean probability of all
        classifiers, returned as log-probabilities), ``early_exit`` (needs a threshold).
        """
        if early_exit_threshold is not None:
            mode = "early_exit"
        if mode == "deepest":
            return self.staged(pixel_values) if isinstance(self.staged, nn.Module) else \
                self.staged.run_with_exits(pixel_values, lambda i, h: None)
        if mode == "ensemble":
            return self._ensemble(pixel_values)
        if mode == "early_exit":
            if early_exit_threshold is None:
                raise ValueError("mode='early_exit' needs early_exit_threshold")
            return self._early_exit(pixel_values, float(early_exit_threshold))
        raise ValueError(f"mode must be 'deepest', 'ensemble' or 'early_exit', got '{mode}'")

    def _ensemble(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.staged, nn.Module):  # one forward of the model's own, exits on its stages
            probs = []
            last = self.staged.run_with_exits(
                x, lambda i, h: probs.append(self.exits[i](h)[0].float().softmax(-1)) if i < len(self.exits) else None)
            probs.append(last.float().softmax(-1))
            return torch.stack(probs).mean(0).log()
        h = self.staged.stem(x)
        probs = []
        for i in range(len(self.staged)):
            h = self.staged.run_stage(i, h)
            if i < len(self.exits):
                probs.append(self.exits[i](h)[0].float().softmax(-1))
        probs.append(self.staged.head(h).float().softmax(-1))
        return torch.stack(probs).mean(0).log()

    def _early_exit(self, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.staged, nn.Module):
            return self._early_exit_hooked(x, threshold)
        n = x.shape[0]
        h = self.staged.stem(x)
        idx = torch.arange(n, device=x.device)  # samples still being computed
        logits_out: torch.Tensor | None = None
        exit_used = torch.full((n,), len(self.exits), dtype=torch.long, device=x.device)
        for i in range(len(self.staged)):
            h = self.staged.run_stage(i, h)
            if i == len(self.exits):
                z = self.staged.head(h)
                logits_out = _scatter(logits_out, idx, z, n)
                break
            z = self.exits[i](h)[0]
            done = z.float().softmax(-1).amax(-1) >= threshold
            if done.any():
                logits_out = _scatter(logits_out, idx[done], z[done], n)
                exit_used[idx[done]] = i
                keep = ~done
                idx, h = idx[keep], h[keep]  # exited samples are not computed further
            if idx.numel() == 0:
                break
        return logits_out, exit_used

    def _early_exit_hooked(self, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        # the model's own forward; after each exit's stage the exited rows are dropped from the batch
        n = x.shape[0]
        state = {"idx": torch.arange(n, device=x.device), "out": None}
        exit_used = torch.full((n,), len(self.exits), dtype=torch.long, device=x.device)

        def on_stage(i, h):
            if i >= len(self.exits):
                return None
            z = self.exits[i](h)[0]
            done = z.float().softmax(-1).amax(-1) >= threshold
            if not done.any():
                return None
            idx = state["idx"]
            state["out"] = _scatter(state["out"], idx[done], z[done], n)
            exit_used[idx[done]] = i
            state["idx"] = idx[~done]
            return ~done

        z = self.staged.run_with_exits(x, on_stage)
        if z is not None:
            state["out"] = _scatter(state["out"], state["idx"], z, n)
        return state["out"], exit_used

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        import safetensors.torch

        from .saving import save_native

        folder = Path(folder)
        save_native(self.student, folder)
        state = {k: v.detach().contiguous() for k, v in self.exits.state_dict().items()}
        safetensors.torch.save_file(state, str(folder / EXITS_WEIGHTS))
        config = {"stage_names": list(self.staged.stage_names),
                  "exits": [asdict(e.spec) for e in self.exits]}
        (folder / EXITS_CONFIG).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **load_kw) -> "MultiExitModel":
        """Load a folder written by ``byot_export_exits=True`` (or :meth:`save_pretrained`)."""
        import safetensors.torch

        from .loading import load_model

        folder = Path(folder)
        config_path = folder / EXITS_CONFIG
        if not config_path.exists():
            raise FileNotFoundError(f"{folder} has no {EXITS_CONFIG}: it is a plain model, load it with load_model")
        config = json.loads(config_path.read_text())
        student = load_model(str(folder), **load_kw)
        specs = [ExitSpec(**e) for e in config["exits"]]
        exits = nn.ModuleList(ExitHead(s) for s in specs)
        exits.load_state_dict(safetensors.torch.load_file(str(folder / EXITS_WEIGHTS)))
        return cls(student, exits, config["stage_names"]).eval()


def _scatter(buffer: torch.Tensor | None, idx: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    if buffer is None:
        buffer = values.new_zeros((n, values.shape[-1]))
    buffer[idx] = values.to(buffer.dtype)
    return buffer
