"""The embedded default job: offline, on real data that ships with scikit-learn.

1. train a timm ResNet-18 teacher on sklearn's handwritten digits (32x32 grey);
2. train a small transformers ResNet student from scratch, and the same student with KD
   from the teacher, with the same budget and seed;
3. print teacher / student-from-scratch / distilled-student accuracy and parameter counts
   and save the distilled student (transformers format) with its model card.

``hf-distill demo --help`` lists the knobs. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

DEMO_IMAGE_SIZE = 32


def demo_models(seed: int = 0):
    """(teacher, student) built from config: timm resnet18 and a ~20x smaller transformers ResNet."""
    import timm
    import torch
    from transformers import AutoModelForImageClassification, ResNetConfig

    from .models import InputSpec, set_input_spec, set_label_names

    spec = InputSpec(mean=(0.5,), std=(0.5,), image_size=(DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), in_chans=1)
    names = [str(i) for i in range(10)]
    torch.manual_seed(seed)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    student = AutoModelForImageClassification.from_config(
        ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                     layer_type="basic", num_labels=10)
    )
    for model in (teacher, student):
        set_input_spec(model, spec)
        set_label_names(model, names)
    return teacher, student


def _fresh_student(seed: int):
    return demo_models(seed)[1]


def run_demo(output_dir: str = "hf_distill_demo", teacher_epochs: int = 10, student_epochs: int = 60,
             student_fraction: float = 0.1, seed: int = 0, print_fn=print) -> dict:
    """Run the demo; returns the accuracies and parameter counts it prints."""
    import logging

    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging

    from .arguments import DistillationTrainingArguments
    from .callbacks import EpochPrinter
    from .data import digits_dataset, with_image_transform
    from .models import count_parameters, input_spec
    from .trainer import DistillationTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("hf_distill").setLevel(logging.WARNING)
    start = time.time()
    dsd = digits_dataset(seed=seed)
    teacher, _ = demo_models(seed)
    spec = input_spec(teacher)
    train = with_image_transform(dsd["train"], spec)
    test = with_image_transform(dsd["test"], spec)
    # Students see a labelled subset: where labels are scarce a teacher's soft targets matter most.
    n_student = max(10, int(len(dsd["train"]) * student_fraction))
    student_train = with_image_transform(dsd["train"].shuffle(seed=seed).select(range(n_student)), spec)

    def args(name: str, method: str, epochs: int, **kw) -> DistillationTrainingArguments:
        return DistillationTrainingArguments(
            output_dir=os.path.join(output_dir, name), distill_method=method, num_train_epochs=epochs,
            per_device_train_batch_size=32, per_device_eval_batch_size=128, learning_rate=2e-3,
            weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=10, logging_strategy="epoch",
            eval_strategy="no", save_strategy="no", report_to=[], seed=seed, data_seed=seed,
            disable_tqdm=True, dataloader_num_workers=0, use_cpu=True, **kw,
        )

    def trainer(model, name, method, epochs, every, data, **kw):
        t = DistillationTrainer(model=model, args=args(name, method, epochs), train_dataset=data, eval_dataset=test,
                                callbacks=[EpochPrinter(print_fn, prefix="      ", every=every)], **kw)
        t.remove_callback(PrinterCallback)  # the epoch lines say enough
        return t

    print_fn(f"[1/3] training the teacher (timm resnet18) on {len(train)} digits for {teacher_epochs} epochs")
    t = trainer(teacher, "teacher", "supervised", teacher_epochs, 1, train)
    t.train()
    teacher_acc = t.evaluate()["eval_accuracy"]
    t.save_model()

    print_fn(f"[2/3] training the student from scratch on {n_student} labelled digits for {student_epochs} epochs")
    s = trainer(_fresh_student(seed), "student_scratch", "supervised", student_epochs, 10, student_train)
    s.train()
    scratch_acc = s.evaluate()["eval_accuracy"]

    print_fn("[3/3] distilling the same student from the teacher (KD, T=4, alpha=0.9), same budget")
    d = trainer(_fresh_student(seed), "student_distilled", "kd", student_epochs, 10, student_train,
                teacher_model=teacher)
    d.card_info.update(dataset="sklearn-digits", license="bsd-3-clause")
    d.train()
    distilled_acc = d.evaluate()["eval_accuracy"]
    d.save_model()

    result = {
        "teacher_accuracy": teacher_acc,
        "student_scratch_accuracy": scratch_acc,
        "student_distilled_accuracy": distilled_acc,
        "teacher_params": count_parameters(teacher),
        "student_params": count_parameters(d.student),
        "seconds": time.time() - start,
    }
    rows = [
        ("teacher (timm resnet18)", result["teacher_params"], teacher_acc),
        ("student from scratch", result["student_params"], scratch_acc),
        ("student distilled (KD)", result["student_params"], distilled_acc),
    ]
    print_fn("")
    print_fn(f"{'model':<28}{'params':>12}{'test accuracy':>16}")
    for name, params, acc in rows:
        print_fn(f"{name:<28}{params:>12,}{acc:>16.2%}")
    print_fn(f"\ndistilled student + model card: {os.path.join(output_dir, 'student_distilled')}"
             f"  ({result['seconds']:.0f} s)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-distill demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="hf_distill_demo", help="where models and cards go")
    parser.add_argument("--teacher_epochs", type=int, default=10)
    parser.add_argument("--student_epochs", type=int, default=60)
    parser.add_argument("--student_fraction", type=float, default=0.1,
                        help="fraction of the training images the students see (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    run_demo(a.output_dir, a.teacher_epochs, a.student_epochs, a.student_fraction, a.seed)
    return 0
