"""Hook overhead: a KD step with FitNets-style feature taps registered (features popped every step,
never used) vs the same KD step without taps.

    python benchmarks/bench_hooks.py            # full run, writes results/bench_hooks.md
    python benchmarks/bench_hooks.py --quick    # short smoke run

The taps go through the trainer's real code path: a KD method (registered under a benchmark-only
name) whose ``student_layers()`` / ``teacher_layers()`` return the tapped layers, so
``DistillationModel`` puts ``FeatureTaps`` on the student and ``Teachers`` puts detached taps on
the teacher, both popped every step; its loss is plain KD (identical to ``distill_method="kd"``).
The same is measured on the hand-written KD loop (``FeatureTaps`` on student and teacher, popped
every step) to isolate the cost of the hooks themselves.

Per step: ``trainer.training_step`` + ``optimizer.step()`` + ``model.zero_grad()`` (see
``bench_kd_step.py``). All four runners interleaved step by step (each does one step on the
same batch, order reversed every step), medians and per-repetition ratios, wall and CPU clocks.
Target: with taps / without <= 1.03. Default one torch thread and a steady glibc allocator (see
``bench_kd_step.py`` and ``_bench_common.tune_malloc``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as C  # noqa: E402
import torch  # noqa: E402

from hf_distill.methods import METHODS  # noqa: E402
from hf_distill.methods.kd import KnowledgeDistillation  # noqa: E402
from hf_distill.models.taps import FeatureTaps  # noqa: E402

NAME = "bench_hooks"
LR, TEMPERATURE, ALPHA = 1e-3, 4.0, 0.9
STUDENT_LAYERS: list[str] = []
TEACHER_LAYERS: list[str] = []
SEEN: dict[str, set] = {}


class KDWithTaps(KnowledgeDistillation):
    """KD whose student/teacher layers are tapped; the features reach the loss and are ignored."""

    name = "kd_with_unused_taps_bench"

    def student_layers(self):
        return list(STUDENT_LAYERS)

    def teacher_layers(self):
        return list(TEACHER_LAYERS)

    def loss(self, out):
        if "student" not in SEEN:  # record once that the features really arrived
            SEEN["student"], SEEN["teacher"] = set(out.student_features), set(out.teacher_features)
        return super().loss(out)


METHODS[KDWithTaps.name] = KDWithTaps


def parse(argv=None):
    p = C.step_bench_parser(__doc__.split("\n\n")[0], NAME)
    p.add_argument("--student-layers", nargs="+", default=["layer2", "layer3"])
    p.add_argument("--teacher-layers", nargs="+", default=["layer2", "layer3"])
    p.add_argument("--hand-sizes", type=int, nargs="+", default=None,
                   help="image sizes for the hand-loop pair too (default: the first of --sizes)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--child", choices=["trainer", "trainer_taps"], help=argparse.SUPPRESS)
    a = C.step_bench_defaults(p.parse_args(argv), NAME)
    a.hand_sizes = a.hand_sizes or a.sizes[:1]
    return a


def runners(args, size, out_dir, batches, hand_too=True):
    teacher, student = C.make_models(args.teacher, args.student, size)
    opt_cls, opt_kwargs = C.trainer_optimizer_kwargs()

    def trainer(method):
        tr = C.make_trainer(C.fresh(student), C.fresh(teacher), batches, out_dir, LR, TEMPERATURE, ALPHA,
                            distill_method=method)
        return C.TrainerStep(tr)

    def hand(taps):
        h = C.HandKD(C.fresh(student), C.fresh(teacher), LR, TEMPERATURE, ALPHA, opt_cls, opt_kwargs)
        if taps:
            h.taps = [FeatureTaps(h.student, args.student_layers),
                      FeatureTaps(h.teacher, args.teacher_layers, detach=True)]
        return h

    rs = {"trainer": trainer("kd"), "trainer + taps": trainer(KDWithTaps.name)}
    if hand_too:
        rs.update({"hand": hand(False), "hand + taps": hand(True)})
    return rs


def check_same_loss(args, size, out_dir):
    batches = C.make_batches(2, args.batch_size, size, seed=7)
    rs = runners(args, size, out_dir, batches)
    losses = {k: [float(r.step(b)) for b in batches] for k, r in rs.items()}
    return losses


def child(args):
    size, n = args.child_size, args.steps + args.warmup
    out_dir = C.tmpdir("hfd_bench_hooks_mem_")
    batches = C.make_batches(n, args.batch_size, size, seed=4)
    teacher, student = C.make_models(args.teacher, args.student, size)
    method = "kd" if args.child == "trainer" else KDWithTaps.name
    r = C.TrainerStep(C.make_trainer(student, teacher, batches, out_dir, LR, TEMPERATURE, ALPHA, distill_method=method))
    del teacher, student
    before = C.rss_now_mb()
    for b in batches:
        r.step(b)
    print(C.json.dumps({"rss_before_mb": before, "peak_mb": C.peak_rss_mb()}))


def main(argv=None):
    args = parse(argv)
    STUDENT_LAYERS[:] = args.student_layers
    TEACHER_LAYERS[:] = args.teacher_layers
    malloc = C.prepare_process(args)
    if args.child:
        return child(args)
    t_start = time.perf_counter()
    out_dir = C.tmpdir("hfd_bench_hooks_")
    md = [f"# {NAME}: KD step with unused FitNets-style feature taps vs without", "",
          f"Command: `python benchmarks/{NAME}.py{''.join(' ' + a for a in sys.argv[1:])}`", "",
          C.md_table(["machine", "value"], C.machine_rows(args.threads, malloc)), "",
          f"Models: teacher `{args.teacher}` -> student `{args.student}` (timm, pretrained=False, 10 classes), "
          f"batch {args.batch_size}, RGB, fp32, CPU, lr {LR}, T={TEMPERATURE}, alpha={ALPHA}. Taps: student "
          f"{args.student_layers}, teacher {args.teacher_layers} (teacher taps detached, as the trainer does). "
          f"Step = `training_step` + `optimizer.step()` + `zero_grad()` (trainer) or one hand-loop step. "
          f"{args.reps} repetitions x {args.steps} steps per runner, the four runners alternating step by step "
          f"(order reversed every step), after {args.warmup} warm-up steps; "
          "'paired' = median over repetitions of the per-repetition ratio. Clocks: 'wall' = `time.perf_counter`; "
          "'cpu' = `time.process_time` (CPU time of this process), far less sensitive to other jobs sharing the "
          "cores, so the 'cpu' ratio is the one to trust on a busy machine.", ""]
    check_rows, time_rows, mem_rows, ratios = [], [], [], {}
    for size in args.sizes:
        losses = check_same_loss(args, size, out_dir)
        same = losses["trainer"] == losses["trainer + taps"] and losses["hand"] == losses["hand + taps"]
        check_rows.append((f"{size}x{size}", *(" / ".join(f"{v:.6f}" for v in losses[k]) for k in losses),
                           "yes" if same else "**NO**"))
        print(f"[{size}] losses {losses}; features seen by the method: {SEEN}", flush=True)

        batches = C.make_batches(8, args.batch_size, size, seed=1)
        rs = runners(args, size, out_dir, batches, hand_too=size in args.hand_sizes)
        for r in rs.values():
            C.time_steps(r, batches, args.warmup)

        times = C.alternating(rs, batches, args.reps, args.steps,
                              after_rep=lambda: [r.flush_logs() for r in rs.values() if hasattr(r, "flush_logs")])
        for base, tapped in (("trainer", "trainer + taps"), ("hand", "hand + taps")):
            if base not in rs:
                continue
            for clock in C.CLOCKS:
                t = times[clock]
                s = C.summarize({base: t[base], tapped: t[tapped]}, base)
                ratios[(size, base, clock)] = s[tapped]["median_paired_ratio"]
                time_rows.append((f"{size}x{size}", base, clock, f"{s[base]['median_ms']:.1f}",
                                  f"{s[tapped]['median_ms']:.1f}", f"{s[tapped]['ratio_of_medians']:.3f}",
                                  f"**{s[tapped]['median_paired_ratio']:.3f}**",
                                  f"{s[base]['min_ms']:.1f} / {s[tapped]['min_ms']:.1f}",
                                  " ".join(f"{r:.3f}" for r in s[tapped]["paired_ratios"])))
                print(f"[{size}] {base} {clock}: {s}", flush=True)
        del rs

        if not args.no_memory:
            mem = {}
            for which in ("trainer", "trainer_taps"):
                child_args = ["--child", which, "--child-size", str(size), "--threads", str(args.threads),
                              "--teacher", args.teacher, "--student", args.student, "--batch-size",
                              str(args.batch_size), "--steps", str(min(args.steps, 5)), "--warmup", str(args.warmup),
                              "--student-layers", *args.student_layers, "--teacher-layers", *args.teacher_layers]
                mem[which] = C.child_memory(os.path.abspath(__file__), child_args)
                print(f"[{size}] memory {which}: {mem[which]}", flush=True)
            for which, m in mem.items():
                mem_rows.append((f"{size}x{size}", which.replace("_", " + "), f"{m['peak_mb']:.0f}",
                                 f"{m['rss_before_mb']:.0f}", f"{m['peak_mb'] - m['rss_before_mb']:.0f}",
                                 f"{m['peak_mb'] / mem['trainer']['peak_mb']:.3f}"))

    md += ["## Taps change nothing in the loss", "",
           f"First two losses (one optimizer step apart) from the same initial weights. Features that reached the "
           f"method's loss with taps: student {sorted(SEEN.get('student', []))}, teacher "
           f"{sorted(SEEN.get('teacher', []))}.", "",
           C.md_table(["image", "trainer", "trainer + taps", "hand", "hand + taps", "identical"], check_rows), ""]
    md += ["## Time per step", "",
           C.md_table(["image", "loop", "clock", "no taps ms/step (median)", "taps ms/step (median)", "ratio of medians",
                       "ratio (paired median)", "min ms no taps / taps", "per-repetition ratios"], time_rows), ""]
    if mem_rows:
        md += ["## Peak memory (fresh process per configuration, `VmHWM`)", "",
               f"{min(args.steps, 5) + args.warmup} trainer steps each; 'before' = RSS just before the first step; "
               "glibc allocator defaults in these processes.", "",
               C.md_table(["image", "configuration", "peak RSS MiB", "RSS before steps MiB", "peak - before MiB",
                           "peak / no-taps peak"], mem_rows), ""]
    C.finish_report(md, ratios, 1.03, "with taps / without", t_start, args.out)


if __name__ == "__main__":
    main()
