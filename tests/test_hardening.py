"""The failures found when hf_distill was tried as a new user would (issue 14), one test each.

The CLI journeys (subprocesses, as a user types them) are in test_journeys.py; the precision
matrix in test_precision.py; the Trainer-argument sweep in test_trainer_arguments.py.
"""

import json
import logging
import os
import pickle

import pytest
import torch
from conftest import PlainClassifier, tiny_hf_resnet, tiny_spec, tiny_timm

from hf_distill import DistillationTrainer
from hf_distill.data import collate_images, with_image_transform
from hf_distill.losses import kd_loss
from hf_distill.models import ModelLoadError, load_model, save_native


def _batch(ds, n=8):
    return collate_images([ds[i] for i in range(n)])


# --- 3. --max_train_samples takes a random subset, not the first rows -------------------------------


def test_max_samples_take_a_shuffled_subset_of_a_class_sorted_dataset(digits, monkeypatch):
    from datasets import DatasetDict

    import hf_distill.data as data
    from hf_distill.arguments import DataArguments
    from hf_distill.cli import load_splits

    sorted_train = digits["train"].sort("label")  # like an imagefolder: class by class
    assert len(set(sorted_train.select(range(100))["label"])) == 1
    monkeypatch.setattr(data, "load_image_dataset",
                        lambda *a, **k: DatasetDict(train=sorted_train, test=digits["test"].sort("label")))
    args = DataArguments(dataset_name="x", max_train_samples=100, max_eval_samples=50)
    train, evaluation = load_splits(args, seed=0)
    assert len(train) == 100 and len(evaluation) == 50
    assert len(set(train["label"])) == 10 and len(set(evaluation["label"])) == 10
    assert load_splits(args, seed=0)[0]["label"] == train["label"]  # the same subset for the same seed


# --- 4. a corrupt image is named and skipped ------------------------------------------------------


