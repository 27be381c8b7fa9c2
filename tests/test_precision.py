"""The precision settings a GPU user gets, run on CPU: fp32, bf16 autocast, bf16 and fp16 teachers.

For kd, fitnets, byot and sftn: train (with a checkpoint), evaluate, save the student (with its
card, whose latency measurement runs the teacher in its own dtype), reload it to identical
outputs, and resume from the checkpoint to the same weights as an uninterrupted run.
"""

import pytest
import torch
from conftest import tiny_spec, tiny_timm

from hf_distill import DistillationTrainer, load_model
from hf_distill.data import with_image_transform
from hf_distill.models import set_input_spec

PRECISIONS = {
    "fp32": {},
    "bf16_autocast": {"bf16": True},
    "bf16_teacher": {"teacher_dtype": "bfloat16"},
    "fp16_teacher": {"teacher_dtype": "float16"},
}
METHODS = {
    "kd": {"distill_method": "kd"},
    "fitnets": {"distill_method": "fitnets", "hint_layers": ["layer1:layer2"], "hint_weight": 1.0},
    "byot": {"distill_method": "byot"},
    "sftn": {"distill_method": "sftn", "sftn_student_model": "test_resnet"},
}
SPEC = tiny_spec(size=32)
CASES = [(m, p) for m in METHODS for p in PRECISIONS
         if not (m == "sftn" and p.endswith("_teacher"))]  # SFTN trains a teacher and runs none


@pytest.fixture(scope="module")
def data(digits):
    return (with_image_transform(digits["train"].select(range(48)), SPEC),
            with_image_transform(digits["test"].select(range(24)), SPEC))


def _trainer(method, precision, make_args, train, evaluation, out, **kw):
    args = make_args(output_dir=str(out), max_steps=3, save_strategy="steps", save_steps=2, logging_steps=1,
                     lr_scheduler_type="constant", **METHODS[method], **PRECISIONS[precision], **kw)
    teacher = None if method in ("byot", "sftn") else tiny_timm("resnet18", seed=2, spec=SPEC)
    return DistillationTrainer(model=tiny_timm(seed=1, spec=SPEC), teacher_model=teacher, args=args,
                               train_dataset=train, eval_dataset=evaluation)


@pytest.mark.parametrize("method,precision", CASES)
def test_train_evaluate_save_reload_resume(method, precision, data, make_args, tmp_path):
    train, evaluation = data
    t = _trainer(method, precision, make_args, train, evaluation, tmp_path / "run")
    if precision.endswith("_teacher") and len(t.teachers):
        want = torch.bfloat16 if precision == "bf16_teacher" else torch.float16
        assert next(t.teachers.parameters()).dtype == want
    t.train()
    logged = [h for h in t.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    metrics = t.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    if len(t.teachers):
        assert 0.0 <= metrics["eval_teacher_accuracy"] <= 1.0
    t.save_model()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "ms" in card or "Inference time" in card
    reloaded = load_model(str(tmp_path / "run")).eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(reloaded(x), t.student.eval()(x))
    # resume from the step-2 checkpoint: the same final weights as the run that was not interrupted
    resumed = _trainer(method, precision, make_args, train, evaluation, tmp_path / "run")
    set_input_spec(resumed.student, SPEC)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for (k, a), b in zip(t.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=0), k
