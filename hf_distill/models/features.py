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

from .calling import is_timm_model, is_transformers_model
from .specs import _pair, input_spec, set_input_spec

FEATURE_TARGETS = ("summary", "spatial")


class FeatureExtractionError(ValueError):
    """A model whose backbone features cannot be read; the message says what to declare."""


def set_feature_layer(model: nn.Module, layer: str, num_prefix_tokens: int = 0) -> None:
    """Declare which submodule's output is the model's feature (for models of neither library).

    A 3-D output is read as tokens (the first ``num_prefix_tokens`` dropped, the rest laid in raster order on the
    grid of the input: the one stride that gives that many positions at the image's aspect ratio), a 4-D output as
    an NCHW map; the summary is the average over positions.
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


def _to_grid(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    patches = tokens[:, prefix:]
    h, w = int(grid[0]), int(grid[1])
    if patches.shape[1] != h * w:
        raise FeatureExtractionError(f"{patches.shape[1]} patch tokens do not fill a {h}x{w} grid (after {prefix} "
                                     "class/register tokens)")
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def token_grid(n: int, image_size: Sequence[int], patch=None) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``n`` patch tokens of an ``image_size`` input: ``image // patch`` when the model
    declares a patch size that fits, else the one stride that gives ``n`` positions at the image's aspect ratio
    (hierarchical and pooled models, any input size, non-square too)."""
    from .layouts import _grid

    if patch is not None:
        p = _pair(patch)
        grid = (int(image_size[-2]) // p[0], int(image_size[-1]) // p[1])
        if grid[0] * grid[1] == n:
            return grid
    try:
        return _grid(n, None, 0, image_size=tuple(image_size[-2:]))
    except ValueError as err:
        raise FeatureExtractionError(str(err)) from None


def _output_fields(out) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set(out.keys())


def _transformers_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .layouts import num_prefix_tokens

    projection = None
    if type(model).__name__.endswith("WithProjection"):
        tower = model  # CLIPVisionModelWithProjection: its output carries image_embeds
    elif hasattr(model, "vision_model"):
        projection = getattr(model, "visual_projection", None)  # CLIPModel: image_embeds come after it
        tower = model.vision_model
    else:
        tower = model.base_model
    if not is_transformers_model(tower) and hasattr(tower, "forward_features"):
        return _timm_features(tower, x)  # TimmWrapperModel: a timm model inside
    from .calling import image_input_name, image_inputs

    if image_input_name(tower) != "pixel_values":
        raise FeatureExtractionError(f"{type(tower).__name__} does not take pixel_values (its forward takes "
                                     f"{image_input_name(tower) or 'token ids'}): its features cannot be read; choose "
                                     "an image backbone")
    kw = {}
    params = inspect.signature(tower.forward).parameters
    if "interpolate_pos_encoding" in params:
        kw["interpolate_pos_encoding"] = True  # CLIP / SigLIP / ViT at another size than their config's
    # hierarchical models (Swin, Hiera, FocalNet, ...) publish their maps as reshaped_hidden_states, asked for once
    # the output is known to have them (Hiera's last tokens are not in raster order; its reshaped maps are)
    reshaped = getattr(tower, "hf_distill_reshaped_maps", None)
    if reshaped:
        kw["output_hidden_states"] = True
    inputs = image_inputs(tower, x)  # pixel_values, or SigLIP 2's patches with their grid and mask
    out = tower(**inputs, **kw)
    if reshaped is None:
        reshaped = "reshaped_hidden_states" in _output_fields(out)
        tower.hf_distill_reshaped_maps = reshaped
        if reshaped:
            out = tower(**inputs, **kw, output_hidden_states=True)
    tokens = getattr(out, "last_hidden_state", None)
    if tokens is None and getattr(out, "feature_maps", None):  # a BackboneOutput (HGNetV2): its last stage's map
        tokens = out.feature_maps[-1]
    if tokens is None:
        raise FeatureExtractionError(f"{type(tower).__name__} gives neither last_hidden_state nor feature_maps: "
                                     "declare a feature layer with hf_distill.models.features.set_feature_layer")
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
    prefix = num_prefix_tokens(tower)  # counted from the model: DeiT's class + distillation tokens, registers
    summary = getattr(out, "image_embeds", None)
    if summary is None:
        pooled = getattr(out, "pooler_output", None)
        # a pooler the class builds only on request (Data2VecVisionModel(add_pooling_layer=False)) is gone once the
        # exported backbone reloads with AutoModel: the summary must not depend on it
        on_request = inspect.signature(type(tower).__init__).parameters.get("add_pooling_layer")
        if on_request is not None and on_request.default is False:
            pooled = None
        if str(config.model_type) in ("vit", "deit") or pooled is None or pooled.ndim != 2:
            # ViT's optional pooler is a tanh layer trained for nothing here: the normed class token is the summary
            pooled = tokens[:, 0] if prefix else tokens.mean(1)
        summary = projection(pooled) if projection is not None else pooled
    maps = getattr(out, "reshaped_hidden_states", None) if reshaped else None
    if maps:  # NCHW (Swin, FocalNet) or channels-last (Hiera): the channels are the tokens' width
        last = maps[-1]
        return summary, (last.permute(0, 3, 1, 2) if last.shape[1] != tokens.shape[-1] else last)
    grid = token_grid(tokens.shape[1] - prefix, x.shape[-2:], getattr(config, "patch_size", None))
    return summary, _to_grid(tokens, prefix, grid)


def _timm_plan(model: nn.Module, x: torch.Tensor):
    """How to read a timm model's spatial map at ``x``'s size, decided once per size from one dry forward of one
    image, then cached: ``("map",)``: forward_features gives a map; ``("tokens", prefix, grid)``: its tokens, the
    first ``prefix`` dropped, lie on ``grid`` in raster order (checked against timm's own ``forward_intermediates``
    map); ``("intermediates", same_final, keywords)``: the map is the last ``forward_intermediates`` output
    (pooled tokens as in PiT, unrolled ones as in Hiera, several branches as in CrossViT), and its final output is
    forward_features' when ``same_final``."""
    from .layouts import num_prefix_tokens
    from .taps import _DryRun

    plans = getattr(model, "hf_distill_feature_plans", None)
    if plans is None:
        plans = model.hf_distill_feature_plans = {}
    key = tuple(int(s) for s in x.shape[-2:])
    if key in plans:
        return plans[key]
    with _DryRun(model):
        one = x[:1]
        f = model.forward_features(one)
        if isinstance(f, torch.Tensor) and f.ndim == 4:
            plans[key] = ("map",)
            return plans[key]
        final, last, norm_kw = _timm_intermediates(model, one)
    if last is None:
        plan = None
        if isinstance(f, torch.Tensor) and f.ndim == 3:  # no forward_intermediates: the patch embedding's grid
            patch_embed = getattr(model, "patch_embed", None)
            grid = getattr(patch_embed, "grid_size", None)
            if getattr(model, "dynamic_img_size", False):
                grid = patch_embed.dynamic_feat_size(key)
            prefix = num_prefix_tokens(model)
            if grid is not None and f.shape[1] - prefix == grid[0] * grid[1]:
                plan = ("tokens", prefix, tuple(grid))
        if plan is None:
            raise FeatureExtractionError(f"cannot find the token grid of {type(model).__name__} (it has no "
                                         "forward_intermediates): declare a feature layer with "
                                         "hf_distill.models.features.set_feature_layer")
        plans[key] = plan
        return plan
    same_final = isinstance(final, torch.Tensor) and isinstance(f, torch.Tensor) and final.shape == f.shape \
        and torch.allclose(final, f, atol=1e-5, rtol=1e-4)
    plan = ("intermediates", same_final, norm_kw)
    if isinstance(f, torch.Tensor) and f.ndim == 3 and f.shape[-1] == last.shape[1]:
        h, w = (int(s) for s in last.shape[-2:])
        for prefix in dict.fromkeys((num_prefix_tokens(model), f.shape[1] - h * w)):  # declared, else the rest
            if 0 <= prefix and f.shape[1] - prefix == h * w and torch.allclose(
                    _to_grid(f, prefix, (h, w)), last, atol=1e-5, rtol=1e-4):
                plan = ("tokens", prefix, (h, w))
                break
    plans[key] = plan
    return plan


def _timm_intermediates(model: nn.Module, x: torch.Tensor, kws=({"norm": True}, {})):
    """``(final output, last stage's NCHW map, the keywords that worked)`` from timm's ``forward_intermediates``
    (normed like the final output where the model can: Hiera cannot), or ``(None, None, None)`` without it."""
    fn = getattr(model, "forward_intermediates", None)
    if fn is None:
        return None, None, None
    for kw in kws:
        try:
            final, inter = fn(x, indices=1, output_fmt="NCHW", **kw)
            break
        except (AssertionError, TypeError, ValueError, NotImplementedError):
            continue
    else:
        return None, None, None
    last = inter[-1] if isinstance(inter, (list, tuple)) and inter else None
    if not isinstance(last, torch.Tensor) or last.ndim != 4:
        return None, None, None
    return final, last, kw


def _timm_summary(model: nn.Module, features) -> torch.Tensor:
    summary = model.forward_head(features, pre_logits=True)
    if isinstance(summary, tuple):  # a distilled ViT in distilled training
        summary = (summary[0] + summary[1]) / 2
    return summary


def _timm_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _timm_plan(model, x)
    if plan[0] == "intermediates":
        final, last, _ = _timm_intermediates(model, x, (plan[2],))
        features = final if plan[1] else model.forward_features(x)  # a second forward only where they differ
        return _timm_summary(model, features), last
    tokens = model.forward_features(x)
    summary = _timm_summary(model, tokens)
    if plan[0] == "map":
        fmt = getattr(model, "output_fmt", "NCHW")
        fmt = getattr(fmt, "value", fmt)
        return summary, (tokens.permute(0, 3, 1, 2) if str(fmt).upper() == "NHWC" else tokens)
    return summary, _to_grid(tokens, plan[1], plan[2])


def _declared_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .taps import FeatureTaps, default_call

    layer, prefix = model.hf_distill_feature_layer
    taps = getattr(model, "hf_distill_feature_taps", None)
    if taps is None:
        taps = model.hf_distill_feature_taps = FeatureTaps(model, [layer])
    feature = taps.run_until_complete(default_call, model, x)[layer]
    if feature.ndim == 3:  # laid on the grid of the real input (any size, non-square too)
        spatial = _to_grid(feature, prefix, token_grid(feature.shape[1] - prefix, x.shape[-2:]))
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
        "feature with hf_distill.models.features.set_feature_layer(model, 'module.name')")


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

    ``standardize(t)`` returns ``(t - mean) / std`` so that no teacher dominates the summed losses. The estimate
    is Chan et al.'s pairwise update of the mean and the sum of squared deviations, in float64: features with a
    large mean keep their variance (``E[x^2] - E[x]^2`` in float32 loses it)."""

    def __init__(self, channels: int, warmup: int = 10, eps: float = 1e-6):
        super().__init__()
        self.warmup, self.eps = int(warmup), float(eps)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(channels))  # float32 copies of the float64 estimates, as used
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("mean64", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(channels, dtype=torch.float64))  # sum of squared deviations
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints and exports written before the float64 estimates held sq_mean = E[x^2]
        sq_mean = state_dict.pop(prefix + "sq_mean", None)
        if sq_mean is not None and prefix + "var" not in state_dict:
            mean = state_dict[prefix + "mean"].double()
            var = (sq_mean.double() - mean ** 2).clamp_min(0)
            seen = state_dict.get(prefix + "seen", torch.zeros((), dtype=torch.float64)).double()
            state_dict[prefix + "var"] = var.float()
            state_dict[prefix + "mean64"] = mean
            state_dict[prefix + "m2"] = var * seen
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp_min(0).sqrt() + self.eps

    @torch.no_grad()
    def update(self, t: torch.Tensor) -> None:
        """Fold a batch of features (``[B, C]`` or ``[B, C, h, w]``) into the estimates, while warming up."""
        if int(self.count) >= self.warmup:
            return
        flat = (t.transpose(0, 1).reshape(t.shape[1], -1) if t.ndim == 4 else t.t()).double()
        n = torch.tensor(float(flat.shape[1]), dtype=torch.float64, device=flat.device)
        total = flat.sum(1)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            # every process folds in the whole global batch: the statistics stay the same on all of them
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(n)
        batch_mean = total / n
        batch_m2 = ((flat - batch_mean[:, None]) ** 2).sum(1)
        if distributed:
            torch.distributed.all_reduce(batch_m2)
        seen = self.seen.to(flat.device)
        merged = seen + n
        delta = batch_mean - self.mean64
        self.mean64.add_(delta * (n / merged))
        self.m2.add_(batch_m2 + delta ** 2 * (seen * n / merged))
        self.seen.copy_(merged)
        self.mean.copy_(self.mean64.to(self.mean.dtype))
        self.var.copy_((self.m2 / merged).to(self.var.dtype))
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
    is first brought to the teacher's grid (:func:`hf_distill.models.taps.resize_map`)."""
    from .layouts import resize_map

    pred = resize_map(pred.float(), target.shape[-2:])
    cos = (1 - F.cosine_similarity(pred, target.float(), dim=1)).mean()
    return cos_weight * cos + smooth_l1_weight * F.smooth_l1_loss(pred, target.float())


