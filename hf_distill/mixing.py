"""Mixup / CutMix for distillation, mixed once so that student and teachers see the same images.

Function matching (Beyer et al., CVPR 2022) needs a *consistent* teacher: its target is
``teacher(mix(x))``, never ``mix(teacher(x))``. The trainer mixes each training batch once, before
the student and every teacher run, and the label term learns the mixed soft labels.

The mixing is timm's (:class:`timm.data.Mixup`: the same arguments, the same draws, the partner of
sample ``i`` is sample ``B - 1 - i``). Only where the draws come from differs: each batch's
parameters are drawn from a numpy ``RandomState`` seeded by ``(seed, epoch, batch index)``, so they
are a pure function of where the batch is, whatever the process, the resume point or the
accumulation. With the epoch's sample order (:class:`EpochOrder`) that is what lets a teacher-output
cache store the logits of the *mixed* views and a cached run replay the live run exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

MODES = ("batch", "pair", "elem")


@dataclass(frozen=True)
class MixingConfig:
    """timm's Mixup arguments (``mixup_prob`` is timm's ``prob``, ``mixup_switch_prob`` its ``switch_prob``)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.0
    correct_lam: bool = True

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cutmix_minmax"] = list(self.cutmix_minmax) if self.cutmix_minmax is not None else None
        return d

    @classmethod
    def from_args(cls, args) -> "MixingConfig":
        minmax = getattr(args, "cutmix_minmax", None)
        return cls(mixup_alpha=args.mixup_alpha or 0.0, cutmix_alpha=args.cutmix_alpha or 0.0,
                   cutmix_minmax=tuple(minmax) if minmax else None, mixup_prob=args.mixup_prob,
                   mixup_switch_prob=args.mixup_switch_prob, mixup_mode=args.mixup_mode,
                   label_smoothing=args.label_smoothing_factor)

    def validate(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
        if not (0.0 <= self.mixup_prob <= 1.0 and 0.0 <= self.mixup_switch_prob <= 1.0):
            raise ValueError("mixup_prob and mixup_switch_prob must be in [0, 1]")
        if self.mixup_mode not in MODES:
            raise ValueError(f"mixup_mode must be one of {', '.join(MODES)}, got '{self.mixup_mode}'")
        if self.cutmix_minmax is not None and len(self.cutmix_minmax) != 2:
            raise ValueError("cutmix_minmax takes two ratios (min, max)")


@dataclass
class MixParams:
    """How one batch is mixed: per sample, its partner, lambda, and a CutMix box (or none)."""

    lam: list[float]
    partner: list[int]
    boxes: list[tuple[int, int, int, int] | None] = field(default_factory=list)  # (y_low, y_high, x_low, x_high)

    @property
    def identity(self) -> bool:
        return all(v == 1.0 for v in self.lam)


def _partners(batch_size: int) -> list[int]:
    """timm pairs sample i with B - 1 - i; an odd batch mixes its first B - 1 samples and keeps the last."""
    even = batch_size - batch_size % 2
    return [even - 1 - i for i in range(even)] + list(range(even, batch_size))


class BatchMixer:
    """Draws a batch's mixing parameters with timm's own code, and applies them."""

    def __init__(self, config: MixingConfig, num_classes: int, seed: int = 0):
        from timm.data import Mixup

        config.validate()
        self.config, self.num_classes, self.seed = config, int(num_classes), int(seed)
        self._timm = Mixup(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                           cutmix_minmax=config.cutmix_minmax, prob=config.mixup_prob,
                           switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                           correct_lam=config.correct_lam, label_smoothing=config.label_smoothing,
                           num_classes=self.num_classes)

    # -- parameters -----------------------------------------------------------------------------
    def params(self, epoch: int, batch_index: int, shape: Sequence[int]) -> MixParams:
        """The parameters of batch ``batch_index`` of ``epoch`` for images of ``shape`` (B, C, H, W)."""
        state = np.random.get_state()  # timm draws from numpy's global RNG: lend it our batch's stream
        np.random.seed([self.seed, int(epoch), int(batch_index)])
        try:
            return self.draw(shape)
        finally:
            np.random.set_state(state)

    def draw(self, shape: Sequence[int]) -> MixParams:
        """Parameters drawn from numpy's global RNG in timm's order (what ``Mixup.__call__`` would do)."""
        from timm.data.mixup import cutmix_bbox_and_lam

        mix, cfg = self._timm, self.config
        batch_size = int(shape[0])
        partner = _partners(batch_size)
        even = batch_size - batch_size % 2
        lam = [1.0] * batch_size
        boxes: list = [None] * batch_size
        if even == 0:
            return MixParams(lam, partner, boxes)
        if cfg.mixup_mode == "batch":
            value, cutmix = mix._params_per_batch()
            if value != 1.0 and cutmix:
                box, value = cutmix_bbox_and_lam(tuple(shape), value, ratio_minmax=mix.cutmix_minmax,
                                                 correct_lam=mix.correct_lam)
                boxes[:even] = [tuple(int(v) for v in box)] * even
            lam[:even] = [float(value)] * even
            return MixParams(lam, partner, boxes)
        n = even // 2 if cfg.mixup_mode == "pair" else even
        values, cutmix = mix._params_per_elem(n)
        for i in range(n):
            if values[i] != 1.0 and cutmix[i]:
                box, v = cutmix_bbox_and_lam(tuple(shape[1:]), values[i], ratio_minmax=mix.cutmix_minmax,
                                             correct_lam=mix.correct_lam)
                boxes[i] = tuple(int(b) for b in box)
                values[i] = v
        values = [float(np.float32(v)) for v in values]
        if cfg.mixup_mode == "pair":  # i and its partner share lambda and box
            values = values + values[::-1]
            boxes[:even] = boxes[:n] + boxes[:n][::-1]
        lam[:even] = values
        return MixParams(lam, partner, boxes)

    # -- applying -------------------------------------------------------------------------------
    @staticmethod
    def apply(x: torch.Tensor, params: MixParams) -> torch.Tensor:
        """The mixed batch (``x`` itself is left as it is)."""
        if params.identity:
            return x
        out = x.clone()
        for i, (lam, j) in enumerate(zip(params.lam, params.partner)):
            if lam == 1.0:
                continue
            box = params.boxes[i] if params.boxes else None
            if box is not None:
                yl, yh, xl, xh = box
                out[i, :, yl:yh, xl:xh] = x[j, :, yl:yh, xl:xh]
            else:
                out[i] = x[i] * lam + x[j] * (1.0 - lam)
        return out

    def targets(self, labels: torch.Tensor, params: MixParams) -> torch.Tensor:
        """Mixed soft labels ``lam * y_i + (1 - lam) * y_partner`` (one-hot with ``label_smoothing``, as timm)."""
        from timm.data.mixup import one_hot

        s = self.config.label_smoothing
        y = one_hot(labels, self.num_classes, on_value=1.0 - s + s / self.num_classes,
                    off_value=s / self.num_classes)
        lam = torch.tensor(params.lam, dtype=y.dtype, device=y.device).unsqueeze(1)
        return y * lam + y[torch.tensor(params.partner, device=y.device)] * (1.0 - lam)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None, epoch: int, batch_index: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, MixParams]:
        params = self.params(epoch, batch_index, x.shape)
        return self.apply(x, params), (self.targets(labels, params) if labels is not None else None), params