def test_unreadable_images_are_skipped_with_their_file_named(tmp_path, caplog):
    import datasets
    from PIL import Image

    from hf_distill.data import SKIPPED_IMAGES, BadImageError

    good = tmp_path / "good.png"
    Image.new("L", (8, 8), 128).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:30])  # truncated
    ds = datasets.Dataset.from_dict({"image": [str(good), str(bad), str(good)], "label": [0, 1, 2]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    spec = tiny_spec(size=8)
    with caplog.at_level(logging.WARNING, logger="hf_distill.data"):
        batch = collate_images([with_image_transform(ds, spec)[i] for i in range(3)])
    assert batch["pixel_values"].shape == (2, 1, 8, 8) and batch["labels"].tolist() == [0, 2]
    assert str(bad) in caplog.text and str(bad) in SKIPPED_IMAGES
    with pytest.raises(BadImageError, match="none of the 1 images"):
        collate_images([with_image_transform(ds, spec)[1]])


# --- 5. a misspelt timm name is not a Hub problem ---------------------------------------------------


def test_misspelt_timm_name_lists_close_names_without_asking_the_hub(monkeypatch):
    import hf_distill.models.loading as loading

    def no_hub(*a, **k):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(loading, "_hub_config", no_hub)  # load_model's only way to the Hub for such a name
    with pytest.raises(ModelLoadError, match=r"neither a timm architecture.*resnet18"):
        load_model("resnet181")


# --- 10. card details --------------------------------------------------------------------------------


def test_untrained_card_says_zero_epochs_and_random_timm_export_claims_no_pretrained_source(digits_small, make_args,
                                                                                             tmp_path):
    train, _ = digits_small
    student = load_model("resnet18", num_labels=10, pretrained=False, in_chans=1)
    from hf_distill.models import set_input_spec

    set_input_spec(student, tiny_spec())
    t = DistillationTrainer(model=student, args=make_args(distill_method="supervised",
                                                          output_dir=str(tmp_path / "abs" / "my-student")),
                            train_dataset=train)
    t.save_model()
    out = tmp_path / "abs" / "my-student"
    card = (out / "README.md").read_text()
    ctx = t.model_card_context()
    assert ctx.training["epochs"] == 0 and ctx.training["steps"] == 0
    assert ctx.training["initialisation"] == "random initialisation"
    cfg = json.loads((out / "config.json").read_text())
    for key in ("tag", "paper_ids", "hf_hub_id", "origin_url", "license"):
        assert key not in cfg["pretrained_cfg"], key
    # a model loaded from a local folder is named by the folder, not its absolute path
    reloaded = load_model(str(out))
    t2 = DistillationTrainer(model=reloaded, args=make_args(distill_method="supervised",
                                                            output_dir=str(tmp_path / "o2")), train_dataset=train)
    t2.save_model()
    card = (tmp_path / "o2" / "README.md").read_text()
    assert str(tmp_path) not in card and "my-student" in card
    assert t2.model_card_context().student_name == "my-student"


# --- 13. tokens never reach pickled arguments -------------------------------------------------------


def test_pickled_arguments_carry_no_token(make_args, tmp_path):
    token = "hf_" + "Zz9" * 12
    args = make_args(hub_token=token)
    data = pickle.dumps(args)
    assert token.encode() not in data
    assert args.hub_token == token  # the live object keeps it for pushing
    torch.save(args, tmp_path / "a.bin")
    assert token.encode() not in (tmp_path / "a.bin").read_bytes()


def test_checkpoint_pushes_upload_no_token(digits_small, make_args):
    """push_to_hub with a save strategy: the Trainer pushes each checkpoint (with training_args.bin)."""
    from hub_server import local_hub

    token = "hf_" + "Qq7" * 12
    train, _ = digits_small
    with local_hub() as hub:
        args = make_args(push_to_hub=True, hub_model_id="org/ckpt", hub_token=token, save_strategy="steps",
                         save_steps=2, max_steps=4, hub_strategy="checkpoint")
        t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), args=args,
                                train_dataset=train)
        t.train()
        t.push_to_hub()
        files = hub.repos["org/ckpt"]
        assert any(name.endswith("training_args.bin") for name in files)
        for name, data in files.items():
            assert token.encode() not in data, name
    for root, _, names in os.walk(args.output_dir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert token.encode() not in f.read(), name


# --- 15 / 23. the teacher-output cache is checked at construction --------------------------------------


def test_cache_from_another_teacher_is_refused_listing_the_difference(digits, make_args, tmp_path):
    from hf_distill.teacher_cache import TeacherCacheError, build_teacher_cache, with_teacher_cache

    raw = digits["train"].select(range(32))
    spec = tiny_spec()
    build_teacher_cache(tiny_timm(seed=2), raw, spec, tmp_path / "c", batch_size=16)
    train = with_teacher_cache(raw, str(tmp_path / "c"), spec)
    args = make_args(teacher_cache_dir=str(tmp_path / "c"))
    with pytest.raises(TeacherCacheError, match="fingerprint of the teacher weights"):
        DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=3), args=args, train_dataset=train)
    DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), args=args, train_dataset=train)


def test_cache_dir_is_checked_at_construction(digits, make_args, tmp_path):
    from hf_distill.teacher_cache import TeacherCacheError, build_teacher_cache

    raw = digits["train"].select(range(32))
    with pytest.raises(TeacherCacheError, match="no teacher cache"):
        DistillationTrainer(model=tiny_timm(seed=1), args=make_args(teacher_cache_dir=str(tmp_path / "none")),
                            train_dataset=with_image_transform(raw, tiny_spec()))
    build_teacher_cache(tiny_timm(seed=2), raw, tiny_spec(), tmp_path / "c", batch_size=16)
    with pytest.raises(ValueError, match="does not read from it"):
        DistillationTrainer(model=tiny_timm(seed=1), args=make_args(teacher_cache_dir=str(tmp_path / "c")),
                            train_dataset=with_image_transform(raw, tiny_spec()))
    with pytest.raises(ValueError, match="teacher_ensemble='random'"):
        DistillationTrainer(model=tiny_timm(seed=1), args=make_args(teacher_cache_dir=str(tmp_path / "c"),
                                                                    teacher_ensemble="random"))


