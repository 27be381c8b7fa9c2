"""GPU throughput and peak memory of a teacher/student pair, bf16; one process or several (sharded teacher).

    python benchmarks/bench_gpu.py [--teacher resnet50] [--student resnet18] [--batch 256] [--image-size 224]
    torchrun --nproc_per_node 8 benchmarks/bench_gpu.py --teacher vit_giant_patch14_224 --teacher_sharding fsdp

Measures images/s and peak GPU memory of, side by side on the same batches:
student-only training, KD with the live teacher (bf16 autocast, teacher weights in bf16), and
the teacher's inference alone; with ``--teacher_sharding fsdp`` (several GPUs), KD with the teacher
replicated and sharded, and the teacher memory each process holds. Runs as is on any CUDA machine
(random init, no downloads); ``--device cpu`` gives a (slow) smoke run. Rank 0 writes
benchmarks/results/bench_gpu[_NAME].md (``--name``).
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


def _teacher_gib(trainer) -> float:
    """GiB of teacher weights this process holds (its shard when sharded)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes
               for t in trainer.teachers.models for p in t.parameters()) / 2**30


def run(config: str, a, device: str, sharding: str = "none") -> dict:
    spec = InputSpec(image_size=(a.image_size, a.image_size))
    student = load_model(a.student, num_labels=a.classes, pretrained=False)
    set_input_spec(student, spec)
    teacher = None
    if config != "student_only":
        teacher = load_model(a.teacher, num_labels=a.classes, pretrained=False)
        if not a.teacher_own_input:
            set_input_spec(teacher, spec)
    data = _Synthetic(a.batch * (a.steps + a.warmup), a.image_size, a.classes)
    args = DistillationTrainingArguments(
        output_dir=f"/tmp/bench_gpu_{config}", distill_method="supervised" if teacher is None else a.method,
        per_device_train_batch_size=a.batch, max_steps=a.steps + a.warmup, bf16=device == "cuda",
        use_cpu=device == "cpu", report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=4 if device == "cuda" else 0, eval_teacher=False, teacher_sharding=sharding,
    )
    timer = {}

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):
            if state.global_step == a.warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                timer["start"] = time.perf_counter()

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  callbacks=[Clock()])
    held = _teacher_gib(trainer) if teacher is not None else 0.0
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - timer["start"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    world = trainer.accelerator.num_processes
    if teacher is not None and a.method != "kd":
        config = config.replace("kd", a.method)
    del trainer, student, teacher
    return {"config": config + (f" ({sharding}, {world} processes)" if world > 1 else ""),
            "images_per_s": a.batch * a.steps * world / seconds, "peak_gib": peak, "teacher_gib": held}


def teacher_inference(a, device: str) -> dict:
    from hf_distill.models import input_spec

    teacher = load_model(a.teacher, num_labels=a.classes, pretrained=False).to(device).eval()
    size = input_spec(teacher).image_size if a.teacher_own_input else (a.image_size, a.image_size)
    x = torch.randn(a.batch, 3, *size, device=device)
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
    held = sum(p.nbytes for p in teacher.parameters()) / 2**30
    return {"config": "teacher_inference_only", "images_per_s": a.batch * a.steps / seconds, "peak_gib": peak,
            "teacher_gib": held}


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
    p.add_argument("--teacher_sharding", default="none", choices=["none", "fsdp"],
                   help="fsdp (under torchrun, several GPUs): also KD with the teacher sharded over the processes")
    p.add_argument("--method", default="kd", help="distill_method of the live-teacher run (kd, feature, dkd, ...)")
    p.add_argument("--teacher_own_input", action="store_true",
                   help="the teacher keeps its own input size / normalisation (its adapter resizes each batch), e.g. "
                   "DINOv2 at 518px")
    p.add_argument("--name", default="", help="suffix of the result file (bench_gpu_NAME.md)")
    a = p.parse_args()
    if a.device == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # the same global batches: each process takes its share
        rows = [run("kd_live_teacher", a, a.device)]
        if a.teacher_sharding == "fsdp":
            rows.append(run("kd_live_teacher", a, a.device, "fsdp"))
    else:
        rows = [run("student_only", a, a.device), run("kd_live_teacher", a, a.device), teacher_inference(a, a.device)]
    if int(os.environ.get("RANK", "0")):
        return
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or "cpu"
    lines = [
        f"# bench_gpu: throughput and peak memory ({world} process(es), bf16 on GPU)", "",
        f"Device: {gpu}; torch {torch.__version__}; teacher `{a.teacher}`, student `{a.student}`, batch {a.batch} "
        f"per process, {a.image_size}px, {a.steps} timed steps after {a.warmup} warm-up.", "",
        "| configuration | images/s (all processes) | peak GPU memory (GiB, rank 0) | teacher weights held (GiB) |",
        "|---|---|---|---|",
        *[f"| {r['config']} | {r['images_per_s']:.1f} | {r['peak_gib']:.2f} | {r['teacher_gib']:.2f} |" for r in rows],
    ]
    if world == 1:
        lines += ["", f"{a.method} / student-only throughput: "
                  f"{rows[1]['images_per_s'] / rows[0]['images_per_s']:.3f}"]
    elif len(rows) == 2:
        lines += ["", f"sharded / replicated KD throughput: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.3f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs("benchmarks/results", exist_ok=True)
    with open(f"benchmarks/results/bench_gpu{'_' + a.name if a.name else ''}.md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
