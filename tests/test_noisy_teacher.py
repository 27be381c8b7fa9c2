import pytest
import torch
from conftest import PlainClassifier, tiny_hf_resnet, tiny_timm

from hf_distill import DistillationTrainer
from hf_distill.data import collate_images
from hf_distill.losses import kd_loss, logit_mse, perturb_logits


def test_zero_sigma_or_zero_probability_gives_plain_targets_exactly():
    z = torch.randn(64, 10)
    assert perturb_logits(z, 0.0, 1.0) is z
    assert perturb_logits(z, 0.5, 0.0) is z


def test_perturbed_fraction_and_noise_variance_match_alpha_and_sigma():
    torch.manual_seed(0)
    z = torch.randn(20000, 10).abs() + 1.0  # away from 0 so the relative noise is measurable
    out = perturb_logits(z, 0.3, 0.25)
    changed = (out != z).any(-1)
    assert changed.float().mean().item() == pytest.approx(0.25, abs=0.01)
    xi = (out[changed] / z[changed] - 1.0)
    assert xi.mean().item() == pytest.approx(0.0, abs=0.01)
    assert xi.std().item() == pytest.approx(0.3, rel=0.02)
    assert torch.equal(out[~changed], z[~changed])


def test_same_seed_same_noise_and_fresh_noise_each_call():
    z = torch.randn(8, 10)
    torch.manual_seed(1)
    a, b = perturb_logits(z, 0.2, 0.5), perturb_logits(z, 0.2, 0.5)
    torch.manual_seed(1)
    assert torch.equal(perturb_logits(z, 0.2, 0.5), a)
    assert not torch.equal(a, b)


def _batch(train, n=16):
    return collate_images([train[i] for i in range(n)])


def test_noise_in_training_targets_but_never_in_evaluation(digits_small, make_args):
    train, evaluation = digits_small
    teacher = tiny_timm(seed=2)
    trainer = DistillationTrainer(model=tiny_hf_resnet(seed=1), teacher_model=teacher, train_dataset=train,
                                  eval_dataset=evaluation,
                                  args=make_args(distill_method="noisy_teacher", teacher_noise_prob=1.0))
    x = _batch(train)["pixel_values"]
    clean = teacher.eval()(x)
    noisy, _ = trainer.teacher_outputs(x, training=True)
    assert not torch.allclose(noisy, clean)
    assert torch.equal(trainer.teacher_outputs(x, training=False)[0], clean)
    assert torch.equal(trainer.teacher_logits(x), clean)
    # and in the loop: with noise this large (every sample, sigma 5) noisy logits would change the teacher's
    # predictions, yet the evaluated teacher accuracy is the clean teacher's, computed by hand
    loud = DistillationTrainer(model=trainer.student, teacher_model=teacher, eval_dataset=evaluation,
                               args=make_args(distill_method="noisy_teacher", teacher_noise_std=5.0,
                                              teacher_noise_prob=1.0))
    full = collate_images([evaluation[i] for i in range(len(evaluation))])
    with torch.no_grad():
        clean_logits = teacher.eval()(full["pixel_values"])
        clean = (clean_logits.argmax(-1) == full["labels"]).float().mean().item()
        torch.manual_seed(0)
        noisy_logits, _ = loud.teacher_outputs(full["pixel_values"], training=True)
    assert (noisy_logits.argmax(-1) != clean_logits.argmax(-1)).any()  # noise would show
    assert loud.evaluate()["eval_teacher_accuracy"] == pytest.approx(clean)


def test_noisy_teacher_preset_is_mse_regression_on_perturbed_logits(digits_small, make_args):
    train, _ = digits_small
    args = make_args(distill_method="noisy_teacher")
    assert (args.distill_loss, args.teacher_noise_std, args.teacher_noise_prob) == ("mse", 0.2, 0.5)
    student, teacher = tiny_hf_resnet(seed=1), tiny_timm(seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train)
    batch = _batch(train)
    trainer.model.train()
    torch.manual_seed(5)
    loss = trainer.compute_loss(trainer.model, batch)
    torch.manual_seed(5)
    with torch.no_grad():
        zs = trainer.model(pixel_values=batch["pixel_values"])["logits"]  # same BN mode, same batch
    torch.manual_seed(5)
    zt = perturb_logits(teacher(batch["pixel_values"]).float(), 0.2, 0.5)
    want, terms = kd_loss(zs, zt, batch["labels"], args.temperature, 0.9, "mse")
    assert "loss_mse" in terms
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert terms["loss_mse"].item() == pytest.approx(logit_mse(zs, zt).item(), rel=1e-6)


def test_user_values_override_the_preset(make_args):
    args = make_args(distill_method="noisy_teacher", distill_loss="kl", teacher_noise_std=0.05)
    assert (args.distill_loss, args.teacher_noise_std, args.teacher_noise_prob) == ("kl", 0.05, 0.5)
    with pytest.raises(ValueError, match="teacher_noise_prob"):
        make_args(teacher_noise_prob=1.5)
    with pytest.raises(ValueError, match="distill_loss"):
        make_args(distill_loss="l1")


def test_several_teachers_mean_equals_hand_average(digits_small, make_args):
    train, _ = digits_small
    teachers = [tiny_timm(seed=2), tiny_hf_resnet(seed=3), PlainClassifier(seed=4)]
    trainer = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=teachers, args=make_args(),
                                  train_dataset=train)
    x = _batch(train)["pixel_values"]
    want = (teachers[0](x) + teachers[1](pixel_values=x).logits + teachers[2](x)) / 3
    got, _ = trainer.teacher_outputs(x, training=True)  # no noise configured
    assert torch.allclose(got, want, atol=1e-6)


def test_random_ensemble_draws_one_teacher_per_batch(digits_small, make_args):
    train, _ = digits_small
    teachers = [tiny_timm(seed=2), tiny_timm(seed=3)]
    trainer = DistillationTrainer(model=tiny_timm(seed=1), teacher_model=teachers,
                                  args=make_args(teacher_ensemble="random"), train_dataset=train)
    x = _batch(train)["pixel_values"]
    singles = [t(x) for t in teachers]
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        got, _ = trainer.teacher_outputs(x, training=True)
        seen.add(next(i for i, s in enumerate(singles) if torch.equal(got, s)))
    assert seen == {0, 1}
    # evaluation uses the mean of all teachers
    assert torch.allclose(trainer.teacher_logits(x), (singles[0] + singles[1]) / 2)


def test_label_spaces_checked_across_all_teachers(make_args):
    with pytest.raises(ValueError, match=r"teacher 1 .*predicts 4"):
        DistillationTrainer(model=tiny_timm(), teacher_model=[tiny_timm(seed=2), tiny_hf_resnet(num_labels=4)],
                            args=make_args())


def test_noisy_training_runs_and_is_reproducible(digits_small, make_args):
    train, _ = digits_small
    finals = []
    for _ in range(2):
        student = tiny_hf_resnet(seed=1)
        DistillationTrainer(model=student, teacher_model=[tiny_timm(seed=2), tiny_timm(seed=3)], train_dataset=train,
                            args=make_args(distill_method="noisy_teacher", teacher_ensemble="random")).train()
        finals.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(finals[0], finals[1])
