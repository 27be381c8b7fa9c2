"""KD step time: ``DistillationTrainer`` (``kd``) vs timm's own ``LogitDistillationTask`` loop, like for like,
on several teacher/student pairs across CNN and ViT families; and what compilation buys on CPU.

    python benchmarks/bench_timm_parity.py            # writes results/bench_timm_parity.md (~15 min, 2 cores)
    python benchmarks/bench_timm_parity.py --quick    # smoke run (results/bench_timm_parity_quick.md)

Like for like, per pair: the same random-init timm models (10 classes), the same pre-collated in-memory
batches, the same optimizer (the fused AdamW the Trainer builds, constant lr), the same loss
(``(1 - a) * CE + a * T^2 * KL(batchmean)``, checked equal on the first batch), the same order in a step
(student forward, teacher forward under no_grad, loss, backward, optimizer step, zero_grad) and the same
clipping: none (``max_grad_norm=0``; timm's ``train.py`` clips only with ``--clip-grad``). A third runner is
the Trainer with its default ``max_grad_norm=1.0`` (clip + grad norm every step), to show what that
default costs. Each model keeps its own normalisation (timm's ``pretrained_cfg``): both libraries
re-normalise the batch for the teacher where they differ (ViT 0.5/0.5 vs ImageNet statistics).

Runners alternate by repetition (order rotated), each a full loop over the batches; per repetition the
steady ms/step (first ``--warmup`` steps left out), on three clocks (wall, CPU time of this process, and the
lower quartile of the steps' CPU times, the most robust to other jobs on the machine).
Ratio = hf_distill / timm, paired per repetition, median over repetitions. ``--patched`` adds the Trainer with
the prototype fixes of ``_parity_patches.py`` (what ``results/parity_profile.md`` proposes for the trainer),
``--control`` a second timm loop (the noise floor of the run).

Compiled / eager on CPU (inductor, ``TORCHINDUCTOR_COMPILE_THREADS=1``): the student's training step
(``distill_method="supervised"``, ``torch_compile=True``) and the teacher's inference
(:meth:`hf_distill.teachers.Teachers.compile`), interleaved the same way; compilation happens in the
warm-up and is reported apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import _bench_common as C  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

NAME = "bench_timm_parity"
LR, TEMPERATURE, ALPHA = 1e-3, 4.0, 0.9
PAIRS = [  # (teacher, student, image size)
    ("resnet18", "resnet10t", 64),
    ("convnext_atto", "mobilenetv3_small_100", 64),
    ("vit_small_patch16_224", "vit_tiny_patch16_224", 64),
    ("vit_small_patch16_224", "resnet10t", 64),
    ("resnet18", "vit_tiny_patch16_224", 64),
]
COMPILE_PAIRS = [("resnet18", "resnet10t", 64), ("vit_small_patch16_224", "vit_tiny_patch16_224", 64)]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two pairs, 2 repetitions x 4 steps, no compilation")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=None, help="repetitions per runner (default 5; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repetition (default 10; quick 4)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out at the start of each repetition")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--malloc", choices=["steady", "default"], default="steady")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled / eager part")
    p.add_argument("--compile-only", action="store_true", help="only the compiled / eager part")
    p.add_argument("--compile-pairs", type=int, default=len(COMPILE_PAIRS),
                   help=f"how many of the compiled / eager pairs to run (default all {len(COMPILE_PAIRS)}: CNN, ViT)")
    p.add_argument("--pairs", type=int, nargs="+", default=None, help="indices into PAIRS (default all; quick 0 1)")
    p.add_argument("--patched", nargs="*", default=None,
                   help="also time the Trainer with these prototype fixes of _parity_patches.py (no names: the "
                        "proposed ones)")
    p.add_argument("--control", action="store_true", help="also time a second timm loop (the noise floor)")
    p.add_argument("--no-clip-runner", action="store_true", help="leave out the max_grad_norm=1.0 runner")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.patched is not None and not a.patched:
        from _parity_patches import PROPOSED

        a.patched = list(PROPOSED)
    a.reps = a.reps or (2 if a.quick else 5)
    a.steps = a.steps or (4 if a.quick else 10)
    a.out = a.out or (f"{NAME}_quick" if a.quick else f"{NAME}_compile" if a.compile_only else NAME)
    a.child = None
    return a


class Linear(nn.Module):
    """``"linear"``: flatten + one linear layer, with the attributes timm's task reads. Almost no compute, so a
    step's time is the loop's own machinery (profile_parity.py measures the overhead per step with it)."""

    def __init__(self, size: int):
        super().__init__()
        self.num_classes, self.in_chans = C.NUM_CLASSES, 3
        self.pretrained_cfg = {"mean": C.IMAGENET_MEAN, "std": C.IMAGENET_STD}
        self.fc = nn.Linear(3 * size * size, C.NUM_CLASSES)

    def forward(self, x):
        return self.fc(x.flatten(1))


def make(name: str, size: int, seed: int) -> nn.Module:
    """A timm model, random init, 10 classes, declaring its own normalisation at ``size`` px."""
    import timm

    from hf_distill.models import InputSpec, set_input_spec

    torch.manual_seed(seed)
    if name == "linear":
        model = Linear(size)
        set_input_spec(model, InputSpec(mean=C.IMAGENET_MEAN, std=C.IMAGENET_STD, image_size=(size, size),
                                        in_chans=3))
        return model
    kw = {"img_size": size} if "vit" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=C.NUM_CLASSES, **kw)
    cfg = model.pretrained_cfg
    set_input_spec(model, InputSpec(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), image_size=(size, size),
                                    in_chans=3))
    return model


class StepMarks:
    """A Trainer callback recording both clocks at every step end."""

    def __init__(self):
        from transformers import TrainerCallback

        self.marks: list[tuple[float, float]] = []
        outer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer.marks.append((time.perf_counter(), time.process_time()))

            def on_step_end(self, args, state, control, **kw):
                outer.marks.append((time.perf_counter(), time.process_time()))

        self.callback = _CB()


CLOCKS = ("wall", "cpu", "cpu q1")


def steady(marks, warmup: int) -> dict[str, float]:
    """ms/step per clock over the steps after ``warmup`` (marks[0] is the start): the mean on the wall and
    CPU clocks, and ``cpu q1``, the lower quartile of the steps' CPU times (other jobs on the machine only
    ever add to a step's CPU time, through shared caches and cores, so a low quantile is what moves least
    with the load)."""
    marks = marks[warmup:]
    n = len(marks) - 1
    steps = sorted(b[1] - a[1] for a, b in zip(marks, marks[1:]))
    return {"wall": (marks[-1][0] - marks[0][0]) / n * 1e3, "cpu": (marks[-1][1] - marks[0][1]) / n * 1e3,
            "cpu q1": steps[(n - 1) // 4] * 1e3}


class HF:
    """``trainer.train()`` over the batches; ``pieces``: prototype fixes of _parity_patches (none: the package
    as is)."""

    def __init__(self, teacher, student, batches, out_dir, clip=0.0, method="kd", pieces=(), **kw):
        from _parity_patches import trainer_class

        self.trainer = C.make_trainer(C.fresh(student), C.fresh(teacher) if teacher is not None else None, batches,
                                      out_dir, LR, TEMPERATURE, ALPHA if method != "supervised" else None,
                                      trainer_cls=trainer_class(pieces), max_steps=len(batches), max_grad_norm=clip,
                                      lr_scheduler_type="constant", distill_method=method, logging_steps=10**6, **kw)
        self.clock = StepMarks()
        self.trainer.add_callback(self.clock.callback)
        from transformers.trainer_callback import PrinterCallback

        self.trainer.remove_callback(PrinterCallback)  # no log lines printed between the timed loops

    def first_loss(self, batch) -> float:
        tr = self.trainer
        tr.model.train()
        return float(tr.compute_loss(tr.model, batch).detach())

    def run(self, warmup):
        self.clock.marks = []
        self.trainer.train()
        return steady(self.clock.marks, warmup)


class Timm:
    """timm's task loop: ``out = task(x, y)``, ``out["loss"].backward()``, ``optimizer.step()``, ``zero_grad()``,
    ``loss.item()`` (timm's ``train.py`` reads it every step for its meter)."""

    def __init__(self, teacher, student, batches):
        from timm.task import LogitDistillationTask

        self.task = LogitDistillationTask(C.fresh(student), C.fresh(teacher), criterion=nn.CrossEntropyLoss(),
                                          task_loss_weight=1.0 - ALPHA, distill_loss_weight=ALPHA,
                                          temperature=TEMPERATURE, verbose=False)
        cls, kwargs = C.trainer_optimizer_kwargs()
        self.params = [p for p in self.task.trainable_module.parameters() if p.requires_grad]
        self.optimizer = cls(self.params, **dict(kwargs, lr=LR, weight_decay=0.0))
        self.batches = batches

    def first_loss(self, batch) -> float:
        self.task.train()
        return float(self.task(batch["pixel_values"], batch["labels"])["loss"].detach())

    def run(self, warmup):
        self.task.train()
        marks = [(time.perf_counter(), time.process_time())]
        for b in self.batches:
            out = self.task(b["pixel_values"], b["labels"])
            out["loss"].backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].item()
            marks.append((time.perf_counter(), time.process_time()))
        return steady(marks, warmup)


