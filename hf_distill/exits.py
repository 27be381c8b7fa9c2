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
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .taps import NCHW, NHWC, TOKENS, to_nchw

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


BOTTLENECKS = ("sepconv", "conv")


def _channels(shape, layout) -> int:
    return shape[-1] if layout in (NHWC, TOKENS) else shape[1]


class ExitHead(nn.Module):
    """Bottleneck to the deepest feature's shape, then pooling + linear classifier."""

    def __init__(self, spec: ExitSpec):
        super().__init__()
        self.spec = spec
        c_in, c_out = _channels(spec.in_shape, spec.in_layout), _channels(spec.out_shape, spec.out_layout)
        self.tokens = spec.in_layout == TOKENS and spec.out_layout == TOKENS
        if self.tokens:
            self.bottleneck = nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, c_out))
            self.norm = nn.LayerNorm(c_out)
        else:
            if spec.bottleneck not in BOTTLENECKS:
                raise ValueError(f"exit bottleneck must be one of {BOTTLENECKS}, got '{spec.bottleneck}'")
            h_in = spec.in_shape[-2] if spec.in_layout == NCHW else spec.in_shape[1]
            h_out = spec.out_shape[-2] if spec.out_layout == NCHW else spec.out_shape[1]
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
        return (s.out_shape[-2], s.out_shape[-1]) if s.out_layout == NCHW else (s.out_shape[1], s.out_shape[2])

    def features(self, h: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """The bottlenecked feature F_i, in the deepest feature's common layout, at spatial ``size``
        (the deepest feature's actual size; default: its size in the probe the exit was built from)."""
        if self.tokens:
            return self.bottleneck(h)
        y = self.bottleneck(to_nchw(h, self.spec.in_layout, self.spec.num_prefix_tokens))
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


def deepest_target(f_k: torch.Tensor, layout: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """The deepest feature F_K in the layout exits produce (NCHW maps, or tokens as they are)."""
    return f_k if layout == TOKENS else to_nchw(f_k, layout, num_prefix_tokens)


class MultiExitModel(nn.Module):
    """A student with its exits, for depth-adaptive inference. Load with :meth:`from_pretrained`."""

    def __init__(self, student: nn.Module, exits: nn.ModuleList, stage_names: Sequence[str], staged=None):
        super().__init__()
        from .stages import split_model

        self.student = student
        self.exits = exits
        # ``staged``: a StagedModel for models whose split must be declared (stem / head modules)
        self.staged = staged if staged is not None else split_model(student, stage_names=list(stage_names))
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
            return self.staged(pixel_values)
        if mode == "ensemble":
            return self._ensemble(pixel_values)
        if mode == "early_exit":
            if early_exit_threshold is None:
                raise ValueError("mode='early_exit' needs early_exit_threshold")
            return self._early_exit(pixel_values, float(early_exit_threshold))
        raise ValueError(f"mode must be 'deepest', 'ensemble' or 'early_exit', got '{mode}'")

    def _ensemble(self, x: torch.Tensor) -> torch.Tensor:
        h = self.staged.stem(x)
        probs = []
        for i in range(len(self.staged)):
            h = self.staged.run_stage(i, h)
            if i < len(self.exits):
                probs.append(self.exits[i](h)[0].float().softmax(-1))
        probs.append(self.staged.head(h).float().softmax(-1))
        return torch.stack(probs).mean(0).log()

    def _early_exit(self, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
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

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        import safetensors.torch

        from .models import save_native

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

        from .models import load_model

        folder = Path(folder)
        config_path = folder / EXITS_CONFIG
        if not config_path.exists():
            raise FileNotFoundError(f"{folder} has no {EXITS_CONFIG}: it is a plain model, load it with load_model")
        config = json.loads(config_path.read_text())
        student = load_model(str(folder), **load_kw)
        specs = [ExitSpec(**{**e, "in_shape": tuple(e["in_shape"]), "out_shape": tuple(e["out_shape"])})
                 for e in config["exits"]]
        exits = nn.ModuleList(ExitHead(s) for s in specs)
        exits.load_state_dict(safetensors.torch.load_file(str(folder / EXITS_WEIGHTS)))
        return cls(student, exits, config["stage_names"]).eval()


def _scatter(buffer: torch.Tensor | None, idx: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    if buffer is None:
        buffer = values.new_zeros((n, values.shape[-1]))
    buffer[idx] = values.to(buffer.dtype)
    return buffer
