"""DKD, DIST, logit standardisation, hard distillation and the DeiT distillation token.

Reference values are computed independently: by hand (math on a fixed example), by the authors'
code copied verbatim, by timm's own TokenDistillationTask, or by identities the papers state.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_spec, tiny_timm

from hf_distill import DistillationTrainer, load_model, set_input_spec
from hf_distill.data import collate_images, with_image_transform
from hf_distill.losses import dist_terms, dkd_terms, hard_ce, kd_loss, soft_kl
from hf_distill.methods import Progress

SPEC32 = tiny_spec(size=32)


# --- DKD ------------------------------------------------------------------------------------------------


def test_kd_is_tckd_plus_weighted_nckd_per_sample():
    torch.manual_seed(0)
    s, t, y, T = torch.randn(12, 7) * 3, torch.randn(12, 7) * 3, torch.randint(0, 7, (12,)), 2.5
    p_ty = F.softmax(t / T, -1)[torch.arange(12), y]
    for i in range(12):
        tckd, nckd = dkd_terms(s[i:i + 1], t[i:i + 1], y[i:i + 1], T)
        assert (tckd + (1 - p_ty[i]) * nckd).item() == pytest.approx(soft_kl(s[i:i + 1], t[i:i + 1], T).item(),
                                                                      rel=1e-5)


def test_dkd_by_hand_on_a_three_class_example():
    zs, zt, y, T = [1.0, 2.0, 3.0], [3.0, 1.0, 0.5], 0, 2.0

    def softmax(z):
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    ps, pt = softmax(zs), softmax(zt)
    tckd = pt[y] * math.log(pt[y] / ps[y]) + (1 - pt[y]) * math.log((1 - pt[y]) / (1 - ps[y]))
    qs = [p / (1 - ps[y]) for i, p in enumerate(ps) if i != y]
    qt = [p / (1 - pt[y]) for i, p in enumerate(pt) if i != y]
    nckd = sum(b * math.log(b / a) for a, b in zip(qs, qt))
    got_t, got_n = dkd_terms(torch.tensor([zs]), torch.tensor([zt]), torch.tensor([y]), T)
    assert got_t.item() == pytest.approx(T * T * tckd, rel=1e-5)
    assert got_n.item() == pytest.approx(T * T * nckd, rel=1e-5)


def _mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """megvii-research/mdistiller dkd_loss, verbatim but for the deprecated size_average."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature ** 2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_equals_the_authors_code():
    torch.manual_seed(1)
    s, t, y = torch.randn(32, 100) * 2, torch.randn(32, 100) * 2, torch.randint(0, 100, (32,))
    tckd, nckd = dkd_terms(s, t, y, 4.0)
    assert (1.0 * tckd + 8.0 * nckd).item() == pytest.approx(_mdistiller_dkd(s, t, y, 1.0, 8.0, 4.0).item(), rel=1e-5)


def test_dkd_warmup_ramps_by_step(make_args):
    from hf_distill.methods.dkd import DecoupledKD

    method = DecoupledKD(make_args(distill_method="dkd", dkd_warmup_epochs=2))
    p = lambda step: Progress(step=step, max_steps=100, epoch=step / 10, num_epochs=10, steps_per_epoch=10)  # noqa
    assert [method.ramp(p(s)) for s in (0, 5, 10, 20, 30)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert DecoupledKD(make_args(distill_method="dkd", dkd_warmup_epochs=0)).ramp(p(0)) == 1.0


def test_dkd_loss_in_the_trainer(digits_small, make_args):
    train, _ = digits_small
    student, teacher = tiny_timm(seed=1), tiny_timm(seed=2)
    t = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                            args=make_args(distill_method="dkd", dkd_warmup_epochs=0, dkd_beta=2.0))
    batch = collate_images([train[i] for i in range(8)])
    t.model.eval()
    loss = t.compute_loss(t.model, batch)
    with torch.no_grad():
        zs, zt, y = student(batch["pixel_values"]), teacher(batch["pixel_values"]), batch["labels"]
        want = F.cross_entropy(zs, y) + _mdistiller_dkd(zs, zt, y, 1.0, 2.0, 4.0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


# --- DIST -----------------------------------------------------------------------------------------------


def test_dist_is_zero_for_identical_logits_and_blind_to_per_sample_offsets():
    torch.manual_seed(2)
    z = torch.randn(16, 10)
    inter, intra = dist_terms(z, z, 1.0)
    assert inter.item() == pytest.approx(0.0, abs=1e-6) and intra.item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(16, 10)
    shifted = z + torch.randn(16, 1) * 5  # softmax ignores a per-sample constant
    for a, b in zip(dist_terms(z, t, 2.0), dist_terms(shifted, t, 2.0)):
        assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_dist_by_hand():
    zs = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    zt = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    T = 2.0

    def softmax(z):
        e = np.exp(z / T)
        return e / e.sum(1, keepdims=True)

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8)

    ps, pt = softmax(zs), softmax(zt)
    inter = 1 - np.mean([pearson(ps[i], pt[i]) for i in range(2)])
    intra = 1 - np.mean([pearson(ps[:, j], pt[:, j]) for j in range(3)])
    got = dist_terms(torch.tensor(zs, dtype=torch.float32), torch.tensor(zt, dtype=torch.float32), T)
    assert got[0].item() == pytest.approx(T * T * inter, rel=1e-5)
    assert got[1].item() == pytest.approx(T * T * intra, rel=1e-5)


