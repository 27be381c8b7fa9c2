"""Backbone features of any vision model: a summary vector and a spatial map, for feature distillation.

:func:`backbone_features` reads, from one forward pass of a teacher or a student:

* **summary** ``[B, D]``: the class token / pooled output / global average of a CNN map, as the
  model's own library defines its image embedding (DINOv2 and ViT: the normed class token; CLIP with
  projection: ``image_embeds``; SigLIP: its attention-pooling head; timm: ``forward_head(...,
  pre_logits=True)``);
* **spatial** ``[B, D, h, w]``: the patch tokens laid on their grid with every class, register and
  distillation token removed (counts and grid from the model's own config/attributes), or a CNN map
  (channels-last maps permuted).

Supported: transformers ``Dinov2Model`` (also with registers), ``CLIPVisionModel`` /
``CLIPVisionModelWithProjection`` / ``CLIPModel``, ``SiglipVisionModel`` / ``SiglipModel``,
``ViTModel``, and the backbone of any ``*ForImageClassification``; timm ViTs (class, register and
distillation tokens from ``num_prefix_tokens``, grid from ``patch_embed``) and timm CNNs; any other
``nn.Module`` through a declared feature layer (:func:`set_feature_layer`: its output, tokens or a
map, is the spatial feature and its average the summary).

Also here: the trainable adaptor (:class:`FeatureAdaptor`), per-teacher standardisation
(:class:`RunningStandardizer`) and DINO's k-NN classifier (:func:`knn_accuracy`).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .models import input_spec, is_timm_model, is_transformers_model, set_input_spec

FEATURE_TARGETS = ("summary", "spatial")


class FeatureExtractionError(ValueError):
    """A model whose backbone features cannot be read; the message says what to declare."""


def set_feature_layer(model: nn.Module, layer: str, num_prefix_tokens: int = 0) -> None:
    """Declare which submodule's output is the model's feature (for models of neither library).

    A 3-D output is read as tokens (the first ``num_prefix_tokens`` dropped, the rest laid on a square
    grid), a 4-D output as an NCHW map; the summary is the average over positions.
    """
    from .taps import resolve_module

    resolve_module(model, layer)  # a wrong name fails now, listing close names
    model.hf_distill_feature_layer = (layer, int(num_prefix_tokens))


def vision_backbone(model: nn.Module) -> nn.Module:
    """The transformers vision backbone of a model: the model itself for ``*Model`` backbones, the inner
    backbone of ``*ForImageClassification`` (``base_model``), the vision tower of CLIP/SigLIP models."""
    if not is_transformers_model(model):
        return model
    if hasattr(model, "vision_model"):  # CLIPModel, SiglipModel, their classifiers, ...WithProjection
        return model.vision_model
    return model.base_model


def _hf_prefix(config) -> int:
    if str(config.model_type).startswith("siglip"):
        return 0  # SigLIP has no class token: every token is a patch
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def _hf_patch(config) -> int:
    patch = getattr(config, "patch_size", None)
    if patch is None:
        raise FeatureExtractionError(f"{type(config).__name__} has no patch_size: declare a feature layer")
    return patch if isinstance(patch, int) else int(patch[0])


def _to_grid(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    patches = tokens[:, prefix:]
    h, w = int(grid[0]), int(grid[1])
    if patches.shape[1] != h * w:
        raise FeatureExtractionError(f"{patches.shape[1]} patch tokens do not fill a {h}x{w} grid (after {prefix} "
                                     "class/register tokens)")
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _transformers_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    projection = None
    if type(model).__name__.endswith("WithProjection"):
        tower = model  # CLIPVisionModelWithProjection: its output carries image_embeds
    elif hasattr(model, "vision_model"):
        projection = getattr(model, "visual_projection", None)  # CLIPModel: image_embeds come after it
        tower = model.vision_model
    else:
        tower = model.base_model
    kw = {}
    if "interpolate_pos_encoding" in inspect.signature(tower.forward).parameters:
        kw["interpolate_pos_encoding"] = True  # CLIP / SigLIP / ViT at another size than their config's
    out = tower(pixel_values=x, **kw)
    tokens = out.last_hidden_state
    config = tower.config
    if tokens.ndim == 4:  # a CNN backbone (ResNet, ConvNeXt): [B, C, h, w]
        pooled = getattr(out, "pooler_output", None)
        summary = pooled.flatten(1) if pooled is not None else tokens.mean(dim=(2, 3))
        return summary, tokens
    if str(config.model_type).startswith("clip"):
        # CLIP's tokens leave the encoder un-normed: norm them as its class token is
        norm = getattr(tower, "post_layernorm", None) or getattr(getattr(tower, "vision_model", None),
                                                                 "post_layernorm", None)
        tokens = norm(tokens) if norm is not None else tokens
    prefix = _hf_prefix(config)
    summary = getattr(out, "image_embeds", None)
    if summary is None:
        pooled = getattr(out, "pooler_output", None)
        if str(config.model_type) in ("vit", "deit") or pooled is None:
            # ViT's optional pooler is a tanh layer trained for nothing here: the normed class token is the summary
            pooled = tokens[:, 0] if prefix else tokens.mean(1)
        summary = projection(pooled) if projection is not None else pooled
    patch = _hf_patch(config)
    return summary, _to_grid(tokens, prefix, (x.shape[-2] // patch, x.shape[-1] // patch))


def _timm_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.forward_features(x)
    summary = model.forward_head(tokens, pre_logits=True)
    if isinstance(summary, tuple):  # a distilled ViT in distilled training
        summary = (summary[0] + summary[1]) / 2
    if tokens.ndim == 4:
        fmt = getattr(model, "output_fmt", "NCHW")
        fmt = getattr(fmt, "value", fmt)
        return summary, (tokens.permute(0, 3, 1, 2) if str(fmt).upper() == "NHWC" else tokens)
    patch_embed = getattr(model, "patch_embed", None)
    if getattr(model, "dynamic_img_size", False):
        grid = patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    elif patch_embed is not None and getattr(patch_embed, "grid_size", None) is not None:
        grid = patch_embed.grid_size
    else:
        raise FeatureExtractionError(f"cannot find the token grid of {type(model).__name__}: declare a feature layer")
    return summary, _to_grid(tokens, int(getattr(model, "num_prefix_tokens", 0)), grid)


def _declared_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .taps import FeatureTaps, default_call

    layer, prefix = model.hf_distill_feature_layer
    taps = getattr(model, "hf_distill_feature_taps", None)
    if taps is None:
        taps = model.hf_distill_feature_taps = FeatureTaps(model, [layer])
    feature = taps.run_until_complete(default_call, model, x)[layer]
    if feature.ndim == 3:
        n = feature.shape[1] - prefix
        side = int(round(n ** 0.5))
        spatial = _to_grid(feature, prefix, (side, n // max(side, 1)))
    elif feature.ndim == 4:
        spatial = feature
    else:
        raise FeatureExtractionError(f"feature layer '{layer}' gives a {feature.ndim}-D output; tokens (3-D) or a map "
                                     "(4-D) are needed")
    return spatial.mean(dim=(2, 3)), spatial


def backbone_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summary [B, D], spatial [B, D', h, w])`` of ``model`` on ``x`` (see the module doc)."""
    if getattr(model, "hf_distill_feature_layer", None) is not None:
        return _declared_features(model, x)
    if is_transformers_model(model):
        return _transformers_features(model, x)
    if is_timm_model(model) or hasattr(model, "forward_features"):
        return _timm_features(model, x)
    raise FeatureExtractionError(
        f"{type(model).__name__} is neither a timm nor a transformers model: declare the layer whose output is its "
        "feature with hf_distill.features.set_feature_layer(model, 'module.name')")


