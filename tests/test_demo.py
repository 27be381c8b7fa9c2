import os

import timm  # noqa: F401  (the demo builds a timm teacher)


def test_demo_runs_offline_and_saves_the_student_with_its_card(tmp_path):
    from transformers import AutoModelForImageClassification

    from hf_distill.demo import run_demo

    lines = []
    result = run_demo(str(tmp_path), teacher_epochs=1, student_epochs=1, student_fraction=0.05,
                      print_fn=lines.append)
    for key in ("teacher_accuracy", "student_scratch_accuracy", "student_distilled_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["teacher_params"] > 20 * result["student_params"]
    table = "\n".join(lines)
    assert "teacher (timm resnet18)" in table and "student distilled (KD)" in table
    assert "      epoch 1/1: step" in table  # a sign of life during each stage
    out = tmp_path / "student_distilled"
    assert {"model.safetensors", "config.json", "README.md"} <= set(os.listdir(out))
    AutoModelForImageClassification.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert "knowledge-distillation" in card and "resnet18" in card