def test_dist_refuses_alpha_and_needs_no_labels_without_its_ce(make_args):
    with pytest.raises(ValueError, match="does not use alpha.*dist_weight"):
        make_args(distill_method="dist", alpha=0.5)
    from hf_distill.methods.dist import DIST

    assert not DIST(make_args(distill_method="dist", dist_ce_weight=0.0)).stage(Progress()).labels


# --- logit standardisation ----------------------------------------------------------------------------------


def test_standardised_kd_is_blind_to_the_scale_and_offset_of_the_student_logits():
    torch.manual_seed(3)
    s, t = torch.randn(8, 10), torch.randn(8, 10) * 4
    a, b = torch.rand(8, 1) * 5 + 0.1, torch.randn(8, 1) * 3
    assert soft_kl(s * a + b, t, 2.0, standardize=True).item() == pytest.approx(
        soft_kl(s, t, 2.0, standardize=True).item(), rel=1e-4)
    assert soft_kl(s * a + b, t, 2.0).item() != pytest.approx(soft_kl(s, t, 2.0).item(), rel=1e-2)
    tckd, nckd = dkd_terms(s * a + b, t, torch.zeros(8, dtype=torch.long), 2.0, standardize=True)
    ref = dkd_terms(s, t, torch.zeros(8, dtype=torch.long), 2.0, standardize=True)
    assert tckd.item() == pytest.approx(ref[0].item(), rel=1e-4) and nckd.item() == pytest.approx(ref[1].item(), rel=1e-4)


@pytest.mark.parametrize("kw", [dict(distill_method="kd", distill_loss="mse"), dict(distill_method="dist"),
                                dict(distill_method="supervised"), dict(distill_method="noisy_teacher")])
def test_logit_standardization_is_refused_where_it_does_not_apply(make_args, kw):
    with pytest.raises(ValueError, match="logit_standardization applies to"):
        make_args(logit_standardization=True, **kw)


# --- hard distillation ----------------------------------------------------------------------------------------