def feature_shapes(model: nn.Module, x: torch.Tensor) -> tuple[int, int, tuple[int, int]]:
    """(summary width, spatial width, grid) from one dry forward (eval mode, no grad, modes restored)."""
    from .taps import _DryRun

    with _DryRun(model):
        summary, spatial = backbone_features(model, x)
    return int(summary.shape[-1]), int(spatial.shape[1]), tuple(spatial.shape[-2:])


class FeatureAdaptor(nn.Module):
    """Maps student features to one teacher's: ``Linear -> LayerNorm -> GELU -> Linear`` (a 2-layer MLP,
    hidden ``mult`` x the student width), applied to the summary vector or at every map position."""

    def __init__(self, d_in: int, d_out: int, mult: int = 4):
        super().__init__()
        hidden = max(1, int(mult)) * d_in
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if f.ndim == 4:  # [B, C, h, w]: the same MLP at every position
            return self.net(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.net(f)


class RunningStandardizer(nn.Module):
    """Per-channel mean and std of a teacher's features, estimated on the first ``warmup`` training batches
    and then fixed; the buffers are saved in checkpoints (resumed runs keep them).

    ``standardize(t)`` returns ``(t - mean) / std`` so that no teacher dominates the summed losses."""

    def __init__(self, channels: int, warmup: int = 10, eps: float = 1e-6):
        super().__init__()
        self.warmup, self.eps = int(warmup), float(eps)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("sq_mean", torch.ones(channels))
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    @property
    def std(self) -> torch.Tensor:
        return (self.sq_mean - self.mean ** 2).clamp_min(0).sqrt() + self.eps

    @torch.no_grad()
    def update(self, t: torch.Tensor) -> None:
        """Fold a batch of features (``[B, C]`` or ``[B, C, h, w]``) into the estimates, while warming up."""
        if int(self.count) >= self.warmup:
            return
        flat = (t.transpose(0, 1).reshape(t.shape[1], -1) if t.ndim == 4 else t.t()).double()
        sums = torch.stack([flat.sum(1), (flat ** 2).sum(1)])
        n = torch.tensor(float(flat.shape[1]), dtype=torch.float64, device=flat.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every process folds in the whole global batch: the statistics stay the same on all of them
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(n)
        total = self.seen + n
        self.mean.copy_((self.mean.double() * (self.seen / total) + sums[0] / total).to(self.mean.dtype))
        sq = self.sq_mean.double() if int(self.count) else torch.zeros_like(sums[1])
        self.sq_mean.copy_((sq * (self.seen / total) + sums[1] / total).to(self.sq_mean.dtype))
        self.seen.copy_(total)
        self.count.add_(1)

    def standardize(self, t: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1) if t.ndim == 4 else (1, -1)
        return (t.float() - self.mean.view(shape)) / self.std.view(shape)


def summary_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos(pred, target)``, averaged over the batch."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def spatial_loss(pred: torch.Tensor, target: torch.Tensor, cos_weight: float = 0.9,
                 smooth_l1_weight: float = 0.1) -> torch.Tensor:
    """Per location ``0.9 * (1 - cos) + 0.1 * smooth_L1`` (RADIO's mix), averaged over locations; ``pred``
    is first brought to the teacher's grid (:func:`hf_distill.taps.resize_map`)."""
    from .taps import resize_map

    pred = resize_map(pred.float(), target.shape[-2:])
    cos = (1 - F.cosine_similarity(pred, target.float(), dim=1)).mean()
    return cos_weight * cos + smooth_l1_weight * F.smooth_l1_loss(pred, target.float())


def per_sample_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per sample (``[B]``): of the vectors, or averaged over the map's locations."""
    from .taps import resize_map

    if pred.ndim == 4:
        pred = resize_map(pred.float(), target.shape[-2:])
        return F.cosine_similarity(pred, target.float(), dim=1).flatten(1).mean(1)
    return F.cosine_similarity(pred.float(), target.float(), dim=-1)


@torch.no_grad()
def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, chunk: int = 256) -> float:
    """Top-1 accuracy of DINO's weighted k-NN classifier: cosine similarity on L2-normalised features, the
    ``k`` nearest training samples vote with weight ``exp(sim / temperature)``."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(int(k), train.shape[0])
    correct = 0
    for i in range(0, test.shape[0], chunk):
        sim = test[i:i + chunk] @ train.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        scores = torch.zeros(sim.shape[0], num_classes, dtype=top_sim.dtype)
        scores.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += int((scores.argmax(1) == test_labels[i:i + chunk].long()).sum())
    return correct / max(test.shape[0], 1)


def export_backbone(model: nn.Module):
    """The student as a backbone for export: timm without its classifier, the transformers ``*Model``."""
    import copy

    if is_transformers_model(model):
        backbone = vision_backbone(model)
        if backbone is not model:  # a submodule (CLIP's vision tower): it is exported with the student's input
            set_input_spec(backbone, input_spec(model))
        return backbone
    if is_timm_model(model) and getattr(model, "num_classes", 0):
        backbone = copy.deepcopy(model)
        backbone.reset_classifier(0)
        return backbone
    return model


def targets_of(value: Sequence[str] | str | None) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or FEATURE_TARGETS)
    bad = [t for t in items if t not in FEATURE_TARGETS]
    if bad or not items:
        raise ValueError(f"feature_targets takes {', '.join(FEATURE_TARGETS)}; got {items}")
    return list(dict.fromkeys(items))


ADAPTORS_WEIGHTS = "feature_adaptors.safetensors"
ADAPTORS_CONFIG = "feature_adaptors.json"


def save_adaptors(extras: nn.ModuleDict, keys: Sequence[str], targets: Sequence[str], output_dir) -> None:
    """Write the adaptors (and the teachers' standardisation) next to an exported student backbone."""
    import json
    import os

    import safetensors.torch

    config = {"teachers": list(keys), "targets": list(targets), "adaptors": {}}
    for name, module in extras.items():
        if isinstance(module, FeatureAdaptor):
            first, last = module.net[0], module.net[-1]
            config["adaptors"][name] = {"in": first.in_features, "out": last.out_features,
                                        "mult": first.out_features // first.in_features}
    state = {k: v.detach().contiguous().cpu() for k, v in extras.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(output_dir, ADAPTORS_WEIGHTS))
    with open(os.path.join(output_dir, ADAPTORS_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


class FeatureStudent(nn.Module):
    """An exported feature student with its adaptors: ``model(x)`` gives, for every teacher, its features
    as the student predicts them, in the teacher's own space (the standardisation undone)::

        student = FeatureStudent.from_pretrained("OUT")    # saved with feature_export_adaptors=True
        out = student(x)                                   # {"<teacher>": {"summary": [B, D], "spatial": [B, D, h, w]}}
        out = student(x, teacher="dinov2-small")           # {"summary": ..., "spatial": ...}

    ``student.backbone`` is the plain backbone (``backbone_features(student.backbone, x)``).
    """

    def __init__(self, backbone: nn.Module, adaptors: nn.ModuleDict, keys: Sequence[str], targets: Sequence[str]):
        super().__init__()
        self.backbone, self.adaptors = backbone, adaptors
        self.keys, self.targets = list(keys), list(targets)

    @classmethod
    def from_pretrained(cls, folder) -> "FeatureStudent":
        import json
        import os

        import safetensors.torch

        from .models import load_model

        folder = os.fspath(folder)
        path = os.path.join(folder, ADAPTORS_CONFIG)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} has no {ADAPTORS_CONFIG}: export it with feature_export_adaptors=True")
        with open(path) as f:
            config = json.load(f)
        adaptors = nn.ModuleDict()
        for name, spec in config["adaptors"].items():
            adaptors[name] = FeatureAdaptor(spec["in"], spec["out"], spec["mult"])
        state = safetensors.torch.load_file(os.path.join(folder, ADAPTORS_WEIGHTS))
        for name in {k.rsplit(".", 1)[0] for k in state if k.split(".")[0].endswith("_stats")}:
            adaptors[name] = RunningStandardizer(state[f"{name}.mean"].numel())
        adaptors.load_state_dict(state)
        return cls(load_model(folder, backbone=True), adaptors, config["teachers"], config["targets"]).eval()

    def forward(self, x: torch.Tensor, teacher: str | None = None):
        features = dict(zip(("summary", "spatial"), backbone_features(self.backbone, x)))
        out = {}
        for key in ([teacher] if teacher is not None else self.keys):
            out[key] = {}
            for target in self.targets:
                pred = self.adaptors[f"{key}/{target}"](features[target]).float()
                stats = self.adaptors[f"{key}/{target}_stats"] if f"{key}/{target}_stats" in self.adaptors else None
                if stats is not None:  # back from standardised to the teacher's own space
                    shape = (1, -1, 1, 1) if pred.ndim == 4 else (1, -1)
                    pred = pred * stats.std.view(shape) + stats.mean.view(shape)
                out[key][target] = pred
        return out[teacher] if teacher is not None else out