def per_sample_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per sample (``[B]``): of the vectors, or averaged over the map's locations."""
    from .layouts import resize_map

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
        if getattr(model, "visual_projection", None) is not None:
            return model  # CLIP / MetaCLIP 2 with projection: the summary goes through it, the tower alone lacks it
        backbone = vision_backbone(model)
        if backbone is not model:  # a submodule (a vision tower): it is exported with the student's input
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
    as the student predicts them, in the teacher's own space (the standardisation undone). The summary was
    learned through a cosine, which fixes its direction only: it is given the length of an average standardised
    teacher feature (``sqrt(D)``) before the standardisation is undone (unit length without standardisation), so
    it does not depend on the adaptor's free scale; the spatial map keeps its learned scale (its smooth-L1 term
    fixes it)::

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

        from .loading import load_model

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
                if target == "summary":
                    # the summary was learned through a cosine alone, which leaves its length free: give it the
                    # length a standardised teacher feature has on average (sqrt of its width), or unit length
                    pred = F.normalize(pred, dim=-1) * (pred.shape[-1] ** 0.5 if stats is not None else 1.0)
                if stats is not None:  # back from standardised to the teacher's own space
                    shape = (1, -1, 1, 1) if pred.ndim == 4 else (1, -1)
                    pred = pred * stats.std.view(shape) + stats.mean.view(shape)
                out[key][target] = pred
        return out[teacher] if teacher is not None else out
