"""Models of either ecosystem (timm, transformers) or plain ``nn.Module``s: everything that depends on
*which kind* of model we hold lives in this package, so the trainer and the methods never branch on it.

- :mod:`.calling`: which kind of model, calling it, logits, names, labels, distillation heads
- :mod:`.specs`: the input a model expects (:class:`InputSpec`) and the adapter between two
- :mod:`.loading`: :func:`load_model` (timm, transformers, Hub or folder) and the input sizes it takes
- :mod:`.saving`: :func:`save_native` / :func:`load_native_weights`, each library's own format
- :mod:`.layouts`: tensors out of module outputs, their layouts (maps, tokens, vectors), conversions
- :mod:`.taps`: forward-hook feature taps on named modules, ``hf-distill layers``
- :mod:`.view`: the stages of any model from what its library declares (:func:`model_view`)
- :mod:`.middle`: running a model from a stage's output on (:func:`run_from_middle`)
- :mod:`.stages` / :mod:`.stage_families`: hand-written stem | stages | head splits of known families
- :mod:`.features`: backbone features (summary and spatial) of foundation models, adaptors
- :mod:`.exits`: early-exit heads and the multi-exit model (BYOT)

The names below are those of the former ``hf_distill.models`` module; the other modules are imported
by their own path (``hf_distill.models.taps`` ...).
"""

from .calling import (
    call_model,
    check_image_model,
    count_parameters,
    display_name,
    distillation_heads,
    forward_images,
    has_distillation_head,
    image_input_name,
    image_inputs,
    is_timm_model,
    is_transformers_model,
    label_names_of,
    logits_of,
    model_family,
    model_name,
    num_classes_of,
    set_label_names,
    short_name,
)
from .loading import InputSizeError, ModelLoadError, load_model, takes_input_size
from .saving import WEIGHTS_NAME, load_native_weights, progress_bars_off, save_native
from .specs import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputAdapter,
    InputSpec,
    declares_input_spec,
    input_spec,
    set_input_spec,
)

__all__ = [
    "DEFAULT_IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "WEIGHTS_NAME", "InputAdapter", "InputSizeError",
    "InputSpec", "ModelLoadError", "call_model", "check_image_model", "count_parameters", "declares_input_spec",
    "display_name", "distillation_heads", "forward_images", "has_distillation_head", "image_input_name",
    "image_inputs", "input_spec", "is_timm_model", "is_transformers_model", "label_names_of", "load_model",
    "load_native_weights", "logits_of", "model_family", "model_name", "num_classes_of", "progress_bars_off",
    "save_native", "set_input_spec", "set_label_names", "short_name", "takes_input_size",
]
