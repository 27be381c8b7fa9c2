"""Run a few distillation steps for KD, FitNets and BYOT; rank 0 saves the final weights.

Launched by tests/test_distributed.py, either alone (one process) or under
``torchrun --nproc_per_node 2`` (two gloo processes on CPU). Usage:
``ddp_worker.py OUT.pt PER_DEVICE_BATCH GRAD_ACCUM``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from conftest import tiny_spec, tiny_timm  # noqa: E402

from hf_distill import DistillationTrainer, DistillationTrainingArguments  # noqa: E402
from hf_distill.data import collate_images, digits_dataset, with_image_transform  # noqa: E402
from hf_distill.teachers.sharding import local_parameter_count  # noqa: E402

METHODS = {  # run name -> arguments
    "kd": {"distill_method": "kd"},
    "fitnets": {"distill_method": "fitnets", "hint_layers": ["layer1:layer2"], "hint_epochs": 0.0, "hint_weight": 1.0},
    # stage 1 only: the student stops after layer1 inside the DDP-wrapped forward
    "fitnets_stage1": {"distill_method": "fitnets", "hint_layers": ["layer1:layer2"], "hint_epochs": 100.0},
    "byot": {"distill_method": "byot"},
    # label-free feature distillation; standardisation off: its warm-up counts batches, which differ between
    # 2 processes (one global batch per step) and the 1-process reference (2 micro-batches per step)
    "feature": {"distill_method": "feature", "feature_standardize_batches": 0},
    # the same KD with the teacher sharded over the processes (FSDP2): it must train the student identically
    "kd_sharded": {"distill_method": "kd", "teacher_sharding": "fsdp"},
    # KD reading the training data as a stream of 4 shards: each process must read its own shards
    "kd_stream": {"distill_method": "kd"},
}


def _fingerprints(batches) -> list[float]:
    return [round(float(b["pixel_values"].double().sum()), 4) for b in batches]


def main(out_path: str, batch: int, accum: int) -> None:
    torch.set_num_threads(1)
    spec = tiny_spec(size=32)
    ds = digits_dataset()
    train = with_image_transform(ds["train"].select(range(96)), spec)
    evaluation = with_image_transform(ds["test"].select(range(37)), spec)  # odd size: no padding duplicates
    # the same 96 images as a stream of 4 shards (datasets IterableDataset), and its batches as each process
    # should read them: this process's share of the shards, in order
    stream = ds["train"].select(range(96)).to_iterable_dataset(num_shards=4)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    own = with_image_transform(stream.shard(num_shards=world, index=rank) if world > 1 else stream, spec)
    own_batches = [collate_images(list(b)) for b in zip(*[iter(own)] * batch)][: 3 * accum]
    results = {}
    for method, extra in METHODS.items():
        args = DistillationTrainingArguments(
            output_dir=os.path.join(os.path.dirname(out_path), f"run_{method}"),
            per_device_train_batch_size=batch, gradient_accumulation_steps=accum, per_device_eval_batch_size=8,
            max_steps=3, learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", report_to=[],
            use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, logging_steps=1,
            **extra,
        )
        teacher = None if extra["distill_method"] == "byot" else tiny_timm("resnet18", seed=2, spec=spec)
        teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher is not None else {}
        student = tiny_timm(seed=1, spec=spec)
        seen = []  # a fingerprint of each training batch this process's student saw
        student.conv1.register_forward_pre_hook(  # the first layer: feature methods call forward_features
            lambda m, a: seen.append(round(float(a[0].double().sum()), 4)) if m.training else None)
        data = with_image_transform(stream, spec) if method == "kd_stream" else train
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=data, eval_dataset=evaluation)
        trainer.train()
        metrics = trainer.evaluate()
        trainer.save_model()
        wrapped = trainer.accelerator.unwrap_model(trainer.model)
        # the same weights evaluated in this one process over the whole eval set, as a reference
        full = collate_images([evaluation[i] for i in range(len(evaluation))])
        local_accuracy = None
        if extra["distill_method"] == "feature":  # the mean cosine to the teacher, computed here on everything
            from hf_distill.methods import StepOutputs

            with torch.no_grad():
                out = wrapped.eval()(pixel_values=full["pixel_values"])
                step = StepOutputs(student_logits=None, labels=None, extra_outputs=out["extra"],
                                   teacher_features=trainer.teacher_feature_maps(full["pixel_values"]))
                values = trainer.method.evaluate(step)
            local_accuracy = float(values["feature_cosine"].mean())
        else:
            with torch.no_grad():
                preds = wrapped.eval()(pixel_values=full["pixel_values"])["logits"].argmax(-1)
            local_accuracy = (preds == full["labels"]).float().mean().item()
        results[method] = {
            "params": {k: v.detach().clone() for k, v in wrapped.named_parameters()},
            "metrics": {k: v for k, v in metrics.items() if k.endswith(("accuracy", "feature_cosine"))},
            "local_accuracy": local_accuracy,
            "eval_samples": len(evaluation),
            "world": trainer.accelerator.num_processes,
            "wrapped": type(trainer.model_wrapped).__name__,
            # what the data-parallel wrapper synchronises, and the teacher, which must not be part of it
            "synced_params": {id(p) for p in trainer.model_wrapped.parameters()},
            "teacher_param_ids": {id(p) for p in trainer.teachers.parameters()},
            "teacher_unchanged": all(torch.equal(teacher_before[k], v.full_tensor() if hasattr(v, "full_tensor") else v)
                                     for k, v in teacher.state_dict().items()) if teacher is not None else True,
            "seen": seen,
            "steps": trainer.state.global_step,
            "own_stream_batches": _fingerprints(own_batches),
            "teacher_params": sum(p.numel() for p in trainer.teachers.parameters()),
            "teacher_local_params": local_parameter_count(trainer.teachers) if teacher is not None else 0,
        }
    for r in results.values():  # ids are only meaningful inside this process
        r["teacher_synced"] = bool(r.pop("synced_params") & r.pop("teacher_param_ids"))
    rank = int(os.environ.get("RANK", "0"))
    torch.save(results, out_path if rank == 0 else f"{out_path}.rank{rank}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