class TeacherRun:
    """Teacher inference over the batches through hf_distill's ``Teachers`` (eager or compiled)."""

    def __init__(self, teacher, student, batches, compiled):
        from hf_distill.models import input_spec
        from hf_distill.teachers import Teachers

        self.teachers = Teachers([C.fresh(teacher)], input_spec(student))
        if compiled:
            self.teachers.compile(backend="inductor")
        self.batches = batches

    def run(self, warmup):
        marks = [(time.perf_counter(), time.process_time())]
        for b in self.batches:
            self.teachers(b["pixel_values"])
            marks.append((time.perf_counter(), time.process_time()))
        return steady(marks, warmup)


def interleaved(runners: dict, reps: int, warmup: int) -> dict:
    """{clock: {runner: [ms/step per repetition]}}, order rotated every repetition (one untimed round first)."""
    names = list(runners)
    for name in names:
        runners[name].run(warmup)
    out = {c: {n: [] for n in names} for c in CLOCKS}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            res = runners[name].run(warmup)
            for c in res:
                out[c][name].append(res[c])
    return out


def paired(times: dict, a: str, b: str) -> tuple[float, list[float]]:
    ratios = [x / y for x, y in zip(times[a], times[b])]
    return statistics.median(ratios), ratios


def main(argv=None):
    args = parse(argv)
    malloc = C.prepare_process(args)
    out_dir = C.tmpdir("hfd_bench_parity_")
    t_start = time.perf_counter()
    pairs = [PAIRS[i] for i in args.pairs] if args.pairs else PAIRS[:2] if args.quick else PAIRS
    n = args.warmup + args.steps
    md = [f"# {NAME}: DistillationTrainer (kd) vs timm's LogitDistillationTask, like for like", "",
          f"Command: `python benchmarks/{NAME}.py{''.join(' ' + a for a in sys.argv[1:])}`", "",
          C.md_table(["machine", "value"], C.machine_rows(args.threads, malloc)), "",
          f"Batch {args.batch_size}, RGB, random init, 10 classes, fp32, CPU, {args.threads} thread(s); lr {LR} "
          f"constant, T={TEMPERATURE}, alpha={ALPHA}; {args.reps} repetitions x {args.steps} steady steps per runner "
          f"(after {args.warmup} left out), runners alternating by repetition, order rotated. "
          "`hf_distill` = `trainer.train()` with `max_grad_norm=0` (no clipping, as timm's loop); `hf_distill clip "
          "1.0` = the Trainer's default clipping; `timm` = `LogitDistillationTask` loop. Ratios: paired per "
          "repetition, median. Clocks: 'wall'; 'cpu', CPU time of this process (mean over the steady steps); 'cpu q1', "
          "the lower quartile of the steady steps' CPU times in a repetition, which moves least when other jobs "
          "share the machine (they only ever add to a step's time).", ""]
    if args.patched:
        from _parity_patches import PIECES

        md += [f"`hf_distill patched` = the same Trainer with the prototype fixes "
               f"{', '.join('`' + p + '`' for p in args.patched)} of `benchmarks/_parity_patches.py` "
               f"({'; '.join(PIECES[p].__doc__.split('.')[0].strip() for p in args.patched)}), proposed for "
               "`hf_distill/trainer.py` in `results/parity_profile.md`.", ""]
    if args.control:
        md += ["`timm 2` = a second, independent `LogitDistillationTask` loop on fresh copies of the same models: "
               "`timm 2 / timm` is this run's noise floor (two identical loops).", ""]
    rows, ratios = [], {}
    for teacher_name, student_name, size in ([] if args.compile_only else pairs):
        teacher, student = make(teacher_name, size, 0), make(student_name, size, 1)
        batches = C.make_batches(n, args.batch_size, size, seed=3)
        runners = {"hf_distill": HF(teacher, student, batches, out_dir), "timm": Timm(teacher, student, batches)}
        if not args.no_clip_runner:
            runners["hf_distill clip 1.0"] = HF(teacher, student, batches, out_dir, clip=1.0)
        if args.patched:
            runners["hf_distill patched"] = HF(teacher, student, batches, out_dir, pieces=args.patched)
        if args.control:
            runners["timm 2"] = Timm(teacher, student, batches)
        l_hf, l_timm = runners["hf_distill"].first_loss(batches[0]), runners["timm"].first_loss(batches[0])
        assert abs(l_hf - l_timm) <= 1e-5 * max(1.0, abs(l_timm)), (l_hf, l_timm)
        load0 = os.getloadavg()[0]
        times = interleaved(runners, args.reps, args.warmup)
        load = f"{load0:.2f} -> {os.getloadavg()[0]:.2f}"
        pair = f"`{teacher_name}` -> `{student_name}` ({size}px)"
        for clock in CLOCKS:
            t = times[clock]
            r, per = paired(t, "hf_distill", "timm")
            ratios[(pair, clock)] = r
            row = [pair, clock, load, f"{statistics.median(t['hf_distill']):.1f}",
                   f"{statistics.median(t['timm']):.1f}",
                   f"**{r:.3f}**", f"{min(per):.3f}-{max(per):.3f}", " ".join(f"{x:.3f}" for x in per)]
            if not args.no_clip_runner:
                rc, _ = paired(t, "hf_distill clip 1.0", "hf_distill")
                row += [f"{statistics.median(t['hf_distill clip 1.0']):.1f}", f"{rc:.3f}"]
            if args.patched:
                rp, per_p = paired(t, "hf_distill patched", "timm")
                rpu, _ = paired(t, "hf_distill patched", "hf_distill")
                ratios[(pair + " patched", clock)] = rp
                row += [f"{statistics.median(t['hf_distill patched']):.1f}", f"**{rp:.3f}**",
                        f"{min(per_p):.3f}-{max(per_p):.3f}", " ".join(f"{x:.3f}" for x in per_p), f"{rpu:.3f}"]
            if args.control:
                ra, per_a = paired(t, "timm 2", "timm")
                row += [f"{ra:.3f} ({min(per_a):.3f}-{max(per_a):.3f})"]
            rows.append(tuple(row + [f"{abs(l_hf - l_timm):.1e}"]))
        print(rows[-len(CLOCKS):], flush=True)
    headers = ["pair (teacher -> student)", "clock", "load (1 min) start -> end", "hf_distill ms/step", "timm ms/step",
               "hf_distill / timm (paired median)", "spread", "per repetition"]
    if not args.no_clip_runner:
        headers += ["hf_distill clip 1.0 ms/step", "clip 1.0 / no clip"]
    if args.patched:
        headers += ["hf_distill patched ms/step", "patched / timm (paired median)", "spread", "per repetition",
                    "patched / hf_distill"]
    if args.control:
        headers += ["timm 2 / timm (spread)"]
    md += [] if args.compile_only else ["## hf_distill / timm task, per pair", "",
           C.md_table(headers + ["first-batch loss diff"], rows), ""]

    if not (args.quick or args.no_compile):
        crows = []
        for teacher_name, student_name, size in COMPILE_PAIRS[:args.compile_pairs]:
            teacher, student = make(teacher_name, size, 0), make(student_name, size, 1)
            batches = C.make_batches(n, args.batch_size, size, seed=4)
            t0 = time.perf_counter()
            students = {"eager": HF(None, student, batches, out_dir, method="supervised"),
                        "compiled": HF(None, student, batches, out_dir, method="supervised", torch_compile=True)}
            teachers = {"eager": TeacherRun(teacher, student, batches, False),
                        "compiled": TeacherRun(teacher, student, batches, True)}
            for what, runners in (("student training step", students), ("teacher inference", teachers)):
                t0 = time.perf_counter()
                runners["compiled"].run(args.warmup)  # compiles
                first = time.perf_counter() - t0
                times = interleaved(runners, args.reps, args.warmup)
                for clock in ("wall", "cpu"):
                    r, per = paired(times[clock], "compiled", "eager")
                    crows.append((f"`{student_name if what.startswith('student') else teacher_name}` ({size}px)", what,
                                  clock, f"{statistics.median(times[clock]['eager']):.1f}",
                                  f"{statistics.median(times[clock]['compiled']):.1f}", f"**{r:.3f}**",
                                  " ".join(f"{x:.3f}" for x in per), f"{first:.0f}"))
                print(crows[-2:], flush=True)
        md += ["## Compiled / eager on CPU (inductor)", "",
               "Student: `trainer.train()` with `distill_method='supervised'`, `torch_compile=True` vs eager (the "
               "Trainer compiles the student container, forward and backward). Teacher: `Teachers` forward, "
               "`Teachers.compile(backend='inductor')` (what `teacher_compile` does) vs eager. The first compiled "
               "loop (compilation included) is left out of the timing; its wall time is the last column.", "",
               C.md_table(["model", "what", "clock", "eager ms/step", "compiled ms/step", "compiled / eager (paired)",
                           "per repetition", "first compiled loop s"], crows), ""]
    over = [f"{k[0]} ({k[1]})" for k, v in ratios.items() if v > 1.00]
    listing = "; ".join(f"{pair} ({clock}): {v:.3f}" for (pair, clock), v in ratios.items())
    if ratios:
        md += ["## Verdict", "", f"hf_distill / timm task (paired medians): {listing}. "
               + ("All <= 1.00: goal met." if not over else "Over the 1.00 goal: " + ", ".join(over) + "."), ""]
    md += [f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.", ""]
    print(f"written to {C.write_result(args.out, chr(10).join(md))}")


if __name__ == "__main__":
    main()
