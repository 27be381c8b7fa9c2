"""The built-in families of :mod:`hf_distill.models.stages`: for each, its ``stem | units | head`` (the
family list and what each split reproduces are in that module's docstring).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .stages import Step


# ====================================================================== family specs
class _Spec:
    """Internal description of a built-in family.

    ``units`` are the module names run in sequence between stem and head (each with a step
    callable); ``candidates`` are the units allowed to end a stage; ``default_groups`` is the
    default number of stages (``None``: every candidate ends a stage).
    """

    def __init__(self, family, stem, units, head, candidates=None, default_groups=None):
        self.family = family
        self.stem = list(stem)
        self.units: list[tuple[str, Step]] = list(units)
        self.head = list(head)
        names = [n for n, _ in self.units]
        self.candidates = list(candidates) if candidates is not None else names
        self.default_groups = default_groups


def _module_unit(name: str) -> tuple[str, Step]:
    return (name, name)


# ---------------------------------------------------------------------- timm
# Step callables are module-level functions (picklable, and they look modules up on the model at
# call time, so deep copies and replaced submodules behave).

def _timm_forward_head(model, h):
    return model.forward_head(h)


def _timm_vit_pos_embed(model, h):
    return model._pos_embed(h)


def _timm_families():
    try:
        from timm.models.convnext import ConvNeXt
        from timm.models.efficientnet import EfficientNet
        from timm.models.mobilenetv3 import MobileNetV3
        from timm.models.regnet import RegNet
        from timm.models.resnet import ResNet
        from timm.models.vgg import VGG
        from timm.models.vision_transformer import VisionTransformer
    except Exception:  # timm missing or reorganised
        return []
    return [
        (ResNet, _spec_timm_resnet),
        (ConvNeXt, _spec_timm_convnext),
        (EfficientNet, _spec_timm_efficientnet),
        (MobileNetV3, _spec_timm_mobilenetv3),
        (RegNet, _spec_timm_regnet),
        (VGG, _spec_timm_vgg),
        (VisionTransformer, _spec_timm_vit),
    ]


def _spec_timm_resnet(model):
    # forward_features: conv1, bn1, act1, maxpool, layer1..layer4; forward_head: global_pool, dropout, fc
    return _Spec(
        "timm.ResNet",
        stem=["conv1", "bn1", "act1", "maxpool"],
        units=[_module_unit(f"layer{i}") for i in range(1, 5)],
        head=[_timm_forward_head],
    )


def _spec_timm_convnext(model):
    # forward_features: stem, stages, norm_pre; forward_head: head
    return _Spec(
        "timm.ConvNeXt",
        stem=["stem"],
        units=[_module_unit(f"stages.{i}") for i in range(len(model.stages))],
        head=["norm_pre", _timm_forward_head],
    )


def _spec_timm_efficientnet(model):
    # forward_features: conv_stem, bn1, blocks, conv_head, bn2; forward_head: global_pool, dropout, classifier
    return _Spec(
        "timm.EfficientNet",
        stem=["conv_stem", "bn1"],
        units=[_module_unit(f"blocks.{i}") for i in range(len(model.blocks))],
        head=["conv_head", "bn2", _timm_forward_head],
    )


def _spec_timm_mobilenetv3(model):
    # forward_features: conv_stem, bn1, blocks;
    # forward_head: global_pool, conv_head, norm_head, act2, flatten, dropout, classifier
    return _Spec(
        "timm.MobileNetV3",
        stem=["conv_stem", "bn1"],
        units=[_module_unit(f"blocks.{i}") for i in range(len(model.blocks))],
        head=[_timm_forward_head],
    )


def _spec_timm_regnet(model):
    # forward_features: stem, s1..s4, final_conv; forward_head: head
    return _Spec(
        "timm.RegNet",
        stem=["stem"],
        units=[_module_unit(f"s{i}") for i in range(1, 5)],
        head=["final_conv", _timm_forward_head],
    )


def _spec_timm_vgg(model):
    # forward_features: features (Sequential of conv/[norm]/act/maxpool); forward_head: pre_logits, head.
    # Stages end at each MaxPool (never at a conv followed by an in-place activation).
    n = len(model.features)
    units = [_module_unit(f"features.{i}") for i in range(n)]
    candidates = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    if not candidates or candidates[-1] != f"features.{n - 1}":
        candidates.append(f"features.{n - 1}")
    return _Spec(
        "timm.VGG",
        stem=[],
        units=units,
        head=["pre_logits", "head"],
        candidates=candidates,
    )


def _spec_timm_vit(model):
    # forward_features: patch_embed, _pos_embed, patch_drop, norm_pre, blocks, norm
    # forward_head (incl. VisionTransformerDistilled's): pool, fc_norm, head_drop, head
    return _Spec(
        "timm.VisionTransformer",
        stem=["patch_embed", _timm_vit_pos_embed, "patch_drop", "norm_pre"],
        units=[_module_unit(f"blocks.{i}") for i in range(len(model.blocks))],
        head=["norm", _timm_forward_head],
        default_groups=4,
    )


# ---------------------------------------------------------------------- transformers
def _hf_resnet_head(model, h):
    # ResNetModel: pooled = pooler(last_hidden_state); classifier = Sequential(Flatten, Linear)
    return model.classifier(model.resnet.pooler(h))


def _hf_convnext_head(model, h):
    # ConvNextModel: pooled = layernorm(last_hidden_state.mean([-2, -1])); logits = classifier(pooled)
    return model.classifier(model.convnext.layernorm(h.mean([-2, -1])))


def _hf_vit_stem(model, x):
    vit = model.vit
    expected_dtype = vit.embeddings.patch_embeddings.projection.weight.dtype
    if x.dtype != expected_dtype:
        x = x.to(expected_dtype)
    return vit.embeddings(x, bool_masked_pos=None, interpolate_pos_encoding=None)


@functools.lru_cache(maxsize=None)
def _hf_mask_fn():
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # older transformers: no mask helper, layers take head_mask
        return None
    return create_bidirectional_mask


def _hf_vit_layer(name, model, h):
    # ViTModel.forward: attention_mask = create_bidirectional_mask(config, embeddings, None);
    # hidden = layer(hidden, attention_mask) for each layer
    mask = None
    create_bidirectional_mask = _hf_mask_fn()
    if create_bidirectional_mask is not None:
        mask = create_bidirectional_mask(config=model.vit.config, inputs_embeds=h, attention_mask=None)
    out = model.get_submodule(name)(h, mask)
    if isinstance(out, tuple):  # older transformers return (hidden_states, ...)
        out = out[0]
    return out


def _hf_vit_head(model, h):
    sequence_output = model.vit.layernorm(h)
    return model.classifier(sequence_output[:, 0, :])


def _hf_families():
    fams = []
    try:
        from transformers import ResNetForImageClassification

        fams.append((ResNetForImageClassification, _spec_hf_resnet))
    except Exception:
        pass
    try:
        from transformers import ConvNextForImageClassification

        fams.append((ConvNextForImageClassification, _spec_hf_convnext))
    except Exception:
        pass
    try:
        from transformers import ViTForImageClassification

        fams.append((ViTForImageClassification, _spec_hf_vit))
    except Exception:
        pass
    return fams


def _spec_hf_resnet(model):
    return _Spec(
        "transformers.ResNetForImageClassification",
        stem=["resnet.embedder"],
        units=[_module_unit(f"resnet.encoder.stages.{i}") for i in range(len(model.resnet.encoder.stages))],
        head=[_hf_resnet_head],
    )


def _spec_hf_convnext(model):
    return _Spec(
        "transformers.ConvNextForImageClassification",
        stem=["convnext.embeddings"],
        units=[_module_unit(f"convnext.encoder.stages.{i}") for i in range(len(model.convnext.encoder.stages))],
        head=[_hf_convnext_head],
    )


def _spec_hf_vit(model):
    vit = model.vit
    if hasattr(vit, "layers"):
        prefix, layers = "vit.layers", vit.layers
    else:  # transformers < 5 layout
        prefix, layers = "vit.encoder.layer", vit.encoder.layer
    names = [f"{prefix}.{i}" for i in range(len(layers))]
    return _Spec(
        "transformers.ViTForImageClassification",
        stem=[_hf_vit_stem],
        units=[(n, functools.partial(_hf_vit_layer, n)) for n in names],
        head=[_hf_vit_head],
        default_groups=4,
    )
