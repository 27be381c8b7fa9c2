"""Step time of the generic model view (hf_distill.models.view) vs today's hand-written split.

    python benchmarks/bench_model_view.py [--reps 7 --steps 4 --image-size 64]

For timm ``resnet18`` and ``vit_tiny_patch16_224`` (built at ``--image-size``), FitNets and BYOT each
run two trainers side by side on the same batches, interleaved step by step (the order reversed every
other step; 1 thread): ``hand`` names the layers the hand-written split of ``hf_distill.models.stages`` gives
(``hint_layers`` = its middle stages, ``byot_exits`` = its stages but the last), ``generic`` passes
``auto`` (stages discovered by ``model_view``). The ratio generic / hand is the median of the
per-repetition ratios of CPU time per step. Target: at most 1.02. Writes
``benchmarks/results/bench_model_view.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    BatchDataset, TrainerStep, alternating, first_of, machine_rows, make_args, make_batches, md_table, summarize,
    tmpdir, write_result,
)


def _model(arch, size, seed):
    import timm

    from hf_distill.models import InputSpec, set_input_spec

    torch.manual_seed(seed)
    kw = {"img_size": size} if "vit" in arch else {}
    m = timm.create_model(arch, pretrained=False, num_classes=10, **kw)
    set_input_spec(m, InputSpec(image_size=(size, size)))
    return m


def _trainer(arch, method, layers, batches, size):
    from hf_distill import DistillationTrainer

    student, teacher = _model(arch, size, 0), _model(arch, size, 1)
    if method == "fitnets":
        kw = dict(distill_method="fitnets", hint_layers=layers, hint_weight=1.0, hint_epochs=0)
    else:
        kw, teacher = dict(distill_method="byot", byot_exits=layers), None
    args = make_args(tmpdir("hfd_view_"), 1e-3, 4.0, 0.9, **kw)
    t = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=BatchDataset(batches),
                            data_collator=first_of)
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    from hf_distill.models.stages import stage_names

    t0 = time.perf_counter()
    batches = make_batches(8, a.batch_size, a.image_size)
    rows, ratios = [], {}
    for arch in ("resnet18", "vit_tiny_patch16_224"):
        hand_stages = stage_names(_model(arch, a.image_size, 0))
        for method in ("fitnets", "byot"):
            if method == "fitnets":
                mid = hand_stages[len(hand_stages) // 2]
                hand_layers = [f"{mid}:{mid}"]
            else:
                hand_layers = hand_stages[:-1]
            runners = {"hand": TrainerStep(_trainer(arch, method, hand_layers, batches, a.image_size)),
                       "generic": TrainerStep(_trainer(arch, method, ["auto"], batches, a.image_size))}
            picked = {}
            for name, r in runners.items():
                m = r.trainer.method
                picked[name] = m.pairs if method == "fitnets" else [*m.exit_layers, m.deepest_layer]
            for r in runners.values():  # warm-up
                for b in batches[:2]:
                    r.step(b)
            times = alternating(runners, batches, a.reps, a.steps)
            s = summarize(times["cpu"], "hand")
            ratio = s["generic"]["median_paired_ratio"]
            ratios[f"{arch} {method}"] = ratio
            rows.append([arch, method, ", ".join(map(str, picked["hand"])),
                         "same" if picked["hand"] == picked["generic"] else ", ".join(map(str, picked["generic"])),
                         f"{s['hand']['median_ms']:.1f}", f"{s['generic']['median_ms']:.1f}", f"{ratio:.3f}",
                         f"{min(s['generic']['paired_ratios']):.3f}-{max(s['generic']['paired_ratios']):.3f}"])
            print(rows[-1], flush=True)
    worst = max(ratios.values())
    md = ["# Generic model view vs hand-written split: step time", "",
          f"`python benchmarks/bench_model_view.py --reps {a.reps} --steps {a.steps} --image-size {a.image_size} "
          f"--batch-size {a.batch_size}`; CPU time per Trainer step (forward, loss, backward, optimizer), "
          "interleaved step by step, median of per-repetition ratios.", "",
          md_table(["model", "method", "hand layers", "generic layers", "hand ms", "generic ms",
                    "generic / hand", "range"], rows), "",
          f"Worst ratio {worst:.3f} (target at most 1.02): "
          + ("met." if worst <= 1.02 else "NOT met."), "",
          md_table(["", ""], machine_rows(1)), "",
          "The machine was shared with other jobs while this ran (2 cores, several agents); CPU time per "
          "process is less sensitive to that than wall time.", "",
          f"Total wall time {time.perf_counter() - t0:.0f} s.", ""]
    path = write_result("bench_model_view", "\n".join(md))
    print("\n".join(md))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
