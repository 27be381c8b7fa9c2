"""Shared pieces of the benchmarks: models, in-memory batches, the hand-written KD loop, the
Trainer-step runner, interleaved timing, fresh-process peak memory and Markdown output.

Not a test and not part of the package: imported by ``benchmarks/bench_*.py`` (run as scripts,
so this folder is on ``sys.path``).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

# Benchmarks never touch the network.
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
NUM_CLASSES = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------- allocator
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_malloc(mode: str) -> str:
    """``"steady"``: stop glibc from giving freed activation memory back to the OS after every step.

    With glibc's defaults, large activation buffers are unmapped / trimmed when freed and faulted in
    again at the next step: tens of thousands of minor page faults per step at 64x64 (up to ~10% of
    the step in system time), and how many depends on the allocation history of the whole process,
    so two runners in one process get different, persistent shares of it (measured: either one could
    be 3% slower for a whole run). ``"steady"`` sets ``M_TRIM_THRESHOLD`` = 1 GiB and a fixed
    ``M_MMAP_THRESHOLD`` = 32 MiB (the 64-bit maximum) so freed buffers are reused and every runner
    is timed on its own work. ``"default"`` leaves glibc alone. Returns a description for the report.
    """
    if mode == "default":
        return "glibc defaults"
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    if not ok:
        return "glibc defaults (mallopt failed)"
    return "glibc `mallopt(M_TRIM_THRESHOLD=1 GiB, M_MMAP_THRESHOLD=32 MiB)` in the timing process"


# --------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_rows(threads: int, malloc: str = "") -> list[tuple[str, str]]:
    import timm
    import transformers

    try:
        load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return [
        ("nproc", str(os.cpu_count())),
        ("CPU", cpu_model()),
        ("load average (1/5/15 min) at start", load),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("timm", timm.__version__),
        ("transformers", transformers.__version__),
        ("torch threads (`torch.set_num_threads`)", str(threads)),
    ] + ([("allocator", malloc)] if malloc else [])


def step_bench_parser(description: str, name: str):
    """The arguments every interleaved step benchmark shares (bench_kd_step, bench_hooks)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="short run: one image size, 3 x 6 steps")
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--student", default="resnet10t")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 32 64; quick: 32)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for every runner (default 1: stable when other jobs share the cores)")
    p.add_argument("--out", default=None, help=f"results file name: results/OUT.md (default {name}, {name}_quick with --quick)")
    p.add_argument("--malloc", choices=["steady", "default"], default="steady",
                   help="steady (default): glibc keeps freed buffers (no per-step page-fault churn, see "
                        "_bench_common.tune_malloc); default: glibc as is")
    p.add_argument("--reps", type=int, default=None, help="repetitions per runner (default 7; quick 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repetition (default 20; quick 6)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    p.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    return p


def step_bench_defaults(a, name: str):
    """Fill the shared defaults that depend on --quick."""
    a.out = a.out or (f"{name}_quick" if a.quick else name)
    a.sizes = a.sizes or ([32] if a.quick else [32, 64])
    a.reps = a.reps or (3 if a.quick else 7)
    a.steps = a.steps or (6 if a.quick else 20)
    return a


def prepare_process(args) -> str | None:
    """Process set-up of a timing benchmark: optimizer probe, threads and, in the timing process
    (not a memory child, which keeps glibc's defaults), the allocator mode, which it returns."""
    trainer_optimizer_kwargs()  # before any trainer exists (see its docstring)
    torch.set_num_threads(args.threads)
    return None if args.child else tune_malloc(args.malloc)


def finish_report(md: list[str], ratios, target: float, label: str, t_start: float, out: str) -> None:
    """Append the verdict and the total time, write results/OUT.md and print it."""
    md += ["## Verdict", "", verdict(ratios, target, label), "",
           f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.", ""]
    text = "\n".join(md)
    path = write_result(out, text)
    print(text)
    print(f"\nwritten to {path}")


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, text: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.md")
    with open(path, "w") as fh:
        fh.write(text.rstrip() + "\n")
    return path


# --------------------------------------------------------------------------------------- models / data
def make_models(teacher_name: str, student_name: str, image_size: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(teacher, student): timm models, random init, 10 classes, both declared to take
    ``image_size`` RGB images with ImageNet normalisation (so the teacher's input adapter is identity)."""
    import timm

    from hf_distill.models import InputSpec, set_input_spec

    spec = InputSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=(image_size, image_size), in_chans=3)
    torch.manual_seed(seed)
    teacher = timm.create_model(teacher_name, pretrained=False, num_classes=NUM_CLASSES)
    torch.manual_seed(seed + 1)
    student = timm.create_model(student_name, pretrained=False, num_classes=NUM_CLASSES)
    for m in (teacher, student):
        set_input_spec(m, spec)
    return teacher, student


def make_batches(n: int, batch_size: int, image_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches already collated in memory: ``{"pixel_values": [B,3,S,S], "labels": [B]}``."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g),
            "labels": torch.randint(NUM_CLASSES, (batch_size,), generator=g),
        }
        for _ in range(n)
    ]


def first_of(examples):
    """Collator for a dataset whose items are whole batches (``per_device_train_batch_size=1``)."""
    return examples[0]


class BatchDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items are pre-collated batches (so the Trainer does no collation)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


# --------------------------------------------------------------------------------------- runners
_OPTIMIZER: tuple[type, dict] | None = None


def trainer_optimizer_kwargs() -> tuple[type, dict]:
    """The optimizer class and kwargs the Trainer builds from default arguments (to mirror it by hand).

    Computed once, before any trainer exists: building a new ``TrainingArguments`` later resets
    accelerate's shared state under a live trainer.
    """
    global _OPTIMIZER
    if _OPTIMIZER is None:
        from transformers import Trainer

        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(make_args(tempfile.mkdtemp(prefix="hfd_bench_"), 1e-3, 4.0, 0.9))
        kwargs = dict(kwargs)
        kwargs.pop("lr", None)
        _OPTIMIZER = (cls, kwargs)
    return _OPTIMIZER


def make_args(out_dir: str, lr: float, temperature: float, alpha: float, **kw):
    from hf_distill import DistillationTrainingArguments

    base = dict(
        output_dir=out_dir, use_cpu=True, report_to=[], learning_rate=lr, temperature=temperature, alpha=alpha,
        per_device_train_batch_size=1, save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, data_seed=0, max_steps=10,
    )
    base.update(kw)
    from hf_distill.methods import get_method

    if not get_method(base.get("distill_method", "kd")).uses_alpha:  # refused where the method has no alpha
        base.pop("alpha")
        base.pop("temperature")
    return DistillationTrainingArguments(**base)


class HandKD:
    """The minimal hand-written KD loop the Trainer is compared with.

    Teacher in eval mode under ``torch.no_grad``; loss ``(1-a)*CE + a*T^2*KL(batchmean)``;
    the same optimizer class and kwargs as the Trainer builds (AdamW, same lr, betas, eps, weight
    decay, fused flag); no scheduler, no logging, no clipping unless ``clip`` is given.
    """

    name = "hand"

    def __init__(self, student, teacher, lr, temperature, alpha, opt_cls, opt_kwargs, taps=None, clip=None):
        self.student, self.teacher = student.train(), teacher.eval()
        self.teacher.requires_grad_(False)
        kwargs = dict(opt_kwargs)
        kwargs["lr"] = lr
        self.optimizer = opt_cls(self.student.parameters(), **kwargs)
        self.t, self.a = float(temperature), float(alpha)
        self.taps = taps or []  # FeatureTaps objects popped every step (hook benchmark)
        self.clip = clip  # max grad norm, as the Trainer's default max_grad_norm=1.0 (None: no clipping)
        self.params = [p for p in self.student.parameters() if p.requires_grad]

    def step(self, batch) -> torch.Tensor:
        x, y = batch["pixel_values"], batch["labels"]
        with torch.no_grad():
            zt = self.teacher(x)
        zs = self.student(x)
        for tap in self.taps:
            tap.pop()
        t, a = self.t, self.a
        kl = F.kl_div(F.log_softmax(zs / t, dim=-1), F.log_softmax(zt / t, dim=-1), reduction="batchmean",
                      log_target=True)
        loss = (1.0 - a) * F.cross_entropy(zs, y) + a * t * t * kl
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class TrainerStep:
    """One Trainer optimisation step without ``train()``'s loop around it:
    ``trainer.training_step(model, inputs)`` (forward, teacher, loss, backward; the method's
    hooks included), then ``optimizer.step()`` and ``model.zero_grad()`` as ``_run_epoch`` does.
    Not included: gradient clipping / grad norm, lr scheduler, callbacks, dataloader, logging
    (those are in :func:`run_trainer_train`)."""

    name = "trainer"

    def __init__(self, trainer):
        self.trainer = trainer
        trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
        trainer.current_gradient_accumulation_steps = 1  # set per update step by _run_epoch
        self.model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model

    def step(self, batch) -> torch.Tensor:
        tr = self.trainer
        loss = tr.training_step(self.model, batch)
        tr.optimizer.step()
        self.model.zero_grad()
        return loss

    def flush_logs(self):
        # what Trainer.log does at each logging step; keeps the list of per-step terms short
        self.trainer._term_sums.clear()


def make_trainer(student, teacher, batches, out_dir, lr, temperature, alpha, trainer_cls=None, **kw):
    from hf_distill import DistillationTrainer

    args = make_args(out_dir, lr, temperature, alpha, **kw)
    return (trainer_cls or DistillationTrainer)(model=student, teacher_model=teacher, args=args,
                                                train_dataset=BatchDataset(batches), data_collator=first_of)


# --------------------------------------------------------------------------------------- timing
def time_steps(runner, batches, n: int, start: int = 0) -> float:
    """Seconds per step over ``n`` steps (batches cycled from ``start``); used for warm-up."""
    k = len(batches)
    t0 = time.perf_counter()
    for i in range(n):
        runner.step(batches[(start + i) % k])
    return (time.perf_counter() - t0) / n


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def alternating(runners: dict, batches, reps: int, steps: int, after_rep: Callable | None = None
                ) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of each runner, per repetition, interleaved *step by step*.

    Within a repetition every runner does one step on the same batch, then the next batch, ...
    (order reversed every other step), so all runners see the same machine load at the scale of
    one step; each repetition gives each runner's mean step time over ``steps`` steps.
    Two clocks: ``"wall"`` (``perf_counter``) and ``"cpu"`` (``process_time``: CPU seconds of this
    process, all its threads; much less sensitive to other jobs on the machine than wall time).
    Returns ``{clock: {runner: [seconds per step, one per repetition]}}``.
    """
    names = list(runners)
    out = {c: {n: [] for n in names} for c in CLOCKS}
    k = len(batches)
    wall, cpu = CLOCKS["wall"], CLOCKS["cpu"]
    for rep in range(reps):
        acc = {c: dict.fromkeys(names, 0.0) for c in CLOCKS}
        for i in range(steps):
            batch = batches[(rep * steps + i) % k]
            for name in (names if (rep + i) % 2 == 0 else names[::-1]):
                w0, c0 = wall(), cpu()
                runners[name].step(batch)
                acc["cpu"][name] += cpu() - c0
                acc["wall"][name] += wall() - w0
        for c in CLOCKS:
            for name in names:
                out[c][name].append(acc[c][name] / steps)
        if after_rep is not None:
            after_rep()
    return out


def summarize(times: dict[str, list[float]], base: str) -> dict:
    """Medians, mins and the median of per-repetition ratios to ``base``."""
    res = {}
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(ts, times[base])]
        res[name] = {
            "median_ms": 1e3 * statistics.median(ts),
            "min_ms": 1e3 * min(ts),
            "max_ms": 1e3 * max(ts),
            "ratio_of_medians": statistics.median(ts) / statistics.median(times[base]),
            "median_paired_ratio": statistics.median(ratios),
            "paired_ratios": ratios,
        }
    return res


# --------------------------------------------------------------------------------------- memory
def rss_now_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set size (MiB).

    ``VmHWM`` of ``/proc/self/status`` (the high-water mark of this process's own address space).
    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the maxrss of the pre-``exec`` image
    into the new program, so a child forked from a 1.5 GB benchmark process would report at least
    1.5 GB whatever it does itself. Falls back to ``ru_maxrss`` where ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def child_memory(script: str, child_args: Sequence[str], timeout: float = 600) -> dict:
    """Run ``script --child ...`` in a fresh interpreter; it prints one JSON line (last line)."""
    cmd = [sys.executable, script, *child_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tmpdir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)


def fresh(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def verdict(ratios: dict, target: float, what: str) -> str:
    """One sentence listing each paired-median ratio and whether all meet ``target``."""
    over = [k for k, v in ratios.items() if v > target]
    listing = "; ".join(f"{s}x{s} {m} ({c}): {v:.3f}" for (s, m, c), v in ratios.items())
    return (f"Paired-median ratios {what}: {listing}. "
            + (f"All <= {target}: target met." if not over else
               f"Over the {target} target: " + ", ".join(f"{s}x{s} {m} ({c})" for (s, m, c) in over) + "."))
