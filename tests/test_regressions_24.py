"""Regression tests for issue 24: capabilities that broke where they met (one test per combination)."""

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_spec, tiny_timm

from hf_distill import DistillationTrainer, set_input_spec
from hf_distill.data import collate_images, with_image_transform

SPEC = tiny_spec(size=16)


@pytest.fixture(scope="module")
def unlabelled(digits):
    return with_image_transform(digits["train"].select(range(48)).remove_columns("label"), SPEC)


def _classifier_student(seed=1):
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)  # a classifier, trained on features
    set_input_spec(model, SPEC)
    return model


def _cnn_teacher(seed=3):
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=0, in_chans=1)
    set_input_spec(model, SPEC)
    return model


class _Stop:
    def __new__(cls, at):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if at and state.global_step == at:
                    control.should_training_stop = True

        return Stop()


# --- 1: checkpoints hold what resumes training, save_model() exports what the user ships ----------------------
def test_feature_distillation_of_a_classifier_resumes_and_loads_its_best_checkpoint(unlabelled, make_args, tmp_path):
    from hf_distill import load_model

    def run(out, stop=None, resume=None, **kw):
        args = make_args(distill_method="feature", max_steps=4, save_strategy="steps", save_steps=2,
                         per_device_train_batch_size=8, per_device_eval_batch_size=48,
                         output_dir=str(out), feature_standardize_batches=0, lr_scheduler_type="constant", **kw)
        t = DistillationTrainer(model=_classifier_student(), teacher_model=_cnn_teacher(), args=args,
                                train_dataset=unlabelled, eval_dataset=unlabelled if kw else None)
        t.add_callback(_Stop(stop))
        t.train(resume_from_checkpoint=resume)
        return t

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop=2)
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # the export is still the backbone alone
    resumed.save_model()
    assert load_model(str(tmp_path / "cut"), backbone=True).num_classes == 0

    best = run(tmp_path / "best", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
               metric_for_best_model="feature_cosine", greater_is_better=True)
    import safetensors.torch

    stored = safetensors.torch.load_file(f"{best.state.best_model_checkpoint}/model.safetensors")
    assert {k: v for k, v in best.student.state_dict().items() if "num_batches" not in k}.keys() <= stored.keys()
    for k, v in stored.items():
        assert torch.equal(best.student.state_dict()[k], v), k


# --- 5: a DeiT student without a label term: the class head learns the teacher too ---------------------------
def _timm_deit(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=16, patch_size=4,
                              embed_dim=16, depth=1, num_heads=2, num_classes=10, in_chans=1)
    set_input_spec(model, SPEC)
    return model


@pytest.mark.parametrize("method", ["function_matching", "dist"])
def test_deit_student_without_label_term_trains_both_heads_on_the_teacher(method, digits, make_args):
    from hf_distill.losses import dist_terms, kd_loss

    train = with_image_transform(digits["train"].select(range(16)), SPEC)
    student, teacher = _timm_deit(), tiny_timm(seed=2, spec=SPEC)
    kw = {"dist_ce_weight": 0.0} if method == "dist" else {}
    t = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                            args=make_args(distill_method=method, mixup_alpha=0.0, **kw))
    batch = collate_images([train[i] for i in range(8)])
    t.model.train()
    t.model.zero_grad()
    loss = t.compute_loss(t.model, batch)
    loss.backward()
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0
    with torch.no_grad():  # by hand: the mean of the teacher term on each head
        cls, dist = t.model._heads(batch["pixel_values"])
        z_t = teacher(batch["pixel_values"])
        a = t.args
        if method == "dist":
            def one(z):
                inter, intra = dist_terms(z, z_t, a.temperature)
                return a.dist_weight * (a.dist_beta * inter + a.dist_gamma * intra)
        else:
            def one(z):
                return kd_loss(z, z_t, None, a.temperature, 1.0)[0]
        want = 0.5 * (one(cls) + one(dist))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


# --- 6: mixing with persistent dataloader workers is refused ---------------------------------------------------
def test_mixing_with_persistent_workers_is_refused_in_one_line(digits, make_args):
    train = with_image_transform(digits["train"].select(range(16)), SPEC)
    with pytest.raises(ValueError, match="dataloader_persistent_workers") as err:
        DistillationTrainer(model=tiny_timm(spec=SPEC), teacher_model=tiny_timm(seed=2, spec=SPEC),
                            train_dataset=train, args=make_args(mixup_alpha=1.0, dataloader_num_workers=1,
                                                                dataloader_persistent_workers=True))
    assert "\n" not in str(err.value)