class EpochOrder:
    """The order in which an epoch visits a dataset: ``numpy.random.default_rng([seed, epoch]).permutation``.

    With mixing, batch composition matters (a sample is mixed with its batch partner), so live
    training and a teacher-output cache both follow this order, and every batch knows where it is.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed = int(size), int(seed)
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (int(epoch), np.random.default_rng([self.seed, int(epoch)]).permutation(self.size))
        return self._cached[1]


class EpochOrderedDataset(torch.utils.data.Dataset):
    """A map-style dataset visited in :class:`EpochOrder`: item ``p`` is the sample at position ``p`` of the
    current epoch's permutation, with ``mix_epoch`` and ``mix_position`` so the batch knows where it is.

    The trainer uses it (with a sequential sampler) whenever mixing is on; ``set_epoch`` is called by
    :class:`EpochCallback` at every epoch.
    """

    ordered_by_epoch = True  # the trainer then reads it with a sequential sampler

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.order = EpochOrder(len(dataset), seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions) -> list[dict[str, Any]]:
        perm = self.order.permutation(self.epoch)
        indices = [int(perm[int(p)]) for p in positions]
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return [{**item, "mix_epoch": self.epoch, "mix_position": int(p)} for item, p in zip(items, positions)]


def mix_batch(mixer: BatchMixer, inputs: dict, batch_size: int, dataset_length: int, num_processes: int = 1):
    """A training batch mixed once (student and teachers see the same images), and its mixed soft labels.

    The batch carries its positions in the epoch order (``EpochOrderedDataset``): where it sits decides its
    mixing; a teacher-output cache's batch carries the parameters its teacher saw, which are replayed."""
    x, labels = inputs["pixel_values"], inputs.get("labels")
    positions, epochs = inputs.get("mix_position"), inputs.get("mix_epoch")
    if positions is None:
        raise RuntimeError("mixed training needs batches in the epoch order (EpochOrderedDataset); a custom "
                           "sampler or collator dropped it")
    start = int(positions[0])
    expected = torch.arange(start, start + len(positions), device=positions.device)
    in_order = not start % batch_size and torch.equal(positions, expected)
    if not in_order and num_processes > 1 and "mix_lam" not in inputs:
        # accelerate's even_batches completed the epoch's last round with samples from the epoch's start: a
        # batch of its own, mixed within itself by draws of its own (past the epoch's batch indices)
        batches = -(-dataset_length // batch_size)
        params = mixer.params(int(epochs[0]), batches + start, x.shape)
    elif not in_order:
        raise RuntimeError(f"a mixed batch must be a run of consecutive positions starting at a multiple of the "
                           f"batch size ({batch_size}); got positions {positions.tolist()[:4]}...")
    elif "mix_lam" in inputs:  # a teacher-output cache: the parameters its teacher saw, replayed
        boxes = [tuple(int(v) for v in b) if b[0] >= 0 else None for b in inputs["mix_box"].tolist()]
        params = MixParams(lam=[float(v) for v in inputs["mix_lam"].tolist()],
                           partner=[int(p) - start for p in inputs["mix_partner"].tolist()], boxes=boxes)
    else:
        params = mixer.params(int(epochs[0]), start // batch_size, x.shape)
    return mixer.apply(x, params), (mixer.targets(labels, params) if labels is not None else None)
