"""Issue 24's combinations that need several processes, run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Launched by tests/test_regressions_24.py. Usage: ``regressions_24_worker.py OUT_DIR [PART ...]``. Each part records what
it saw (or its error) in ``OUT_DIR/rank<r>.json``, so one launch serves every test:

* ``sharded_features``: FSDP2-sharded transformers teachers (CLIPModel, SiglipModel, CLIPVisionModel,
  ViTForImageClassification) give the same backbone features as whole ones, and one feature-distillation
  step trains with a sharded CLIPModel teacher;
* ``live_mixing``: live mixup over a whole epoch whose last round accelerate pads (36 images, 2 x 8 a round);
  a mixed cache of that size is refused at construction;
* ``cache_plan``: a cache build where rank 1 looks at the disk only after rank 0 wrote its first shard.
"""

import copy
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from conftest import tiny_spec, tiny_timm  # noqa: E402

from hf_distill import DistillationTrainer, DistillationTrainingArguments, set_input_spec  # noqa: E402
from hf_distill.data import digits_dataset, with_image_transform  # noqa: E402

SPEC = tiny_spec(size=16)


def _tiny(kind):
    import transformers as tr

    common = dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=16, num_channels=1)
    text = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                max_position_embeddings=8)
    torch.manual_seed(0)
    model = {
        "clip_model": lambda: tr.CLIPModel(tr.CLIPConfig(vision_config=common, text_config=text, projection_dim=8)),
        "siglip_model": lambda: tr.SiglipModel(tr.SiglipConfig(vision_config=common, text_config=text)),
        "clip_vision": lambda: tr.CLIPVisionModel(tr.CLIPVisionConfig(**common)),
        "vit_classifier": lambda: tr.ViTForImageClassification(tr.ViTConfig(**common, num_labels=5)),
    }[kind]().eval()
    set_input_spec(model, SPEC)
    return model


def _args(out, **kw):
    base = dict(output_dir=out, per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-2,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                dataloader_num_workers=0, logging_steps=1)
    base.update(kw)
    return DistillationTrainingArguments(**base)


def sharded_features(out_dir, raw):
    from torch.distributed.device_mesh import init_device_mesh

    from hf_distill.models.features import backbone_features
    from hf_distill.teachers.sharding import is_sharded, shard_teacher

    mesh = init_device_mesh("cpu", (2,))
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    result = {}
    for kind in ("clip_model", "siglip_model", "clip_vision", "vit_classifier"):
        try:
            whole = _tiny(kind)
            sharded = shard_teacher(copy.deepcopy(whole), mesh)
            with torch.no_grad():
                want, got = backbone_features(whole, x), backbone_features(sharded, x)
            result[kind] = {"sharded": is_sharded(sharded),
                            "max_diff": max(float((a - b).abs().max()) for a, b in zip(want, got))}
        except Exception:
            result[kind] = {"error": traceback.format_exc()[-1500:]}
    try:  # through the trainer: a sharded CLIPModel teacher, label-free feature distillation
        train = with_image_transform(raw.select(range(32)).remove_columns("label"), SPEC)
        t = DistillationTrainer(model=tiny_timm(seed=1, spec=SPEC), teacher_model=_tiny("clip_model"),
                                train_dataset=train,
                                args=_args(os.path.join(out_dir, "feature"), distill_method="feature",
                                           teacher_sharding="fsdp", max_steps=1, feature_standardize_batches=0))
        t.train()
        result["trainer"] = {"steps": t.state.global_step, "sharded": t.teachers.sharded,
                             "loss": float(t.state.log_history[0]["loss"])}
    except Exception:
        result["trainer"] = {"error": traceback.format_exc()[-1500:]}
    return result


