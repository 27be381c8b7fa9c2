"""hf_distill: knowledge distillation for timm and Hugging Face vision models.

The names below are imported on first use, so that ``hf-distill --help`` and argument errors
answer without loading torch and transformers first.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DataArguments": ".arguments",
    "DistillationTrainingArguments": ".arguments",
    "ModelArguments": ".arguments",
    "METHODS": ".methods",
    "DistillationMethod": ".methods",
    "InputSpec": ".models",
    "load_model": ".models",
    "set_input_spec": ".models",
    "DistillationModel": ".training",
    "DistillationTrainer": ".trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_distill' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
