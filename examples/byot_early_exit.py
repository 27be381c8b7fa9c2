"""Early-exit sweep for a Be-Your-Own-Teacher model: accuracy against average compute.

    python examples/byot_early_exit.py [--model OUT_DIR_OF_BYOT_RUN] [--out early_exit.png]

Without --model it first trains a BYOT student (timm resnet10t, digits, 32x32 grey) and exports
it with its exits. For each confidence threshold it reports accuracy, the share of samples
leaving at each exit, measured time per image, and average FLOPs per image (counted with
torch.utils.flop_counter per stem / stage / exit / head, so the average reflects where each
sample stopped); the numbers are also written next to the plot (.json). Needs matplotlib (pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_distill import DistillationTrainer, DistillationTrainingArguments, InputSpec, load_model, set_input_spec
from hf_distill.data import collate_images, digits_dataset, with_image_transform
from hf_distill.models.exits import MultiExitModel

SPEC = InputSpec(mean=(0.5,), std=(0.5,), image_size=(32, 32), in_chans=1)


def train_byot(out: str, epochs: int) -> None:
    data = digits_dataset()
    student = load_model("resnet10t", num_labels=10, pretrained=False, in_chans=1)
    set_input_spec(student, SPEC)
    args = DistillationTrainingArguments(
        output_dir=out, distill_method="byot", byot_export_exits=True, num_train_epochs=epochs,
        per_device_train_batch_size=32, learning_rate=2e-3, lr_scheduler_type="cosine", report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no")
    trainer = DistillationTrainer(model=student, args=args, train_dataset=with_image_transform(data["train"], SPEC),
                                  eval_dataset=with_image_transform(data["test"], SPEC))
    trainer.train()
    print({k: round(v, 4) for k, v in trainer.evaluate().items() if k.endswith("accuracy")})
    trainer.save_model()


def flops(fn, *args) -> float:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return counter.get_total_flops(), out


def piece_costs(model: MultiExitModel, x1: torch.Tensor) -> tuple[list[float], list[float], float]:
    """FLOPs for one image: cumulative backbone cost at each stage, each exit head, the final head."""
    staged = model.staged
    cost, h = flops(staged.stem, x1)
    cumulative, exits = [], []
    for i in range(len(staged)):
        c, h = flops(staged.run_stage, i, h)
        cost += c
        cumulative.append(cost)
        if i < len(model.exits):
            exits.append(flops(model.exits[i], h)[0])
    head = flops(staged.head, h)[0]
    return cumulative, exits, head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="folder saved with byot_export_exits=True")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default="early_exit.png", help="plot; the numbers go to the same name with .json")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per threshold (median)")
    a = parser.parse_args()
    torch.set_num_threads(1)
    folder = a.model or "outputs/byot_early_exit"
    if a.model is None:
        train_byot(folder, a.epochs)
    model = MultiExitModel.from_pretrained(folder)
    test = with_image_transform(digits_dataset()["test"], SPEC)
    batch = collate_images([test[i] for i in range(len(test))])
    x, y = batch["pixel_values"], batch["labels"]
    cumulative, exit_costs, head_cost = piece_costs(model, x[:1])
    # cost of a sample that leaves at exit i: backbone up to stage i + every exit head it passed
    leave_cost = [cumulative[i] + sum(exit_costs[: i + 1]) for i in range(len(exit_costs))]
    leave_cost.append(cumulative[-1] + sum(exit_costs) + head_cost)
    deepest_cost = cumulative[-1] + head_cost

    rows = []
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, None):
        times = []
        for _ in range(a.repeats):  # median of a few timed passes over the test set
            start = time.perf_counter()
            if threshold is None:
                logits, used = model(x), torch.full((len(y),), len(exit_costs))
            else:
                logits, used = model(x, early_exit_threshold=threshold)
            times.append(time.perf_counter() - start)
        ms = sorted(times)[len(times) // 2] * 1000 / len(y)
        avg = (sum(leave_cost[i] * (used == i).sum().item() for i in range(len(leave_cost))) / len(y)
               if threshold is not None else deepest_cost)
        rows.append({"threshold": threshold if threshold is not None else "plain",
                     "accuracy": (logits.argmax(-1) == y).float().mean().item(), "ms_per_image": ms,
                     "mflops_per_image": avg / 1e6,
                     "exit_share": [round((used == i).float().mean().item(), 3) for i in range(len(leave_cost))]})
    ensemble_acc = (model(x, mode="ensemble").argmax(-1) == y).float().mean().item()
    print(json.dumps(rows, indent=1))
    print(f"ensemble accuracy: {ensemble_acc:.4f}; plain student: {deepest_cost / 1e6:.2f} MFLOPs/image")
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"model": folder, "rows": rows, "ensemble_accuracy": ensemble_acc,
                   "test_images": len(y), "torch_threads": torch.get_num_threads()}, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "mflops_per_image", "average MFLOPs / image"),
                           (axes[1], "ms_per_image", "measured ms / image (CPU, 1 thread)")):
        ax.plot([r[key] for r in rows[:-1]], [r["accuracy"] for r in rows[:-1]], "o-", label="early exit")
        ax.plot([rows[-1][key]], [rows[-1]["accuracy"]], "s", label="plain student (deepest)")
        for r in rows[:-1]:
            ax.annotate(str(r["threshold"]), (r[key], r["accuracy"]), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.legend()
    fig.suptitle("BYOT early exit on digits (thresholds annotated)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"plot saved to {a.out}")


if __name__ == "__main__":
    main()
