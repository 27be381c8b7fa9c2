"""Registry of distillation methods: adding one is a new module and a line here."""

from __future__ import annotations

from .base import HOOKS, DistillationMethod, Layers, Progress, Stage, StepOutputs
from .byot import BeYourOwnTeacher
from .dist import DIST
from .dkd import DecoupledKD
from .feature import FeatureDistillation
from .fitnets import FitNets
from .sftn import SFTN
from .kd import FunctionMatching, KnowledgeDistillation, NoisyTeacher, Supervised

METHODS: dict[str, type[DistillationMethod]] = {
    m.name: m
    for m in (
        KnowledgeDistillation,
        DecoupledKD,
        DIST,
        FeatureDistillation,
        FitNets,
        BeYourOwnTeacher,
        NoisyTeacher,
        FunctionMatching,
        SFTN,
        Supervised,
    )
}


def get_method(name: str) -> type[DistillationMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown distill_method '{name}'; valid methods: {', '.join(sorted(METHODS))}"
        ) from None


__all__ = ["HOOKS", "METHODS", "DistillationMethod", "Layers", "Progress", "Stage", "StepOutputs", "get_method"]
