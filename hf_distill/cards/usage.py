"""The card's usage snippet: loading the student with its own library (timm, transformers, torch)."""

from __future__ import annotations

from .context import CardContext


def _usage(ctx: CardContext) -> tuple[str, str, str, str]:
    """(intro, code, extra intro, extra code) for the student's library."""
    repo = ctx.repo_id
    mode = "L" if ctx.in_chans == 1 else "RGB"
    if ctx.task != "image-classification" and ctx.library_name in ("timm", "transformers"):
        return _feature_usage(ctx, repo, mode)
    if ctx.library_name == "timm":
        ref = f"hf-hub:{repo}" if repo else "local-dir:/path/to/this/folder"
        intro = ("Load the student with [timm](https://github.com/huggingface/pytorch-image-models)"
                 + ("" if repo else " from the folder that holds this card") + ":")
        code = f"""import timm
import torch
from PIL import Image

model = timm.create_model("{ref}", pretrained=True).eval()
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)

image = Image.open("image.jpg").convert("{mode}")
with torch.no_grad():
    probabilities = model(transform(image).unsqueeze(0)).softmax(dim=-1)
labels = model.pretrained_cfg.get("label_names")
top = probabilities.topk(min(5, probabilities.shape[-1]))
for p, i in zip(top.values[0].tolist(), top.indices[0].tolist()):
    print(labels[i] if labels else i, round(p, 4))"""
        return intro, code, "", ""
    if ctx.library_name == "transformers":
        ref = repo or "/path/to/this/folder"
        where = "" if repo else " (from the folder that holds this card)"
        intro = "With the 🤗 Transformers pipeline" + where + ":"
        code = f"""from transformers import pipeline

classifier = pipeline("image-classification", model="{ref}")
print(classifier("image.jpg"))"""
        extra = f"""import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{ref}")
model = AutoModelForImageClassification.from_pretrained("{ref}").eval()

image = Image.open("image.jpg").convert("{mode}")
with torch.no_grad():
    logits = model(**processor(images=image, return_tensors="pt")).logits
print(model.config.id2label[logits.argmax(-1).item()])"""
        if ctx.in_chans == 1:
            # pipeline("image-classification") converts every image to RGB: a 1-channel model cannot take it
            return ("With the model class" + where + " (this is a 1-channel model: the image-classification "
                    "pipeline always feeds RGB images, so it cannot run it):"), extra, "", ""
        return intro, code, "Or with the model class directly:", extra
    # plain torch module: the weights only
    fetch = (f'from huggingface_hub import hf_hub_download\n\nweights = hf_hub_download("{repo}", "model.safetensors")'
             if repo else 'weights = "/path/to/this/folder/model.safetensors"')
    size = ctx.image_size or (224, 224)
    intro = ("The student is a plain PyTorch module: build the same architecture "
             f"(`{ctx.student_name}`), then load the weights:")
    code = f"""import torch
from safetensors.torch import load_file
{fetch}

model = ...  # the student architecture, `{ctx.student_name}`
model.load_state_dict(load_file(weights))
model.eval()
with torch.no_grad():
    logits = model(torch.randn(1, {ctx.in_chans}, {size[0]}, {size[1]}))"""
    return intro, code, "", ""


def _feature_usage(ctx: CardContext, repo: str | None, mode: str) -> tuple[str, str, str, str]:
    """Usage of a feature-distilled backbone: its embedding and its feature map."""
    if ctx.library_name == "timm":
        ref = f"hf-hub:{repo}" if repo else "local-dir:/path/to/this/folder"
        code = f"""import timm
import torch
from PIL import Image

model = timm.create_model("{ref}", pretrained=True).eval()  # a backbone: no classifier
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)

x = transform(Image.open("image.jpg").convert("{mode}")).unsqueeze(0)
with torch.no_grad():
    feature_map = model.forward_features(x)                  # spatial features
    embedding = model.forward_head(feature_map, pre_logits=True)  # one vector per image
print(embedding.shape, feature_map.shape)"""
        return "Load the student backbone with timm:", code, "", ""
    ref = repo or "/path/to/this/folder"
    code = f"""import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{ref}")
model = AutoModel.from_pretrained("{ref}").eval()  # the student backbone

inputs = processor(images=Image.open("image.jpg").convert("{mode}"), return_tensors="pt")
with torch.no_grad():
    features = model(**inputs).last_hidden_state
print(features.shape)"""
    return "Load the student backbone with 🤗 Transformers:", code, "", ""
