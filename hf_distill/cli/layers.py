"""``hf-distill layers MODEL``: a model's stages and modules with their output shapes."""

from __future__ import annotations

import argparse
from typing import Sequence


def _layers_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-distill layers", allow_abbrev=False,
        description="List a model's stages and modules with output shapes (hint-layer candidates). Stages are "
        "read from what the model's library declares: timm feature_info, transformers hidden states "
        "(output_hidden_states, reshaped_hidden_states for Swin-like models), a stage_modules list on the "
        "model; for other modules, its children by output shape. FitNets hint_layers=auto pairs the middle "
        "stages, BYOT puts exits after every stage but the last, SFTN branches after each.")
    parser.add_argument("model", help="timm name, hf-hub:org/name, local folder or transformers repo id")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--in-chans", type=int, default=None, help="input channels for timm names (default 3)")
    parser.add_argument("--stages-only", action="store_true", help="only the stage outputs")
    parser.add_argument("--pretrained", action="store_true", help="load pretrained weights (not needed for shapes)")
    args = parser.parse_args(argv)
    from ..models import input_spec, load_model
    from ..models.taps import describe_layers, format_layers

    kw = {"in_chans": args.in_chans} if args.in_chans else {}
    model = load_model(args.model, pretrained=args.pretrained, **kw)
    size = args.image_size or input_spec(model).image_size[0]
    rows = describe_layers(model, image_size=size)
    if args.stages_only:
        rows = [r for r in rows if r.get("stage")]
    print(format_layers(rows))
    from ..models.view import StagesNotFoundError, format_stages, model_view

    try:
        print("\n" + format_stages(model_view(model)))
    except StagesNotFoundError as err:
        print(f"\nno stages found: {err}")
    return 0