# --- 16. hints with a random teacher each batch come from teacher 0, fresh ---------------------------------


def test_hints_with_random_ensemble_always_come_from_teacher_0_at_the_batch_size(digits_small, make_args):
    train, _ = digits_small
    t0, t1 = tiny_timm(seed=2), tiny_timm(seed=3)
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=[t0, t1], train_dataset=train,
                            args=make_args(distill_method="fitnets", hint_layers=["layer1:layer2"], hint_weight=1.0,
                                           teacher_ensemble="random"))
    x = _batch(train)["pixel_values"]
    with torch.no_grad():
        feats = {}
        h = t0.layer2.register_forward_hook(lambda m, i, o: feats.update(want=o))
        t0(x)
        h.remove()
    for seed in range(6):  # both teachers get drawn
        torch.manual_seed(seed)
        _, got = t.teacher_outputs(x, training=True)
        assert got["layer2"].shape[0] == 8
        assert torch.equal(got["layer2"], feats["want"])


# --- 17. hint/exit/branch modules follow the image size of the batches ----------------------------------


@pytest.mark.parametrize("method", ["fitnets", "byot", "sftn"])
def test_timm_models_with_224px_configs_train_on_32px_batches(digits, make_args, method):
    import timm

    spec32 = tiny_spec(size=32)
    train = with_image_transform(digits["train"].select(range(32)), spec32)
    torch.manual_seed(0)
    student = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)  # data config: 224 px
    kw = {"fitnets": dict(hint_layers=["layer2:layer2"], hint_weight=1.0),
          "byot": {}, "sftn": dict(sftn_student_model="resnet10t")}[method]
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1) if method == "fitnets" \
        else None
    t = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                            args=make_args(distill_method=method, max_steps=2, logging_steps=1,
                                           per_device_train_batch_size=8, **kw))
    assert t.student_spec.image_size == (224, 224)  # the probe ran at 224 px, the batches are 32 px
    t.train()
    logged = [h for h in t.state.log_history if "loss" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)


# --- 18. schedules reach their end value with max_steps and fractional epochs ----------------------------


@pytest.mark.parametrize("limit", [dict(max_steps=7), dict(max_steps=-1, num_train_epochs=1.5)])
def test_soft_weight_schedule_ends_at_its_end_value(digits_small, make_args, limit):
    train, _ = digits_small
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=train,
                            args=make_args(distill_method="fitnets", hint_layers=["layer1:layer2"], hint_epochs=0.0,
                                           hint_weight=1.0, soft_weight_schedule="linear", soft_weight_start=4.0,
                                           soft_weight_end=1.0, alpha=0.5, logging_steps=1, **limit))
    t.train()
    weights = [h["soft_weight"] for h in t.state.log_history if "soft_weight" in h]
    assert weights[0] == pytest.approx(0.5 * 4.0) and weights[-1] == pytest.approx(0.5 * 1.0)


# --- 19. fitnets with defaults is stage-wise ------------------------------------------------------------


def test_fitnets_defaults_train_hints_first_then_kd_without_running_the_regressors(digits_small, make_args):
    train, _ = digits_small
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=train,
                            args=make_args(distill_method="fitnets", hint_layers=["layer1:layer2"], max_steps=8,
                                           logging_steps=1))
    reg = t.extra_modules["0"]
    stats = {}

    def snapshot(step):
        stats[step] = reg.proj[1].running_mean.clone()

    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snapshot(state.global_step)

    t.add_callback(Watch())
    t.train()
    stages = [h["fitnets_stage"] for h in t.state.log_history if "fitnets_stage" in h]
    assert stages == [1, 1, 2, 2, 2, 2, 2, 2]  # a quarter of 8 steps
    assert all("loss_hint" in h for h in t.state.log_history if h.get("fitnets_stage") == 1)
    assert not any("loss_hint" in h for h in t.state.log_history if h.get("fitnets_stage") == 2)
    assert not torch.equal(stats[1], stats[2])  # the regressor ran (its BatchNorm moved) in stage 1
    assert all(torch.equal(stats[2], stats[s]) for s in range(3, 9))  # and not at all in stage 2