def test_hard_term_is_ce_against_the_argmax_of_the_mean_teacher(digits_small, make_args):
    train, _ = digits_small
    student, t1, t2 = tiny_timm(seed=1), tiny_timm(seed=2), tiny_timm(seed=3)
    t = DistillationTrainer(model=student, teacher_model=[t1, t2], train_dataset=train,
                            args=make_args(distill_loss="hard", alpha=0.5))
    batch = collate_images([train[i] for i in range(16)])
    t.model.eval()
    loss = t.compute_loss(t.model, batch)
    with torch.no_grad():
        x, y = batch["pixel_values"], batch["labels"]
        zs, mean_t = student(x), (t1(x) + t2(x)) / 2
        want = 0.5 * F.cross_entropy(zs, y) + 0.5 * F.cross_entropy(zs, mean_t.argmax(-1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert hard_ce(zs, mean_t).item() == pytest.approx(F.cross_entropy(zs, mean_t.argmax(-1)).item())


# --- the DeiT distillation token ------------------------------------------------------------------------------


def _timm_deit(in_chans=1, seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=4,
                             embed_dim=32, depth=2, num_heads=2, num_classes=10, in_chans=in_chans)


def _hf_deit(seed=0):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(seed)
    config = DeiTConfig(image_size=32, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=10)
    config.architectures = ["DeiTForImageClassificationWithTeacher"]
    return DeiTForImageClassificationWithTeacher(config)


HEADS = {"timm": (_timm_deit, "head", "head_dist"), "transformers": (_hf_deit, "cls_classifier",
                                                                     "distillation_classifier")}


@pytest.fixture(scope="module")
def data32(digits):
    return (with_image_transform(digits["train"].select(range(48)), SPEC32),
            with_image_transform(digits["test"].select(range(24)), SPEC32))


@pytest.mark.parametrize("library", list(HEADS))
@pytest.mark.parametrize("distill_loss", ["kl", "hard"])
def test_each_head_learns_from_its_own_term(library, distill_loss, data32, make_args):
    train, _ = data32
    make, cls_name, dist_name = HEADS[library]
    student = make()
    set_input_spec(student, SPEC32)
    teacher = tiny_timm("resnet18", seed=2, spec=SPEC32)
    batch = collate_images([train[i] for i in range(8)])
    grads = {}
    for alpha in (0.0, 1.0):  # the label term alone, then the teacher term alone
        t = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                                args=make_args(alpha=alpha, distill_loss=distill_loss, temperature=2.0))
        t.model.train()
        t.model.zero_grad()
        t.compute_loss(t.model, batch).backward()
        grads[alpha] = {name: 0.0 if getattr(student, name).weight.grad is None else
                        getattr(student, name).weight.grad.abs().sum().item() for name in (cls_name, dist_name)}
    assert grads[0.0][cls_name] > 0 and grads[0.0][dist_name] == 0  # labels -> class head only
    # no label term: both heads learn the teacher (both are half of every prediction; issue 24)
    assert grads[1.0][dist_name] > 0 and grads[1.0][cls_name] > 0


@pytest.mark.parametrize("library", list(HEADS))
def test_deit_students_train_evaluate_with_the_mean_and_reload_identically(library, data32, make_args, tmp_path):
    train, evaluation = data32
    student = HEADS[library][0]()
    set_input_spec(student, SPEC32)
    t = DistillationTrainer(model=student, teacher_model=tiny_timm("resnet18", seed=2, spec=SPEC32),
                            train_dataset=train, eval_dataset=evaluation,
                            args=make_args(distill_loss="hard", alpha=0.5, output_dir=str(tmp_path / "out")))
    t.train()
    metrics = t.evaluate()
    assert {"eval_accuracy", "eval_cls_head_accuracy", "eval_dist_head_accuracy", "eval_teacher_accuracy"} <= set(
        metrics)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = t.model.eval()(pixel_values=x)
        heads = out["heads"]
        assert torch.allclose(out["logits"], (heads["cls_head"] + heads["dist_head"]) / 2)
        t.save_model()
        reloaded = load_model(str(tmp_path / "out")).eval()
        got = reloaded(pixel_values=x).logits if library == "transformers" else reloaded(x)
    assert torch.allclose(got, out["logits"], atol=1e-6)  # the library's own inference: the mean of the heads


@pytest.mark.parametrize("distill_type", ["soft", "hard"])
def test_loss_equals_timms_token_distillation_task(distill_type, digits, make_args):
    from timm.task import TokenDistillationTask

    student, teacher = _timm_deit(in_chans=3, seed=4), tiny_timm("test_resnet", seed=5, in_chans=3,
                                                                spec=None)
    del teacher.hf_distill_input_spec  # both keep timm's own (ImageNet) statistics: no re-normalisation anywhere
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    alpha, T = 0.7, 3.0
    task = TokenDistillationTask(student, teacher, distill_type=distill_type, distill_loss_weight=alpha,
                                 task_loss_weight=1 - alpha, temperature=T, verbose=False)
    task.train()
    want = task(x, y)["loss"]
    t = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(
        alpha=alpha, temperature=T, distill_loss="kl" if distill_type == "soft" else "hard"))
    t.model.train()
    got = t.compute_loss(t.model, {"pixel_values": x, "labels": y})
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_students_without_a_distillation_head_are_unchanged(digits_small, make_args):
    train, _ = digits_small
    student, teacher = tiny_timm(seed=1), tiny_timm(seed=2)
    t = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train, args=make_args(alpha=0.5))
    batch = collate_images([train[i] for i in range(8)])
    t.model.eval()
    out = t.model(pixel_values=batch["pixel_values"])
    assert out["heads"] == {}
    with torch.no_grad():
        want, _ = kd_loss(student(batch["pixel_values"]), teacher(batch["pixel_values"]), batch["labels"], 4.0, 0.5)
    assert t.compute_loss(t.model, batch).item() == pytest.approx(want.item(), rel=1e-6)


# --- what each objective can read from a teacher-output cache ---------------------------------------------------


@pytest.fixture(scope="module")
def caches(digits, tmp_path_factory):
    from hf_distill.teacher_cache import build_teacher_cache

    raw = digits["train"].select(range(32))
    root = tmp_path_factory.mktemp("caches")
    teacher = tiny_timm(seed=2)
    build_teacher_cache(teacher, raw, tiny_spec(), root / "full", batch_size=16)
    build_teacher_cache(teacher, raw, tiny_spec(), root / "top2", batch_size=16, top_k=2)
    return raw, root, teacher


@pytest.mark.parametrize("kw,cache,error", [
    (dict(distill_method="kd"), "top2", None),
    (dict(distill_method="kd", distill_loss="hard"), "top2", None),
    (dict(distill_method="dkd"), "full", None),
    (dict(distill_method="dist"), "full", None),
    (dict(distill_method="kd", logit_standardization=True), "full", None),
    (dict(distill_method="dist"), "top2", "correlates the teacher's full probability vectors"),
    (dict(distill_method="kd", logit_standardization=True), "top2", "logit_standardization needs the teacher's full"),
    (dict(distill_method="dkd"), "top2", r"label is outside them for \d+ entries"),
])
def test_cache_serves_each_objective_or_refuses(caches, make_args, kw, cache, error):
    from hf_distill.teacher_cache import with_teacher_cache

    raw, root, _ = caches
    train = with_teacher_cache(raw, str(root / cache), tiny_spec())
    build = lambda: DistillationTrainer(model=tiny_timm(seed=1), train_dataset=train,  # noqa: E731
                                        args=make_args(teacher_cache_dir=str(root / cache), max_steps=2, **kw))
    if error:
        with pytest.raises(ValueError, match=error):
            build()
    else:
        build().train()