# --- 10: a dataset carrying cached teacher outputs must be named as the cache ---------------------------------
def test_a_cache_backed_dataset_without_teacher_cache_dir_is_checked_as_the_cache(digits, make_args, tmp_path):
    from hf_distill.teacher_cache import TeacherCacheError, build_teacher_cache, with_teacher_cache

    spec = tiny_spec()
    raw = digits["train"].select(range(16))
    build_teacher_cache(tiny_timm(seed=2, spec=spec), raw, spec, tmp_path / "c", batch_size=16)
    train = with_teacher_cache(raw, tmp_path / "c", spec)
    # the dataset names its cache: it is checked, so another teacher (seed 5) is refused, not silently replaced
    for extra in ({}, {"teacher_cache_dir": str(tmp_path / "c")}):
        with pytest.raises(TeacherCacheError, match="fingerprint of the teacher weights"):
            DistillationTrainer(model=tiny_timm(spec=spec), teacher_model=tiny_timm(seed=5, spec=spec),
                                train_dataset=train, args=make_args(**extra))
    # without a teacher the cache is the teacher (the README's recipe)
    trainer = DistillationTrainer(model=tiny_timm(spec=spec), train_dataset=train, args=make_args())
    assert trainer.teacher_cache is not None and trainer.args.teacher_cache_dir == str(tmp_path / "c")


# --- 11: a search trial that turns mixing on reads the data as __init__ would --------------------------------
def test_a_search_trial_that_turns_mixing_on_trains_on_mixed_batches(digits, tmp_path):
    optuna = pytest.importorskip("optuna")
    from transformers import TrainerCallback

    from hf_distill import DistillationTrainingArguments
    from hf_distill.mixing import EpochOrderedDataset

    spec = tiny_spec()
    train = with_image_transform(digits["train"].select(range(32)), spec)
    evaluation = with_image_transform(digits["test"].select(range(16)), spec)
    args = DistillationTrainingArguments(
        output_dir=str(tmp_path / "s"), per_device_train_batch_size=8, per_device_eval_batch_size=16, max_steps=2,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = DistillationTrainer(model_init=lambda: tiny_timm(spec=spec), teacher_model=tiny_timm(seed=2, spec=spec),
                                  args=args, train_dataset=train, eval_dataset=evaluation)
    seen = []

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            seen.append((args.mixup_alpha, type(trainer.train_dataset).__name__, trainer.mixer is not None))

    trainer.add_callback(Seen())
    grid = {"mixup_alpha": [0.0, 1.0]}
    trainer.hyperparameter_search(hp_space=grid, n_trials=2, backend="optuna",
                                  sampler=optuna.samplers.GridSampler(grid))
    assert sorted(seen) == [(0.0, "Dataset", False), (1.0, EpochOrderedDataset.__name__, True)]
    assert len(trainer.search_trials) == 2


# --- 15: the evaluation's teacher logits are cached per example, not per batch index ---------------------------
def test_evaluating_again_with_another_batch_size_reuses_each_examples_teacher_logits(digits, make_args):
    spec = tiny_spec()
    evaluation = with_image_transform(digits["test"].select(range(20)), spec)
    teacher = tiny_timm(seed=2, spec=spec)
    t = DistillationTrainer(model=tiny_timm(spec=spec), teacher_model=teacher, eval_dataset=evaluation,
                            args=make_args(per_device_eval_batch_size=16))
    ran = []
    t.teachers.models[0].register_forward_hook(lambda m, a, out: ran.append(out.shape[0]))
    first = t.evaluate()
    assert sum(ran) == 20
    t.args.per_device_eval_batch_size = 6
    second = t.evaluate()
    assert sum(ran) == 20  # every example's logits were known: the teacher did not run again
    batch = collate_images([evaluation[i] for i in range(20)])
    with torch.no_grad():
        want = (teacher.eval()(batch["pixel_values"]).argmax(-1) == batch["labels"]).float().mean().item()
    for m in (first, second):
        assert m["eval_teacher_accuracy"] == pytest.approx(want)
    assert second["eval_teacher_kl"] == pytest.approx(first["eval_teacher_kl"], rel=1e-5)


# --- 4: epoch-based schedules on a stream are measured in the stream's own epochs ------------------------------
def _stream(digits, rows, known):
    from datasets import NamedSplit, SplitDict, SplitInfo

    stream = digits["train"].select(range(rows)).to_iterable_dataset(num_shards=2)
    if known:  # what load_dataset(..., streaming=True) gives: the split and its number of examples
        stream.info.splits = SplitDict({"train": SplitInfo(name="train", num_examples=rows)})
        stream._split = NamedSplit("train")
    return with_image_transform(stream, tiny_spec())


def test_dkd_warmup_on_a_stream_counts_the_streams_epochs(digits, make_args):
    spec = tiny_spec()
    t = DistillationTrainer(model=tiny_timm(spec=spec), teacher_model=tiny_timm(seed=2, spec=spec),
                            train_dataset=_stream(digits, 48, known=True),
                            args=make_args(distill_method="dkd", dkd_warmup_epochs=1.0, max_steps=4, logging_steps=1))
    t.train()
    ramps = [h["dkd_ramp"] for h in t.state.log_history if "dkd_ramp" in h]
    assert ramps == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])  # 48 rows / 16 a batch: 3 steps an epoch
    with pytest.raises(ValueError, match="dkd_warmup_epochs counts epochs") as err:
        DistillationTrainer(model=tiny_timm(spec=spec), teacher_model=tiny_timm(seed=2, spec=spec),
                            train_dataset=_stream(digits, 48, known=False), args=make_args(distill_method="dkd"))
    assert "\n" not in str(err.value)