def test_fitnets_that_never_uses_its_hints_is_refused(make_args):
    with pytest.raises(ValueError, match="never uses the hints"):
        make_args(distill_method="fitnets", hint_layers=["auto"], hint_epochs=0.0)


# --- 20. label smoothing, gradient checkpointing, compute_loss_func ------------------------------------------


def test_label_smoothing_reaches_the_label_term(digits_small, make_args):
    train, _ = digits_small
    student, teacher = tiny_timm(seed=1), tiny_timm(seed=2)
    t = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                            args=make_args(label_smoothing_factor=0.2, alpha=0.5, temperature=2.0))
    batch = _batch(train)
    t.model.eval()
    loss = t.compute_loss(t.model, batch)
    with torch.no_grad():
        zs, zt = student(batch["pixel_values"]), teacher(batch["pixel_values"])
        ce = torch.nn.functional.cross_entropy(zs, batch["labels"], label_smoothing=0.2)
        plain, _ = kd_loss(zs, zt, batch["labels"], 2.0, 0.5)
        kd = (plain - 0.5 * torch.nn.functional.cross_entropy(zs, batch["labels"])) / 0.5
    assert loss.item() == pytest.approx((0.5 * ce + 0.5 * kd).item(), rel=1e-5)
    assert loss.item() != pytest.approx(plain.item(), rel=1e-4)


def _tiny_hf_vit(seed=1):
    from transformers import ViTConfig, ViTForImageClassification

    from hf_distill.models import set_input_spec

    torch.manual_seed(seed)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=16,
                                              num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                                              num_labels=10))
    set_input_spec(vit, tiny_spec())
    return vit


@pytest.mark.parametrize("family,flag", [("timm", "gradient_checkpointing"),
                                         ("transformers", "activation_checkpointing")])
def test_gradient_checkpointing_reaches_the_student_and_keeps_gradients(digits_small, make_args, family, flag):
    train, _ = digits_small
    make = (lambda: tiny_timm("resnet18", seed=1)) if family == "timm" else _tiny_hf_vit
    grads = {}
    for ckpt in (False, True):
        t = DistillationTrainer(model=make(), teacher_model=tiny_timm(seed=2), train_dataset=train,
                                args=make_args(**{flag: ckpt}, max_steps=1))
        t.train()  # the Trainer switches checkpointing on at the start of train()
        student = t.student
        on = student.grad_checkpointing if family == "timm" else student.is_activation_checkpointing
        assert on == ckpt
        t.model.train()
        t.model.zero_grad()
        t.compute_loss(t.model, _batch(train)).backward()
        grads[ckpt] = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    assert len(grads[True]) == len(grads[False]) > 0
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradient_checkpointing_of_a_plain_module_is_refused(digits_small, make_args):
    train, _ = digits_small
    t = DistillationTrainer(model=PlainClassifier(seed=1), teacher_model=PlainClassifier(seed=2), train_dataset=train,
                            args=make_args(gradient_checkpointing=True, max_steps=1))
    with pytest.raises(ValueError, match="no checkpointing switch"):
        t.train()


def test_compute_loss_func_is_refused(digits_small, make_args):
    train, _ = digits_small
    with pytest.raises(ValueError, match="compute_loss_func"):
        DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=train,
                            args=make_args(), compute_loss_func=lambda *a, **k: 0)


# --- 21. teacher accuracy once per dataset ---------------------------------------------------------------


