"""Model cards for distilled students (hf_distill.cards), checked offline against a local fake Hub."""

import re

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results
from torch import nn

from hf_distill.cards import (
    CardContext,
    build_model_card,
    framework_versions,
    hub_repo_id,
    measure_latency_ms,
    scrub_secrets,
    template_path,
)
from hub_server import local_hub

FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"


def _kd_context(**overrides):
    ctx = dict(
        student_name="resnet18",
        library_name="timm",
        student_params=11_689_512,
        method="kd",
        teacher_names=["hf-hub:timm/resnet50.a1_in1k"],
        teacher_params=[25_557_032],
        hyperparameters={"temperature": 4.0, "alpha": 0.7, "teacher_input": "renormalise"},
        metrics={"accuracy": 0.912, "teacher_accuracy": 0.934, "loss": 0.41, "runtime": 2.5},
        dataset="uoft-cs/cifar10",
        license="Apache-2.0",
        training={"epochs": 3, "train_batch_size": 64, "optimizer": "adamw_torch", "learning_rate": 1e-3,
                  "precision": "fp32", "num_processes": 1, "seed": 42, "steps": 300},
        timing={"student_ms_per_image": 1.5, "teacher_ms_per_image": 4.5, "device": "cpu", "batch_size": 8,
                "image_size": (32, 32)},
        label_names=[f"class_{i}" for i in range(10)],
        repo_id="me/resnet18-kd-cifar10",
        image_size=(32, 32),
        notes={"Teacher input": "re-normalised from the student's transform"},
    )
    ctx.update(overrides)
    return CardContext(**ctx)


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "card must start with YAML front matter"
    return yaml.safe_load(match.group(1))


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_template_is_found_and_has_front_matter():
    text = open(template_path(), encoding="utf-8").read()
    assert text.startswith("---\n{{ card_data }}\n---")


def test_kd_card_metadata_round_trips():
    card = build_model_card(_kd_context())
    meta = _front_matter(str(card))
    assert meta["base_model"] == "timm/resnet50.a1_in1k"
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"knowledge-distillation", "kd", "image-classification", "timm"} <= set(meta["tags"])
    assert meta["datasets"] == ["uoft-cs/cifar10"] and meta["license"] == "apache-2.0"

    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "resnet18-kd-cifar10"
    assert results[0].metric_type == "accuracy" and results[0].metric_value == pytest.approx(0.912)
    assert results[0].task_type == "image-classification" and results[0].dataset_type == "uoft-cs/cifar10"

    again = ModelCard(str(card))  # parses (and validates the model-index) like the Hub client does
    assert isinstance(again.data, ModelCardData)
    assert again.data.eval_results[0].metric_value == pytest.approx(0.912)
    assert again.data.base_model == "timm/resnet50.a1_in1k"

    text = card.text
    for section in ("## Distillation", "### Distillation hyperparameters", "## Results", "## Size and speed",
                    "## How to use", "## Training procedure", "## Notes", "## Framework versions"):
        assert section in text, section
    for key in ("temperature", "alpha", "teacher_input"):
        assert f"`{key}`" in text
    for key in ("epochs", "train_batch_size", "optimizer", "learning_rate", "precision", "num_processes", "seed"):
        assert f"| {key} |" in text
    assert "https://arxiv.org/abs/1503.02531" in text
    assert "91.20%" in text and "93.40%" in text
    assert "3.00x faster" in text and "2.19x fewer parameters" in text
    assert 'timm.create_model("hf-hub:me/resnet18-kd-cifar10", pretrained=True)' in text
    assert "resolve_model_data_config" in text and "create_transform" in text
    assert "re-normalised from the student's transform" in text
    assert "| `loss` | 0.41 |" in text


