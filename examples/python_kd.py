"""KD from Python: a timm teacher into a transformers student on the embedded digits data.

    python examples/python_kd.py
"""

import timm
from transformers import AutoModelForImageClassification, ResNetConfig

from hf_distill import DistillationTrainer, DistillationTrainingArguments, InputSpec, set_input_spec
from hf_distill.data import digits_dataset, with_image_transform

spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=(32, 32), in_chans=1)
data = digits_dataset()
train, test = with_image_transform(data["train"], spec), with_image_transform(data["test"], spec)

teacher = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
student = AutoModelForImageClassification.from_config(
    ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], num_labels=10))
for model in (teacher, student):
    set_input_spec(model, spec)


def args(out, method):
    return DistillationTrainingArguments(output_dir=out, distill_method=method, num_train_epochs=5,
                                         per_device_train_batch_size=32, learning_rate=2e-3, report_to=[],
                                         save_strategy="no", use_cpu=True)


DistillationTrainer(model=teacher, args=args("outputs/py_teacher", "supervised"), train_dataset=train).train()
trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args("outputs/py_student", "kd"),
                              train_dataset=train, eval_dataset=test)
trainer.train()
print(trainer.evaluate())        # eval_accuracy, eval_teacher_accuracy
trainer.save_model()             # transformers format + README.md model card