def live_mixing(out_dir, raw):
    from hf_distill.mixing import MixingConfig
    from hf_distill.teacher_cache import build_teacher_cache, with_teacher_cache

    result = {}
    data = raw.select(range(36))
    try:  # 36 images, 2 processes x 8: the epoch's last round (4 images) is padded by accelerate
        seen = []
        t = DistillationTrainer(model=tiny_timm(seed=1, spec=SPEC), teacher_model=tiny_timm(seed=2, spec=SPEC),
                                train_dataset=with_image_transform(data, SPEC),
                                args=_args(os.path.join(out_dir, "mix"), distill_method="function_matching",
                                           num_train_epochs=2))
        import hf_distill.trainer as trainer_module

        real_mix = trainer_module.mix_batch  # the trainer's one call that mixes a batch

        def recording(mixer, inputs, *rest):
            mixed, targets = real_mix(mixer, inputs, *rest)
            seen.append({"positions": inputs["mix_position"].tolist(),
                         "mixed": not torch.equal(mixed, inputs["pixel_values"])})
            return mixed, targets

        trainer_module.mix_batch = recording
        try:
            t.train()
        finally:
            trainer_module.mix_batch = real_mix
        result["live"] = {"steps": t.state.global_step, "batches": seen,
                          "finite": all(torch.isfinite(v).all().item() for v in t.student.state_dict().values()
                                        if v.is_floating_point())}
    except Exception:
        result["live"] = {"error": traceback.format_exc()[-1500:]}
    try:  # a mixed cache of the same size: its padded round cannot be replayed, refused at construction
        cache_dir = os.path.join(out_dir, "mixed_cache")
        build_teacher_cache(tiny_timm(seed=2, spec=SPEC), data, SPEC, cache_dir, batch_size=8,
                            mixing=MixingConfig(mixup_alpha=1.0))
        DistillationTrainer(model=tiny_timm(seed=1, spec=SPEC), train_dataset=with_teacher_cache(data, cache_dir, SPEC),
                            args=_args(os.path.join(out_dir, "mixc"), distill_method="function_matching", max_steps=1,
                                       teacher_cache_dir=cache_dir))
        result["cached"] = {"refused": None}
    except ValueError as err:
        result["cached"] = {"refused": str(err)}
    except Exception:
        result["cached"] = {"error": traceback.format_exc()[-1500:]}
    return result


def cache_plan(out_dir, raw):
    import hf_distill.teacher_cache as tc
    from hf_distill.teacher_cache import build_teacher_cache

    rank = int(os.environ.get("RANK", "0"))
    cache_dir = os.path.join(out_dir, "cache_plan")
    written = []
    modules = [tc] + [getattr(tc, n) for n in ("store", "coordinator", "build") if hasattr(tc, n)]
    originals = {m: m._shard_on_disk for m in modules if hasattr(m, "_shard_on_disk")}
    if rank == 1:  # this process looks at the disk late: only once rank 0 has written its first shard
        def late(real):
            def look(folder, i, span):
                deadline = time.time() + 60
                while not os.path.exists(os.path.join(folder, "shard-00000.arrow")) and time.time() < deadline:
                    time.sleep(0.05)
                return real(folder, i, span)
            return look

        for m, real in originals.items():
            m._shard_on_disk = late(real)
    try:
        cache = build_teacher_cache(tiny_timm(seed=2, spec=SPEC), raw.select(range(64)), SPEC, cache_dir,
                                    batch_size=16, shard_size=16, on_shard_written=written.append)
        return {"written": written, "entries": len(cache)}
    except Exception:
        return {"written": written, "error": traceback.format_exc()[-1500:]}
    finally:
        for m, real in originals.items():
            m._shard_on_disk = real


def main(out_dir: str, only: list[str]) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    raw = digits_dataset()["train"]
    results = {}
    for name, part in (("cache_plan", cache_plan), ("sharded_features", sharded_features),
                       ("live_mixing", live_mixing)):
        if only and name not in only:
            continue
        results[name] = part(out_dir, raw)
        torch.distributed.barrier() if torch.distributed.is_initialized() else None
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])  # optional part names: those alone
