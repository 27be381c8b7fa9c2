"""GPU throughput and peak memory of a teacher/student pair, 1 process, bf16.

    python benchmarks/bench_gpu.py [--teacher resnet50] [--student resnet18] [--batch 256] [--image-size 224]

Measures images/s and peak GPU memory of, side by side on the same batches:
student-only training, KD with the live teacher (bf16 autocast, teacher weights in bf16), and
the teacher's inference alone. Runs as is on any CUDA machine (random init, no downloads);
``--device cpu`` gives a (slow) smoke run. Writes benchmarks/results/bench_gpu.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from hf_distill import DistillationTrainer, DistillationTrainingArguments, load_model
from hf_distill.models import InputSpec, set_input_spec


class _Synthetic(torch.utils.data.Dataset):
    def __init__(self, n, size, classes):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def run(config: str, a, device: str) -> dict:
    spec = InputSpec(image_size=(a.image_size, a.image_size))
    student = load_model(a.student, num_labels=a.classes, pretrained=False)
    set_input_spec(student, spec)
    teacher = None
    if config != "student_only":
        teacher = load_model(a.teacher, num_labels=a.classes, pretrained=False)
        set_input_spec(teacher, spec)
    data = _Synthetic(a.batch * (a.steps + a.warmup), a.image_size, a.classes)
    args = DistillationTrainingArguments(
        output_dir=f"/tmp/bench_gpu_{config}", distill_method="supervised" if teacher is None else "kd",
        per_device_train_batch_size=a.batch, max_steps=a.steps + a.warmup, bf16=device == "cuda",
        use_cpu=device == "cpu", report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=4 if device == "cuda" else 0, eval_teacher=False,
    )
    timer = {}

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):
            if state.global_step == a.warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                timer["start"] = time.perf_counter()

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  callbacks=[Clock()])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - timer["start"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"config": config, "images_per_s": a.batch * a.steps / seconds, "peak_gib": peak}


def teacher_inference(a, device: str) -> dict:
    teacher = load_model(a.teacher, num_labels=a.classes, pretrained=False).to(device).eval()
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    teacher = teacher.to(dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(a.warmup):
            teacher(x.to(dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(a.steps):
            teacher(x.to(dtype))
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"config": "teacher_inference_only", "images_per_s": a.batch * a.steps / seconds, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    rows = [run("student_only", a, a.device), run("kd_live_teacher", a, a.device), teacher_inference(a, a.device)]
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or "cpu"
    lines = [
        "# bench_gpu: throughput and peak memory (1 process, bf16 on GPU)", "",
        f"Device: {gpu}; torch {torch.__version__}; teacher `{a.teacher}`, student `{a.student}`, batch {a.batch}, "
        f"{a.image_size}px, {a.steps} timed steps after {a.warmup} warm-up.", "",
        "| configuration | images/s | peak GPU memory (GiB) |", "|---|---|---|",
        *[f"| {r['config']} | {r['images_per_s']:.1f} | {r['peak_gib']:.2f} |" for r in rows],
        "", f"KD / student-only throughput: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.3f}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/bench_gpu.md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