# --- 9: building a cache leaves the caller's teacher as it was -------------------------------------------------
def test_building_a_cache_in_another_dtype_leaves_the_callers_teacher_as_it_was(digits, make_args, tmp_path):
    from hf_distill.teacher_cache import build_teacher_cache, teacher_fingerprint, with_teacher_cache

    spec = tiny_spec()
    raw = digits["train"].select(range(16))
    teacher = tiny_timm(seed=2, spec=spec).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    fingerprint = teacher_fingerprint(teacher)
    cache = build_teacher_cache(teacher, raw, spec, tmp_path / "c", batch_size=16, dtype=torch.bfloat16)
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in teacher.state_dict().items())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert teacher_fingerprint(teacher) == fingerprint == cache.config["teachers"][0]["weights"]
    # the logits are the bfloat16 teacher's
    x = collate_images([with_image_transform(raw, spec)[i] for i in range(16)])["pixel_values"]
    import copy

    with torch.no_grad():
        want = copy.deepcopy(teacher).eval().to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert torch.equal(torch.stack([cache.logits(0, i) for i in range(16)]), want)
    # and the trainer accepts that same teacher with the cache
    DistillationTrainer(model=tiny_timm(spec=spec), teacher_model=teacher, args=make_args(
        teacher_cache_dir=str(tmp_path / "c")), train_dataset=with_teacher_cache(raw, cache, spec))


# --- 2, 3, 7: what needs several processes, from one torchrun launch (tests/regressions_24_worker.py) ---------
@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    import json
    import os
    import shutil
    import socket
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("two")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    worker = os.path.join(os.path.dirname(__file__), "regressions_24_worker.py")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(port), worker, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.load(open(out / f"rank{r}.json")) for r in (0, 1)]


@pytest.mark.parametrize("kind", ["clip_model", "siglip_model", "clip_vision", "vit_classifier"])
def test_fsdp_sharded_transformers_teachers_give_the_whole_teachers_features(two_processes, kind):
    for rank in two_processes:
        got = rank["sharded_features"][kind]
        assert "error" not in got, got.get("error")
        assert got["sharded"] and got["max_diff"] <= 1e-6
    trained = [rank["sharded_features"]["trainer"] for rank in two_processes]
    assert all("error" not in t for t in trained), trained
    assert all(t["steps"] == 1 and t["sharded"] and np.isfinite(t["loss"]) for t in trained)


def test_live_mixing_on_two_processes_trains_through_the_padded_last_round(two_processes):
    for rank in two_processes:
        live = rank["live_mixing"]["live"]
        assert "error" not in live, live.get("error")
        assert live["steps"] == 6 and live["finite"]  # 2 epochs of 3 rounds: 36 images, 2 processes x 8
        assert all(b["mixed"] for b in live["batches"])
    # the padded rounds: rank 0 the epoch's last 4 images and its first 4, rank 1 more of its first ones
    assert two_processes[0]["live_mixing"]["live"]["batches"][2]["positions"] == [32, 33, 34, 35, 0, 1, 2, 3]
    # a mixed cache cannot replay a padded round: refused at construction, in one line
    refused = two_processes[0]["live_mixing"]["cached"]["refused"]
    assert refused and "dataloader_drop_last=True" in refused and "\n" not in refused


def test_two_processes_build_every_shard_once_whenever_each_looks_at_the_disk(two_processes):
    plans = [rank["cache_plan"] for rank in two_processes]
    assert all("error" not in p for p in plans), plans
    written = plans[0]["written"] + plans[1]["written"]
    assert sorted(written) == [0, 1, 2, 3] and plans[0]["entries"] == 64  # 64 images, 16 a shard
