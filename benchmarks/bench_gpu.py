"""GPU throughput and peak memory of teacher/student pairs, bf16: hf_distill eager / channels_last / compiled,
against timm's own ``train.py`` loop settings on the same models; one process or several (sharded teacher).

    python benchmarks/bench_gpu.py --all        # everything below for a CNN and a ViT pair (~8 min on an H200),
                                                #   writes benchmarks/results/bench_gpu_all.md
    python benchmarks/bench_gpu.py --smoke      # tiny CPU run of every code path (dynamo `eager` backend)
    python benchmarks/bench_gpu.py [--teacher resnet50] [--student resnet18] [--batch 256] [--variants ...]
    torchrun --nproc_per_node 8 benchmarks/bench_gpu.py --teacher vit_giant_patch14_224 --teacher_sharding fsdp

Rows, per pair and variant (``eager``; ``channels_last``: student, teachers and batches channels-last;
``compiled``: ``torch_compile=True``, the teacher compiled too (``teacher_compile`` follows it), plus
channels-last for CNNs):

* ``hf student``: ``DistillationTrainer(distill_method="supervised")``, the student alone;
* ``hf teacher``: the teacher's inference as the trainer runs it (``hf_distill.teachers.Teachers``: input
  adapter, bf16 weights under bf16 autocast, compiled for the compiled variant);
* ``hf kd``: ``distill_method="kd"`` with the live teacher; the table adds the additive bound
  ``1 / (1/student + 1/teacher)`` of the same variant (the teacher's forward simply added to the student step)
  and KD / bound;
* ``timm student`` / ``timm kd``: timm ``train.py``'s loop on the same models and batches (bf16 autocast,
  ``--channels-last`` / ``--torchcompile`` as the variant, no gradient clipping, ``loss.item()`` each step,
  ``optimizer.zero_grad()`` after the step); KD through timm's ``LogitDistillationTask`` (teacher weights in
  bf16, ``task.compile()`` for the compiled variant). Both loops use the optimizer the Trainer builds (fused
  AdamW), so the loops are compared, not optimizers;
* ``hf kd clip 1.0``: the compiled KD with the Trainer's default ``max_grad_norm=1.0`` (every other hf row
  uses ``max_grad_norm=0``, as timm's loop does not clip).

images/s over ``--steps`` timed steps after ``--warmup`` (compilation happens in the warm-up), peak GPU
memory (``max_memory_allocated``) of each run. Random init, no downloads; data are synthetic batches in
host memory read by a 4-worker DataLoader (pinned) in both loops. The table is rewritten after every row,
so a run cut short keeps what it measured. With ``--teacher_sharding fsdp`` under torchrun: KD with the
teacher replicated and sharded, and the teacher memory each process holds (rank 0 writes).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from hf_distill import DistillationTrainer, DistillationTrainingArguments, load_model
from hf_distill.models import InputSpec, set_input_spec

ALL_PAIRS = [  # (teacher, student, batch, image size, convolutional)
    ("resnet50", "resnet18", 256, 224, True),
    ("vit_large_patch16_224", "vit_small_patch16_224", 128, 224, False),
]
SMOKE_PAIR = ("resnet18", "resnet10t", 4, 32, True)
VARIANTS = ("eager", "channels_last", "compiled")


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


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def _models(a, need_teacher: bool):
    spec = InputSpec(image_size=(a.image_size, a.image_size))
    student = load_model(a.student, num_labels=a.classes, pretrained=False)
    set_input_spec(student, spec)
    teacher = None
    if need_teacher:
        teacher = load_model(a.teacher, num_labels=a.classes, pretrained=False)
        if not a.teacher_own_input:
            set_input_spec(teacher, spec)
    return student, teacher


def _flags(a, variant: str) -> tuple[bool, bool]:
    """(compiled, channels_last) of a variant."""
    return variant == "compiled", variant == "channels_last" or (variant == "compiled" and a.conv)


def run(config: str, a, device: str, sharding: str = "none", variant: str = "eager", clip: float = 1.0) -> dict:
    """A DistillationTrainer run: ``config`` "student_only" (supervised) or "kd_live_teacher" (``a.method``)."""
    compiled, channels_last = _flags(a, variant)
    student, teacher = _models(a, config != "student_only")
    data = _Synthetic(a.batch * (a.steps + a.warmup), a.image_size, a.classes)
    args = DistillationTrainingArguments(
        output_dir=f"/tmp/bench_gpu_{config}", distill_method="supervised" if teacher is None else a.method,
        per_device_train_batch_size=a.batch, max_steps=a.steps + a.warmup, bf16=device == "cuda",
        use_cpu=device == "cpu", report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=a.workers, eval_teacher=False, teacher_sharding=sharding, max_grad_norm=clip,
        torch_compile=compiled, torch_compile_backend=a.backend if compiled else None, channels_last=channels_last,
    )
    timer = {}

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):
            if state.global_step in (a.warmup, a.warmup + a.steps):
                _sync(device)
                timer[state.global_step] = time.perf_counter()

    _reset_peak(device)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  callbacks=[Clock()])
    held = _teacher_gib(trainer) if teacher is not None else 0.0
    trainer.train()
    seconds = timer[a.warmup + a.steps] - timer[a.warmup]
    world = trainer.accelerator.num_processes
    if teacher is not None and a.method != "kd":
        config = config.replace("kd", a.method)
    del trainer, student, teacher
    return {"config": config + (f" ({sharding}, {world} processes)" if world > 1 else ""),
            "images_per_s": a.batch * a.steps * world / seconds, "peak_gib": _peak(device), "teacher_gib": held}


def teacher_inference(a, device: str, variant: str = "eager") -> dict:
    """The teacher as the trainer runs it: ``Teachers`` (adapter, teacher_dtype weights, autocast), no autograd."""
    from hf_distill.models import input_spec
    from hf_distill.teachers import Teachers

    compiled, channels_last = _flags(a, variant)
    student, teacher = _models(a, True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    teachers = Teachers([teacher], input_spec(student)).to(device=device, dtype=dtype)
    if channels_last:
        teachers.to(memory_format=torch.channels_last)
    if compiled:
        teachers.compile(backend=a.backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _reset_peak(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for _ in range(a.warmup):
            teachers(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(a.steps):
            teachers(x)
        _sync(device)
    seconds = time.perf_counter() - start
    held = sum(p.nbytes for p in teacher.parameters()) / 2**30
    return {"config": "teacher_inference_only", "images_per_s": a.batch * a.steps / seconds, "peak_gib": _peak(device),
            "teacher_gib": held}


def timm_loop(a, device: str, variant: str, kd: bool) -> dict:
    """timm train.py's step on the same models and batches: bf16 autocast forward + loss, backward, optimizer
    step, ``loss.item()``, ``zero_grad()``; ``--channels-last`` / ``--torchcompile`` per the variant."""
    from timm.task import LogitDistillationTask

    from hf_distill.arguments import DistillationTrainingArguments as Args

    compiled, channels_last = _flags(a, variant)
    student, teacher = _models(a, kd)
    student = student.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = student.to(memory_format=memory_format)
    if kd:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        teacher = teacher.to(device=device, dtype=dtype, memory_format=memory_format)
        task = LogitDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=0.1,
                                     distill_loss_weight=0.9, temperature=4.0, device=torch.device(device),
                                     verbose=False)
        if compiled:
            task.compile(backend=a.backend)
        task.train()
        params = [p for p in task.trainable_module.parameters() if p.requires_grad]

        def loss_of(x, y):
            return task(x, y)["loss"]
    else:
        model = torch.compile(student, backend=a.backend) if compiled else student
        model.train()
        params = list(student.parameters())

        def loss_of(x, y):
            return F.cross_entropy(model(x), y)

    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(Args(output_dir="/tmp/bench_gpu_opt", report_to=[],
                                                            use_cpu=device == "cpu", learning_rate=1e-3))
    optimizer = cls(params, **kwargs)
    data = _Synthetic(a.batch * (a.steps + a.warmup), a.image_size, a.classes)
    loader = torch.utils.data.DataLoader(data, batch_size=a.batch, shuffle=True, num_workers=a.workers,
                                         pin_memory=device == "cuda", drop_last=True)
    _reset_peak(device)
    start = None
    for i, batch in enumerate(loader):
        if i == a.warmup:
            _sync(device)
            start = time.perf_counter()
        x = batch["pixel_values"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = batch["labels"].to(device, non_blocking=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        loss.item()  # train.py's loss meter, every step
        optimizer.zero_grad()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"config": "timm kd" if kd else "timm student", "images_per_s": a.batch * a.steps / seconds,
            "peak_gib": _peak(device), "teacher_gib": 0.0}


def _bound(student: float, teacher: float) -> float:
    return 1.0 / (1.0 / student + 1.0 / teacher)


def compare(a, device: str, pairs, variants, path: str, header: list[str]) -> None:
    """Every row of every pair; the markdown table rewritten after each row."""
    rows, t0 = [], time.perf_counter()

    def table() -> list[str]:
        lines = ["| pair | variant | run | images/s | peak GPU memory GiB | additive bound images/s | vs bound |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['pair']} | {r['variant']} | {r['config']} | {r['images_per_s']:.1f} | "
                         f"{r['peak_gib']:.2f} | {r.get('bound', '')} | {r.get('vs_bound', '')} |")
        return lines

    def add(pair, variant, result):
        result.update(pair=pair, variant=variant)
        rows.append(result)
        print(f"[{time.perf_counter() - t0:.0f}s] {pair} {variant} {result['config']}: "
              f"{result['images_per_s']:.1f} images/s, peak {result['peak_gib']:.2f} GiB", flush=True)
        text = "\n".join(header + table() + ["", f"Elapsed: {time.perf_counter() - t0:.0f} s."]) + "\n"
        with open(path, "w") as f:
            f.write(text)

    for teacher, student, batch, size, conv in pairs:
        a.teacher, a.student, a.batch, a.image_size, a.conv = teacher, student, batch, size, conv
        pair = f"`{teacher}` -> `{student}` (batch {batch}, {size}px)"
        chosen = [v for v in variants if conv or v != "channels_last"]  # channels_last: convolutions only
        for variant in chosen:
            s = run("student_only", a, device, variant=variant, clip=0.0)
            add(pair, variant, dict(s, config="hf student"))
            t = teacher_inference(a, device, variant)
            add(pair, variant, dict(t, config="hf teacher"))
            k = run("kd_live_teacher", a, device, variant=variant, clip=0.0)
            bound = _bound(s["images_per_s"], t["images_per_s"])
            add(pair, variant, dict(k, config="hf kd", bound=f"{bound:.1f}",
                                    vs_bound=f"**{k['images_per_s'] / bound:.3f}**"))
            add(pair, variant, timm_loop(a, device, variant, kd=False))
            tk = timm_loop(a, device, variant, kd=True)
            add(pair, variant, dict(tk, bound=f"{bound:.1f}", vs_bound=f"{tk['images_per_s'] / bound:.3f}"))
        if "compiled" in chosen:
            c = run("kd_live_teacher", a, device, variant="compiled", clip=1.0)
            add(pair, "compiled", dict(c, config="hf kd clip 1.0"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="every variant and the timm anchors on the CNN and ViT pairs")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path (results to --name smoke)")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help="with --all / --smoke, or alone: the variants to run (default all)")
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4 on GPU, 0 on CPU)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; smoke: eager)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--teacher_sharding", default="none", choices=["none", "fsdp"],
                   help="fsdp (under torchrun, several GPUs): also KD with the teacher sharded over the processes")
    p.add_argument("--method", default="kd", help="distill_method of the live-teacher run (kd, feature, dkd, ...)")
    p.add_argument("--teacher_own_input", action="store_true",
                   help="the teacher keeps its own input size / normalisation (its adapter resizes each batch), e.g. "
                   "DINOv2 at 518px")
    p.add_argument("--name", default="", help="suffix of the result file (bench_gpu_NAME.md)")
    a = p.parse_args()
    if a.smoke:
        a.device, a.steps, a.warmup, a.classes = "cpu", 2, 2, 10
        a.name = a.name or "smoke"
    elif a.all and a.steps == p.get_default("steps"):
        a.steps = 20  # 28 runs in ~8 minutes: each run's set-up and compilation cost more than its steps
    a.workers = a.workers if a.workers is not None else (4 if a.device == "cuda" else 0)
    a.backend = a.backend or ("eager" if a.smoke else "inductor")
    a.conv = True
    if a.device == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or "cpu"
    results = "benchmarks/results" if not a.smoke else "/tmp"
    os.makedirs(results, exist_ok=True)
    if a.all or a.smoke or (a.variants and world == 1):
        pairs = [SMOKE_PAIR] if a.smoke else ALL_PAIRS if a.all else [
            (a.teacher, a.student, a.batch, a.image_size, "vit" not in a.student)]
        name = a.name or ("all" if a.all else "variants")
        header = [f"# bench_gpu: hf_distill eager / channels_last / compiled vs timm train.py's loop, bf16", "",
                  f"Device: {gpu}; torch {torch.__version__}; compile backend `{a.backend}`; {a.steps} timed steps "
                  f"after {a.warmup} warm-up (compilation included there); {a.classes} classes, random init, synthetic "
                  f"batches through a {a.workers}-worker DataLoader. Command: `python benchmarks/bench_gpu.py "
                  f"{'--all' if a.all else '--smoke' if a.smoke else ''}`. Variants: `compiled` = torch.compile of "
                  "student and teacher (+ channels_last for CNNs). hf rows use max_grad_norm=0 (no clipping, as "
                  "timm's loop) except `hf kd clip 1.0`. Additive bound = 1/(1/student + 1/teacher) of the same "
                  "variant.", ""]
        compare(a, a.device, pairs, a.variants or VARIANTS, os.path.join(results, f"bench_gpu_{name}.md"), header)
        print(open(os.path.join(results, f"bench_gpu_{name}.md")).read())
        return
    if world > 1:  # the same global batches: each process takes its share
        rows = [run("kd_live_teacher", a, a.device)]
        if a.teacher_sharding == "fsdp":
            rows.append(run("kd_live_teacher", a, a.device, "fsdp"))
    else:
        rows = [run("student_only", a, a.device), run("kd_live_teacher", a, a.device), teacher_inference(a, a.device)]
    if int(os.environ.get("RANK", "0")):
        return
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
    with open(f"{results}/bench_gpu{'_' + a.name if a.name else ''}.md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