def test_teacher_accuracy_is_computed_for_each_evaluation_dataset(digits, make_args):
    spec = tiny_spec()
    a = with_image_transform(digits["test"].select(range(40)), spec)
    b = with_image_transform(digits["test"].select(range(40, 80)), spec)
    teacher = tiny_timm(seed=2)
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=teacher, args=make_args(), eval_dataset=a)

    def acc(ds):
        batch = collate_images([ds[i] for i in range(len(ds))])
        with torch.no_grad():
            return (teacher.eval()(batch["pixel_values"]).argmax(-1) == batch["labels"]).float().mean().item()

    assert t.evaluate()["eval_teacher_accuracy"] == pytest.approx(acc(a))
    assert t.evaluate(b)["eval_teacher_accuracy"] == pytest.approx(acc(b))
    assert acc(a) != acc(b)


# --- 22. predict on unlabelled images ---------------------------------------------------------------------


def test_predict_on_unlabelled_images(digits, make_args):
    unlabelled = digits["test"].select(range(20)).remove_columns("label")
    ds = with_image_transform(unlabelled, tiny_spec())
    student = tiny_timm(seed=1)
    t = DistillationTrainer(model=student, teacher_model=tiny_timm(seed=2), args=make_args())
    out = t.predict(ds)
    assert out.predictions.shape == (20, 10) and out.label_ids is None
    batch = collate_images([ds[i] for i in range(20)])
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(out.predictions), student.eval()(batch["pixel_values"]), atol=1e-5)


# --- 24. logged loss terms do not pile up when logging is off ----------------------------------------------


def test_loss_terms_are_running_sums_not_lists(digits_small, make_args):
    from transformers import TrainerCallback

    train, _ = digits_small
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=train,
                            args=make_args(logging_strategy="no", max_steps=6))
    held = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            held.append(sum(v.numel() for v in t._term_sums.values()))

    t.add_callback(Watch())
    t.train()
    assert held == [2] * 6  # loss_ce and loss_kd, one running sum each, whatever the number of steps
    final = t.state.log_history[-1]  # the end-of-training log still reports their means
    assert {"loss_ce", "loss_kd"} <= set(final)


# --- 25. pretrained=False means random weights for every source ----------------------------------------------


def test_pretrained_false_gives_random_weights_for_transformers_folders(tmp_path):
    model = tiny_hf_resnet(seed=1)
    save_native(model, tmp_path / "m")
    same = load_model(str(tmp_path / "m"))
    fresh = load_model(str(tmp_path / "m"), pretrained=False)
    key = "classifier.1.weight"
    assert torch.equal(same.state_dict()[key], model.state_dict()[key])
    assert not torch.equal(fresh.state_dict()[key], model.state_dict()[key])
    assert type(fresh) is type(model) and fresh.hf_distill_init == "random initialisation"
    timm_model = tiny_timm(seed=1)
    save_native(timm_model, tmp_path / "t")
    assert not torch.equal(load_model(str(tmp_path / "t"), pretrained=False).fc.weight, timm_model.fc.weight)


# --- 26. each teacher's input adapter is logged ----------------------------------------------------------------


def test_guessed_teacher_statistics_are_logged(digits_small, make_args, caplog):
    from transformers import ViTConfig, ViTForImageClassification

    train, _ = digits_small
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=16,
                                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                              num_labels=10))
    with caplog.at_level(logging.INFO, logger="hf_distill.trainer"):
        DistillationTrainer(model=tiny_timm(seed=1), teacher_model=vit, args=make_args(), train_dataset=train)
    text = caplog.text
    assert "grey -> RGB" in text and "resized 16x16 -> 32x32" in text
    assert "guessed from model_type 'vit'" in text


def test_unlabelled_training_batches_are_refused_unless_the_method_needs_no_labels(digits, make_args):
    unlabelled = with_image_transform(digits["train"].select(range(32)).remove_columns("label"), tiny_spec())
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=unlabelled,
                            args=make_args(max_steps=1))
    with pytest.raises(ValueError, match="carry no labels.*alpha=1"):
        t.train()
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=unlabelled,
                            args=make_args(max_steps=2, alpha=1.0, logging_steps=1))
    t.train()  # the teacher term alone needs no labels
    assert all(h["loss_ce"] == 0 for h in t.state.log_history if "loss_ce" in h and "loss" in h)
