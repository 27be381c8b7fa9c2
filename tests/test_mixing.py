"""Function matching: mixup / CutMix seen identically by student and teachers, mixed labels, agreement
metrics, and a teacher-output cache that replays the mixed batches of a live run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_spec, tiny_timm

from hf_distill import DistillationTrainer
from hf_distill.data import collate_images, with_image_transform
from hf_distill.mixing import BatchMixer, MixingConfig

MIXES = {
    "mixup": dict(mixup_alpha=1.0),
    "cutmix": dict(cutmix_alpha=1.0),
    "both_elem": dict(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_mode="elem", mixup_prob=0.8),
    "both_pair": dict(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_mode="pair"),
}


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_the_mixing_is_timms_for_the_same_random_state(mode):
    from timm.data import Mixup

    config = MixingConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_mode=mode, mixup_prob=0.9, label_smoothing=0.1)
    mixer = BatchMixer(config, num_classes=10)
    timm_mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode, prob=0.9, label_smoothing=0.1, num_classes=10)
    for seed in range(12):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
        np.random.seed(seed)
        want_x, want_y = timm_mixup(x.clone(), y)
        np.random.seed(seed)
        params = mixer.draw(x.shape)
        assert torch.equal(mixer.apply(x, params), want_x)
        assert torch.allclose(mixer.targets(y, params), want_y, atol=1e-6)


def test_an_odd_batch_mixes_all_but_its_last_image():
    mixer = BatchMixer(MixingConfig(mixup_alpha=1.0), num_classes=4)
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 3, 0])
    params = mixer.params(0, 0, x.shape)
    assert params.partner == [3, 2, 1, 0, 4]
    mixed = mixer.apply(x, params)
    assert torch.equal(mixed[4], x[4]) and not torch.equal(mixed[0], x[0])
    assert torch.equal(mixer.targets(y, params)[4], F.one_hot(y[4], 4).float())


def test_parameters_are_a_function_of_where_the_batch_is():
    mixer = BatchMixer(MixingConfig(mixup_alpha=1.0, cutmix_alpha=1.0), num_classes=10, seed=3)
    np.random.seed(0)
    a = mixer.params(2, 5, (8, 3, 16, 16))
    np.random.rand(100)  # whatever else draws from numpy in between
    assert mixer.params(2, 5, (8, 3, 16, 16)) == a
    assert mixer.params(2, 6, (8, 3, 16, 16)) != a


@pytest.fixture(scope="module")
def raw(digits):
    return digits["train"].select(range(60))


def _args(make_args, **kw):
    base = dict(per_device_train_batch_size=16, lr_scheduler_type="constant", max_steps=4, logging_steps=1)
    return make_args(**{**base, **kw})


def _record_inputs(model, store):
    """Keep a copy of every input batch ``model`` (a timm model: ``model(x)``) is called with."""
    return model.register_forward_pre_hook(lambda m, args: store.append(args[0].detach().clone()))


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("n_teachers", [1, 2])
def test_student_and_every_teacher_see_the_same_mixed_images(mix, n_teachers, raw, make_args):
    spec = tiny_spec()
    student = tiny_timm(seed=1)
    # the second teacher takes another normalisation: its input differs only by its adapter
    other = tiny_spec(mean=(0.3,), std=(0.2,))
    teachers = [tiny_timm(seed=2), tiny_timm(seed=3, spec=other)][:n_teachers]
    seen = {"student": [], **{f"t{i}": [] for i in range(n_teachers)}}
    _record_inputs(student, seen["student"])
    for i, t in enumerate(teachers):
        _record_inputs(t, seen[f"t{i}"])
    trainer = DistillationTrainer(model=student, teacher_model=teachers, train_dataset=with_image_transform(raw, spec),
                                  args=_args(make_args, max_steps=3, **MIXES[mix]))
    for store in seen.values():
        store.clear()  # the set-up's dry runs
    trainer.train()
    assert len(seen["student"]) == 3
    unmixed = collate_images(trainer.train_dataset.__getitems__(list(range(16))))["pixel_values"]
    assert not torch.equal(seen["student"][0], unmixed)  # it was mixed
    for i, t in enumerate(teachers):
        adapter = trainer.teachers.adapters[i]
        for s_in, t_in in zip(seen["student"], seen[f"t{i}"]):
            assert torch.allclose(adapter(s_in), t_in, atol=1e-6)


def test_label_term_is_the_hand_mixed_cross_entropy(raw, make_args):
    spec = tiny_spec()
    student, teacher = tiny_timm(seed=1), tiny_timm(seed=2)
    t = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=with_image_transform(raw, spec),
                            args=_args(make_args, mixup_alpha=1.0, label_smoothing_factor=0.1, alpha=0.4))
    batch = collate_images(t.train_dataset.__getitems__(list(range(16, 32))))  # batch 1 of epoch 0
    t.model.train()  # batches are mixed in training; train-mode BatchNorm gives the same output for the same batch
    loss = t.compute_loss(t.model, batch)
    params = t.mixer.params(0, 1, batch["pixel_values"].shape)
    lam = params.lam[0]
    x = batch["pixel_values"]
    mixed = lam * x + (1 - lam) * x.flip(0)
    y = batch["labels"]
    smooth = F.one_hot(y, 10).float() * (1 - 0.1) + 0.1 / 10
    target = lam * smooth + (1 - lam) * smooth.flip(0)
    with torch.no_grad():
        zs, zt = student(mixed), teacher(mixed)
        ce = -(target * F.log_softmax(zs, -1)).sum(-1).mean()
        kd = F.kl_div(F.log_softmax(zs / 4, -1), F.log_softmax(zt / 4, -1), reduction="batchmean", log_target=True) * 16
    assert loss.item() == pytest.approx((0.6 * ce + 0.4 * kd).item(), rel=1e-5)


def test_function_matching_preset_and_what_cannot_mix(make_args):
    args = make_args(distill_method="function_matching")
    assert (args.alpha, args.temperature, args.mixup_alpha) == (1.0, 1.0, 1.0)
    assert make_args(distill_method="function_matching", mixup_alpha=0.2, cutmix_alpha=1.0).mixup_alpha == 0.2
    with pytest.raises(ValueError, match="cannot train on mixed images.*one label"):
        make_args(distill_method="dkd", mixup_alpha=1.0)
    with pytest.raises(ValueError, match="mixup_mode"):
        make_args(mixup_alpha=1.0, mixup_mode="row")


def test_function_matching_trains_without_labels(raw, make_args):
    unlabelled = with_image_transform(raw.remove_columns("label"), tiny_spec())
    t = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=tiny_timm(seed=2), train_dataset=unlabelled,
                            args=_args(make_args, distill_method="function_matching"))
    t.train()
    assert all(np.isfinite(h["loss"]) for h in t.state.log_history if "loss" in h)


# --- agreement metrics ------------------------------------------------------------------------------------------


def test_agreement_is_one_and_kl_zero_when_the_student_is_the_teacher(digits, make_args):
    import copy

    evaluation = with_image_transform(digits["test"].select(range(40)), tiny_spec())
    teacher = tiny_timm(seed=2)
    t = DistillationTrainer(model=copy.deepcopy(teacher), teacher_model=teacher, eval_dataset=evaluation,
                            args=make_args())
    m = t.evaluate()
    assert m["eval_teacher_agreement"] == 1.0 and m["eval_teacher_kl"] == pytest.approx(0.0, abs=1e-7)
    assert m["eval_teacher_accuracy"] == m["eval_accuracy"]
    other = DistillationTrainer(model=tiny_timm(seed=5), teacher_model=teacher, eval_dataset=evaluation,
                                args=make_args()).evaluate()
    assert other["eval_teacher_agreement"] < 1.0 and other["eval_teacher_kl"] > 0.0


def test_agreement_by_hand_and_the_teacher_runs_once_per_dataset(digits, make_args):
    evaluation = with_image_transform(digits["test"].select(range(40)), tiny_spec())
    student, teacher = tiny_timm(seed=1), tiny_timm(seed=2)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    t = DistillationTrainer(model=student, teacher_model=teacher, eval_dataset=evaluation,
                            args=make_args(per_device_eval_batch_size=16))
    calls.clear()
    m = t.evaluate()
    assert len(calls) == 3  # 40 images in batches of 16
    t.evaluate()
    assert len(calls) == 3  # cached: the teacher does not change
    full = collate_images([evaluation[i] for i in range(40)])
    with torch.no_grad():
        zs, zt = student.eval()(full["pixel_values"]), teacher(full["pixel_values"])
    assert m["eval_teacher_agreement"] == pytest.approx((zs.argmax(-1) == zt.argmax(-1)).float().mean().item())
    kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), reduction="batchmean", log_target=True)
    assert m["eval_teacher_kl"] == pytest.approx(kl.item(), rel=1e-4)


# --- the teacher-output cache with mixing --------------------------------------------------------------------


@pytest.mark.parametrize("mix", ["mixup", "both_elem"])
def test_cached_mixed_run_equals_the_live_run_bit_for_bit(mix, raw, make_args, tmp_path):
    from hf_distill.teacher_cache import build_teacher_cache, with_teacher_cache

    spec = tiny_spec()
    args = _args(make_args, max_steps=8, **MIXES[mix])  # 60 images in batches of 16: two epochs, uneven last batch
    build_teacher_cache(tiny_timm("resnet18", seed=2), raw, spec, tmp_path / "c", epochs=2, batch_size=16, seed=0,
                        mixing=args.mixing, shard_size=20)
    live = tiny_timm(seed=1)
    DistillationTrainer(model=live, teacher_model=tiny_timm("resnet18", seed=2), args=args,
                        train_dataset=with_image_transform(raw, spec)).train()
    cached = tiny_timm(seed=1)
    t = DistillationTrainer(model=cached, train_dataset=with_teacher_cache(raw, str(tmp_path / "c"), spec),
                            args=_args(make_args, max_steps=8, teacher_cache_dir=str(tmp_path / "c"), **MIXES[mix]))
    t.train()
    assert len(t.teachers) == 0  # no teacher was loaded: the logits come from the cache
    for (k, a), b in zip(live.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(a, b), k


def test_mixed_cache_resumes_a_partial_build_and_refuses_other_mixing(raw, make_args, tmp_path):
    from hf_distill.teacher_cache import (MANIFEST_NAME, TeacherCacheError, build_teacher_cache, load_teacher_cache,
                                          with_teacher_cache)

    spec = tiny_spec()
    args = _args(make_args, mixup_alpha=1.0)
    kw = dict(epochs=2, batch_size=16, seed=0, mixing=args.mixing, shard_size=32)
    teacher = tiny_timm(seed=2)
    full = build_teacher_cache(teacher, raw, spec, tmp_path / "full", **kw)

    class Killed(Exception):
        pass

    def kill_after_second(shard):
        if shard == 1:
            raise Killed

    with pytest.raises(Killed):
        build_teacher_cache(teacher, raw, spec, tmp_path / "part", on_shard_written=kill_after_second, **kw)
    with pytest.raises(TeacherCacheError, match="partial"):
        load_teacher_cache(tmp_path / "part")
    written = []
    resumed = build_teacher_cache(teacher, raw, spec, tmp_path / "part", on_shard_written=written.append, **kw)
    assert written == [2, 3]  # 60 images x 2 epochs in whole batches of 16: 8 batches, 2 per shard
    a, b = full.data[:], resumed.data[:]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "part" / MANIFEST_NAME).exists()
    # a mismatch is refused, listing the difference
    with pytest.raises(TeacherCacheError, match="mixup_alpha"):
        build_teacher_cache(teacher, raw, spec, tmp_path / "full", **{**kw, "mixing": MixingConfig(mixup_alpha=0.5)})
    train = with_teacher_cache(raw, str(tmp_path / "full"), spec)
    for bad, what in ((dict(mixup_alpha=0.2), "mixup_alpha"), (dict(mixup_alpha=1.0, per_device_train_batch_size=8),
                                                               "batch_size"),
                      (dict(mixup_alpha=1.0, data_seed=5), "seed"), (dict(), "mixing")):
        with pytest.raises(TeacherCacheError, match=what):
            DistillationTrainer(model=tiny_timm(seed=1), train_dataset=train,
                                args=_args(make_args, teacher_cache_dir=str(tmp_path / "full"), **bad))