def test_byot_card_has_per_exit_rows():
    ctx = _kd_context(method="byot", teacher_names=[], teacher_params=[], dataset="sklearn-digits", repo_id=None,
                      metrics={"accuracy": 0.95, "exit1_accuracy": 0.81, "exit2_accuracy": 0.9,
                               "exit10_accuracy": 0.93, "ensemble_accuracy": 0.96},
                      hyperparameters={"temperature": 3.0, "alpha": 0.3, "feature_weight": 0.03})
    card = build_model_card(ctx)
    meta = _front_matter(str(card))
    assert "base_model" not in meta and "datasets" not in meta  # no teacher; a local dataset is no Hub id
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "sklearn-digits"
    text = card.text
    rows = [line for line in text.splitlines() if line.startswith("| Exit ")]
    assert [r.split("(")[0].strip("| ") for r in rows] == ["Exit 1", "Exit 2", "Exit 10"]
    assert "| Ensemble of all exits | 96.00% |" in text
    assert "https://arxiv.org/abs/1905.08094" in text
    assert 'timm.create_model("local-dir:' in text  # no repo id: local folder form


def test_local_or_bare_teachers_are_not_base_models(tmp_path):
    local = tmp_path / "teacher"
    local.mkdir()
    ctx = _kd_context(teacher_names=[str(local), "resnet50", "./runs/teacher"], teacher_params=[1, 2, 3],
                      metrics={"accuracy": 0.5}, dataset=None)
    card = build_model_card(ctx)
    meta = _front_matter(str(card))
    assert "base_model" not in meta and "model-index" not in meta and "datasets" not in meta
    assert "Teachers (all)" in card.text and "an ensemble of" in card.text

    assert hub_repo_id("hf-hub:org/name") == "org/name"
    assert hub_repo_id("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    assert hub_repo_id("resnet50") is None and hub_repo_id(str(local)) is None
    assert hub_repo_id("/abs/path/model") is None and hub_repo_id("local-dir:/x/y") is None
    assert hub_repo_id("../a/b") is None and hub_repo_id(None) is None


def test_multiple_hub_teachers_and_transformers_usage():
    ctx = _kd_context(library_name="transformers", student_name="my-org/tiny-vit",
                      teacher_names=["google/vit-base-patch16-224", "hf-hub:timm/resnet50.a1_in1k"],
                      teacher_params=[86_000_000, 25_000_000], license="my custom licence")
    card = build_model_card(ctx)
    meta = _front_matter(str(card))
    assert meta["base_model"] == ["google/vit-base-patch16-224", "timm/resnet50.a1_in1k"]
    assert meta["library_name"] == "transformers" and "timm" not in meta["tags"]
    assert meta["license"] == "other" and meta["license_name"] == "my-custom-licence"
    assert 'pipeline("image-classification", model="me/resnet18-kd-cifar10")' in card.text
    assert "AutoModelForImageClassification.from_pretrained" in card.text


def test_torch_supervised_card():
    ctx = CardContext(student_name="SmallCNN", library_name="torch", student_params=12_345, method="supervised",
                      in_chans=1, image_size=(8, 8))
    card = build_model_card(ctx)
    meta = _front_matter(str(card))
    assert meta.get("library_name") in (None, "pytorch")
    assert "model-index" not in meta and "base_model" not in meta
    assert "load_state_dict" in card.text and "torch.randn(1, 1, 8, 8)" in card.text
    assert "No evaluation results were recorded" in card.text


def test_tokens_are_scrubbed():
    ctx = _kd_context(hyperparameters={"temperature": 2.0, "hub_token": "secret-value-123",
                                       "comment": f"pushed with {FAKE_TOKEN}", "distillation_token": True},
                      notes={"command": f"hf-distill train --hub_token {FAKE_TOKEN}"},
                      training={"run_name": FAKE_TOKEN})
    text = str(build_model_card(ctx))
    assert FAKE_TOKEN not in text and "secret-value-123" not in text
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)
    assert "| `distillation_token` | True |" in text  # booleans under *token keys are not secrets
    assert scrub_secrets(f"a {FAKE_TOKEN} b") == "a <redacted> b"
    assert scrub_secrets("hf_short stays") == "hf_short stays"


