import json

import pytest
import torch
from conftest import PlainClassifier, tiny_hf_resnet, tiny_spec, tiny_timm

from hf_distill.models import (
    InputAdapter,
    InputSpec,
    ModelLoadError,
    call_model,
    input_spec,
    label_names_of,
    load_model,
    model_family,
    num_classes_of,
    save_native,
    set_label_names,
)
from hf_distill.teachers import Teachers, check_label_spaces


def test_call_model_handles_each_family():
    x = torch.randn(2, 1, 16, 16)
    for model in (tiny_timm(), tiny_hf_resnet(), PlainClassifier()):
        model.eval()
        assert call_model(model, x).shape == (2, 10)
    assert [model_family(m) for m in (tiny_timm(), tiny_hf_resnet(), PlainClassifier())] == [
        "timm", "transformers", "torch"]


def test_timm_student_saved_natively_reloads_identically(tmp_path):
    import timm

    model = tiny_timm(seed=3).eval()
    set_label_names(model, [f"c{i}" for i in range(10)])
    save_native(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 10
    assert cfg["label_names"][3] == "c3"
    assert (tmp_path / "model.safetensors").exists()
    reloaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x), reloaded(x))
    # and through our own loader, which recognises a timm folder
    again = load_model(str(tmp_path)).eval()
    assert torch.equal(model(x), again(x))
    assert label_names_of(again)[3] == "c3"


def test_transformers_student_saved_natively_reloads_identically(tmp_path):
    from transformers import AutoModelForImageClassification

    model = tiny_hf_resnet(seed=4).eval()
    set_label_names(model, [f"c{i}" for i in range(10)])
    save_native(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "preprocessor_config.json").exists()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(pixel_values=x).logits, reloaded(pixel_values=x).logits)
    assert reloaded.config.id2label[3] == "c3"


def test_transformers_rgb_student_works_in_pipeline(tmp_path):
    from PIL import Image
    from transformers import pipeline

    model = tiny_hf_resnet(in_chans=3, spec=tiny_spec(mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3))
    set_label_names(model, [f"c{i}" for i in range(10)])
    save_native(model, tmp_path)
    # the saved processor matches the model's input, so the pipeline runs on any PIL image
    out = pipeline("image-classification", model=str(tmp_path))(Image.new("RGB", (20, 20)))
    assert out[0]["label"].startswith("c")


def test_load_model_timm_name_and_num_labels():
    model = load_model("test_resnet", num_labels=7, pretrained=False)
    assert num_classes_of(model) == 7 and model_family(model) == "timm"


def test_load_model_transformers_config_only_folder(tmp_path):
    from transformers import ResNetConfig

    ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=4).save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model_family(model) == "transformers" and num_classes_of(model) == 4


def test_load_model_offline_and_not_cached_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        load_model("some-org/not-cached-model", cache_dir=str(tmp_path))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_input_spec_from_timm_and_transformers_processor(tmp_path):
    import timm

    m = timm.create_model("test_resnet", pretrained=False)
    spec = input_spec(m)
    assert spec.in_chans == 3 and len(spec.mean) == 3 and spec.image_size == (160, 160)
    hf = tiny_hf_resnet(in_chans=3)
    del hf.hf_distill_input_spec
    from transformers import ViTImageProcessor

    hf.hf_distill_image_processor = ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5],
                                                     size={"height": 48, "width": 48})
    spec = input_spec(hf)
    assert spec.mean == (0.1, 0.2, 0.3) and spec.image_size == (48, 48)


def test_input_adapter_renormalises_exactly():
    raw = torch.rand(2, 3, 8, 8)
    s = InputSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), image_size=(8, 8))
    t = InputSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), image_size=(8, 8))
    x_student = (raw - 0.5) / 0.5
    want = (raw - torch.tensor(t.mean).view(1, 3, 1, 1)) / torch.tensor(t.std).view(1, 3, 1, 1)
    assert torch.allclose(InputAdapter(s, t)(x_student), want, atol=1e-6)
    assert InputAdapter(s, s).identity


def test_input_adapter_grey_to_rgb_and_fixed_size():
    raw = torch.rand(2, 1, 8, 8)
    s = InputSpec(mean=(0.5,), std=(0.25,), image_size=(8, 8), in_chans=1)
    t = InputSpec(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), image_size=(16, 16), in_chans=3, fixed_size=True)
    out = InputAdapter(s, t)((raw - 0.5) / 0.25)
    assert out.shape == (2, 3, 16, 16)
    want = torch.nn.functional.interpolate(raw.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear")
    assert torch.allclose(out, want, atol=1e-5)


def test_teachers_see_their_own_normalisation():
    seen = {}

    class Recorder(PlainClassifier):
        def forward(self, x):
            seen["x"] = x.clone()
            return super().forward(x)

    from hf_distill.models import set_input_spec

    teacher = Recorder(in_chans=3)
    set_input_spec(teacher, InputSpec(mean=(0.2, 0.3, 0.4), std=(0.1, 0.2, 0.3), image_size=(16, 16)))
    student_spec = tiny_spec()  # grey, mean 0.5 / std 0.5
    raw = torch.rand(2, 1, 16, 16)
    Teachers([teacher], student_spec)((raw - 0.5) / 0.5)
    want = (raw.expand(-1, 3, -1, -1) - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / torch.tensor(
        [0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(seen["x"], want, atol=1e-5)


def test_class_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"predicts 10 classes.*predicts 5"):
        check_label_spaces(tiny_timm(), [tiny_hf_resnet(num_labels=5)])


def test_label_name_mismatch_is_reported():
    a, b = tiny_timm(), tiny_hf_resnet()
    set_label_names(a, [str(i) for i in range(10)])
    set_label_names(b, [str(i) for i in range(9)] + ["ten"])
    with pytest.raises(ValueError, match="label names differ"):
        check_label_spaces(a, [b])
