"""Teachers sharded over the processes with PyTorch's FSDP2 (``fully_shard``), for teachers too large to
replicate on every device.

Each teacher's blocks are sharded one by one, then the model itself, over all the processes of the
run: between forwards every process holds about ``1 / world_size`` of the teacher's parameters, and a
forward gathers one block at a time (``reshard_after_forward=True`` everywhere, the root included:
no backward follows a teacher's forward, so nothing may stay gathered). Buffers (BatchNorm
statistics) are not sharded; the teacher stays in eval mode, frozen, in ``teacher_dtype`` (cast
before sharding, so the shards themselves are half precision).

A sharded forward is collective: every process must run it, at the same points. The trainer runs
the teachers on every process at every step and evaluation batch; what runs on the main process
alone (the model card's latency measurement) skips sharded teachers.
"""

from __future__ import annotations

from torch import nn

from ..models import is_transformers_model

SHARDINGS = ("none", "fsdp")
_FORWARD_METHODS = ("forward_features", "forward_head", "forward_intermediates")


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: a transformers model's ``_no_split_modules`` layers, or the blocks
    of the stages :func:`hf_distill.models.stages.stage_names` finds (each child of a block container)."""
    if is_transformers_model(model):
        names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if blocks:
            return blocks
    try:
        from ..models.stages import stage_names

        stages = stage_names(model)
    except Exception:  # a model the stage finder does not know: shard it as one unit
        return []
    modules = dict(model.named_modules())
    blocks: list[nn.Module] = []
    for name in stages:
        parent, _, last = name.rpartition(".")
        container = modules[parent] if last.isdigit() and parent else modules[name]
        children = list(container.children()) if isinstance(container, (nn.Sequential, nn.ModuleList)) else []
        for block in children or [container]:
            if all(block is not b for b in blocks):
                blocks.append(block)
    return blocks


def shard_teacher(model: nn.Module, mesh) -> nn.Module:
    """``fully_shard`` ``model``'s blocks, then the model, over ``mesh``; forward methods other than ``forward``
    (timm's ``forward_features``, ...) are registered so that they gather too. Returns the model."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    model.eval().requires_grad_(False)
    for block in shard_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    for part in directly_called_parts(model):
        fully_shard(part, mesh=mesh, reshard_after_forward=True)
    # FSDP2 cannot shard a scalar (CLIP's logit_scale): it stays whole on every process, at no cost
    scalars = {p for p in model.parameters() if p.ndim == 0}
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=scalars or None)
    for method in _FORWARD_METHODS:
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    return model


def directly_called_parts(model: nn.Module) -> list[nn.Module]:
    """Submodules that are run on their own, not through ``model.forward``: a transformers model's vision tower,
    CLIP's final norm (applied to the patch tokens too) and visual projection, which feature distillation calls
    directly (:func:`hf_distill.models.features.backbone_features`). Each is then an FSDP unit of its own (inner ones
    first), so that calling it gathers its parameters; left in an outer unit they would stay sharded (DTensors
    meeting plain tensors)."""
    if not is_transformers_model(model):
        return []
    from ..models.features import vision_backbone

    tower = vision_backbone(model)
    norm = getattr(tower, "post_layernorm", None)
    projection = getattr(model, "visual_projection", None)
    parts = [m for m in (norm, projection) if isinstance(m, nn.Module)]
    if tower is not model:
        parts.append(tower)
    return parts


def local_parameter_count(model: nn.Module) -> int:
    """Parameters this process holds: the local shard of sharded ones, every element of the others."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel()
    return total


def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in model.parameters())