def test_validate_against_local_hub(tmp_path):
    card = build_model_card(_kd_context())
    with local_hub() as hub:
        card.validate()  # POST /api/validate-yaml on the local server
        assert ("POST", "/api/validate-yaml") in hub.requests
        with pytest.raises(ValueError, match="Invalid metadata"):  # the pre-commit README check, invalid YAML
            HfApi()._validate_yaml("---\nlicense: [unclosed\n---\n# x\n")
        from huggingface_hub import create_repo

        create_repo("me/resnet18-kd-cifar10")
        card.push_to_hub("me/resnet18-kd-cifar10")
        pushed = hub.repos["me/resnet18-kd-cifar10"]["README.md"].decode()
        assert pushed == str(card) and FAKE_TOKEN not in pushed
        from huggingface_hub import hf_hub_download

        loaded = ModelCard.load(hf_hub_download("me/resnet18-kd-cifar10", "README.md", cache_dir=tmp_path))
        assert loaded.data.base_model == "timm/resnet50.a1_in1k"


@pytest.mark.parametrize("in_chans", [3, 1], ids=["rgb", "grey"])
def test_usage_snippets_run_against_local_hub(tmp_path, monkeypatch, in_chans):
    """The card's own code blocks load the pushed student (timm and transformers, RGB and grey) and classify an
    RGB image file; a grey transformers student's card shows no pipeline snippet (pipelines feed RGB)."""
    import timm
    from huggingface_hub import create_repo, upload_folder
    from PIL import Image
    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_distill.models import InputSpec, save_native, set_input_spec

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    Image.new("RGB", (40, 40), (120, 30, 200)).save("image.jpg")

    spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=(32, 32), in_chans=in_chans)
    timm_model = timm.create_model("test_resnet", num_classes=3, in_chans=in_chans)
    hf_model = ResNetForImageClassification(ResNetConfig(num_labels=3, embedding_size=8, hidden_sizes=[8, 8],
                                                         depths=[1, 1], num_channels=in_chans))
    with local_hub() as hub:
        for repo, model, library in (("me/timm-student", timm_model, "timm"),
                                     ("me/hf-student", hf_model, "transformers")):
            set_input_spec(model, spec)
            folder = tmp_path / library
            save_native(model, folder)
            ctx = _kd_context(library_name=library, repo_id=repo, in_chans=in_chans, image_size=(32, 32))
            card = build_model_card(ctx)
            card.save(folder / "README.md")
            create_repo(repo)
            upload_folder(repo_id=repo, folder_path=folder)
            blocks = _python_blocks(card.text)
            assert blocks
            if library == "transformers":
                assert ("pipeline(" in card.text) == (in_chans == 3)  # grey: no snippet that cannot work
            for code in blocks:
                exec(compile(code, f"<{library} usage>", "exec"), {})
            assert any(m == "GET" and p.startswith(f"/{repo}/resolve/") for m, p in hub.requests)
        # the local-folder form (no repo id) runs too
        card = build_model_card(_kd_context(repo_id=None, in_chans=in_chans))
        code = _python_blocks(card.text)[0].replace("/path/to/this/folder", str(tmp_path / "timm"))
        exec(compile(code, "<timm local usage>", "exec"), {})


def test_measure_latency_ms_on_tiny_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model.train()
    ms = measure_latency_ms(model, torch.randn(2, 3, 16, 16), call=lambda m, x: m(x), repeats=3)
    assert isinstance(ms, float) and ms > 0
    assert model.training  # mode restored
    ms_default = measure_latency_ms(model, torch.randn(3, 16, 16))  # default call: hf_distill.models.call_model
    assert ms_default > 0


def test_framework_versions():
    versions = framework_versions()
    assert {"torch", "huggingface_hub", "hf_distill", "timm", "transformers"} <= set(versions)
    assert all(isinstance(v, str) and v for v in versions.values())


def test_card_template_ships_inside_the_package():
    # wheels carry only the package: the template must be reachable from it (a link to model_cards/)
    import importlib.resources
    from pathlib import Path

    from hf_distill.cards import TEMPLATE_NAME, template_path

    packaged = importlib.resources.files("hf_distill").joinpath("templates", TEMPLATE_NAME)
    assert packaged.is_file()
    top = Path(__file__).resolve().parents[1] / "model_cards" / TEMPLATE_NAME
    assert packaged.read_text() == top.read_text()
    assert Path(template_path()).parent.name == "templates"
