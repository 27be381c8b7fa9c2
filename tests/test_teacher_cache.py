"""Teacher-output cache (FKD-style soft labels computed once): build, resume, refuse, replay, train."""

import json

import pytest
import torch
from conftest import PlainClassifier, tiny_hf_resnet, tiny_spec, tiny_timm
from transformers import TrainerState

from hf_distill import DistillationTrainer
from hf_distill.data import with_image_transform
from hf_distill.teachers import Teachers
from hf_distill.teacher_cache import (
    default_shard_size,
    MANIFEST_NAME,
    TeacherCacheCallback,
    TeacherCacheDataset,
    TeacherCacheError,
    build_teacher_cache,
    draw_view_params,
    load_teacher_cache,
    rebuild_logits,
    with_teacher_cache,
)


@pytest.fixture(scope="module")
def raw(digits):
    """Raw (untransformed) digits slices: the cache is built from and read with these."""
    train = digits["train"]
    return {n: train.select(range(n)) for n in (16, 32, 40, 48, 128)} | {"other16": train.select(range(16, 32))}


def _live(teachers, spec, x):
    """What the trainer computes: each teacher through its adapter, mean over teachers."""
    outs = Teachers(teachers, spec)(x)
    return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)


def _in_build_batches(fn, x, n, shard_size, batch_size):
    """``fn`` over ``x`` in the build's batches (they restart at every shard). CPU kernels are not
    batch-size invariant (last-bit differences), though a row's result does not depend on the
    other rows of a batch of the same size."""
    starts = [b for s in range(0, n, shard_size) for b in range(s, min(s + shard_size, n), batch_size)]
    return torch.cat([fn(x[b:min(b + batch_size, (b // shard_size + 1) * shard_size, n)]) for b in starts])


def _stack(ds, indices, key):
    return torch.stack([torch.as_tensor(ds[i][key]) for i in indices])


def test_default_shard_size_gives_several_builders_work(raw, tmp_path):
    # a small build still splits into many shards (one per process would leave the others idle)
    assert default_shard_size(1437, 64) == 64 and default_shard_size(14_370, 64) == 256
    assert default_shard_size(12_800_000, 256) == 9984  # capped near 10,000 entries, whole batches
    assert default_shard_size(10, 20_000) == 20_000  # never less than one batch
    build_teacher_cache(tiny_timm(seed=2), raw[48], tiny_spec(), tmp_path / "c", batch_size=8)
    manifest = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert manifest["config"]["shard_size"] == 8 and manifest["num_shards"] == 6

    def kill(shard):
        raise KeyboardInterrupt("killed")

    # a partial build (another shard size) resumes with its own shards when none is given
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(tiny_timm(seed=2), raw[48], tiny_spec(), tmp_path / "p", batch_size=8, shard_size=16,
                            on_shard_written=kill)
    written = []
    build_teacher_cache(tiny_timm(seed=2), raw[48], tiny_spec(), tmp_path / "p", batch_size=8,
                        on_shard_written=written.append)
    manifest = json.loads((tmp_path / "p" / MANIFEST_NAME).read_text())
    assert written == [1, 2] and manifest["config"]["shard_size"] == 16 and manifest["status"] == "complete"


def test_deterministic_views_cache_equals_live_teachers_bitwise(raw, tmp_path):
    spec = tiny_spec()
    # two teachers, one with its own normalisation: each goes through its own adapter, then the mean
    teachers = [tiny_timm(seed=2), tiny_hf_resnet(seed=3, spec=tiny_spec(mean=(0.3,), std=(0.2,)))]
    cache = build_teacher_cache(teachers, raw[48], spec, tmp_path / "c", epochs=3, batch_size=8, shard_size=20)
    manifest = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert manifest["status"] == "complete" and manifest["num_shards"] == 3 and manifest["num_classes"] == 10
    assert cache.stored_epochs == 1 and len(cache) == 48  # deterministic: one entry per sample whatever epochs

    ds = with_teacher_cache(raw[48], str(tmp_path / "c"), spec)
    plain = with_image_transform(raw[48], spec)  # the usual training data, augmentation "none"
    x = _stack(ds, range(48), "pixel_values")
    assert torch.equal(x, _stack(plain, range(48), "pixel_values"))
    want = _in_build_batches(lambda v: _live(teachers, spec, v), x, 48, shard_size=20, batch_size=8)
    assert torch.equal(_stack(ds, range(48), "teacher_logits"), want)
    assert [ds[i]["labels"] for i in range(48)] == raw[48]["label"][:48]
    ds.set_epoch(2)  # any epoch reads the single stored pass
    assert torch.equal(_stack(ds, range(48), "teacher_logits"), want)


def test_random_views_are_per_epoch_and_replay_exactly(raw, tmp_path):
    spec = tiny_spec()
    teacher = tiny_timm(seed=2)
    # 40 samples x 2 epochs in shards of 32: epoch 0 ends inside shard 1
    cache = build_teacher_cache(teacher, raw[40], spec, tmp_path / "c", epochs=2, augmentation="timm",
                                batch_size=8, shard_size=32, seed=7)
    assert cache.stored_epochs == 2 and len(cache) == 80
    ds = with_teacher_cache(raw[40], cache, spec)
    plain = _stack(with_image_transform(raw[40], spec), range(40), "pixel_values")
    views, logits = {}, {}
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        views[epoch] = _stack(ds, range(40), "pixel_values")
        logits[epoch] = _stack(ds, range(40), "teacher_logits")
        for i in range(40):  # stored parameters are the ones drawn from (seed, epoch, index)
            assert cache.params(epoch, i) == draw_view_params(7, epoch % 2, i, 8, 8, "timm")
        # the teacher on the replayed pixels, in the build's batches, gives the cached logits bit for bit
        live = torch.cat([_live([teacher], spec, views[epoch][b:b + 8]) for b in range(0, 40, 8)])  # = build's
        assert torch.equal(logits[epoch], live), epoch
    differs = [not torch.equal(views[0][i], views[1][i]) for i in range(40)]
    assert sum(differs) >= 35  # epoch 1 has its own views (a few may coincide by chance)
    assert not torch.equal(logits[0], logits[1])
    assert sum(not torch.equal(views[0][i], plain[i]) for i in range(40)) >= 35  # really augmented
    assert torch.equal(views[2], views[0]) and torch.equal(logits[2], logits[0])  # epoch 2 wraps to 0


def test_topk_rebuild_keeps_topk_and_mass(raw, tmp_path):
    spec = tiny_spec()
    teacher = PlainClassifier(seed=4)
    with torch.no_grad():  # peaky logits, so that the tail matters
        teacher.net[-1].weight.mul_(40.0)
    cache = build_teacher_cache(teacher, raw[32], spec, tmp_path / "c", top_k=3, batch_size=16, shard_size=32)
    ds = with_teacher_cache(raw[32], cache, spec)
    x = _stack(ds, range(32), "pixel_values")
    live = _in_build_batches(lambda v: _live([teacher], spec, v), x, 32, shard_size=32, batch_size=16)
    rebuilt = _stack(ds, range(32), "teacher_logits")
    values, indices = live.topk(3, dim=-1)
    assert torch.equal(rebuilt.gather(-1, indices), values)  # top-k logits stored exactly
    p, q = live.softmax(-1), rebuilt.softmax(-1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, indices, False)
    # temperature 1: top-k probabilities and total tail mass are right to float32 rounding
    assert torch.allclose(q.gather(-1, indices), p.gather(-1, indices), atol=1e-6, rtol=0)
    assert torch.allclose((q * tail).sum(-1), (p * tail).sum(-1), atol=1e-6, rtol=0)
    assert (p * tail).sum(-1).max() > 1e-3  # the tail is not negligible here
    for t in (0.5, 2.0, 4.0):
        pt, qt = (live / t).softmax(-1), (rebuilt / t).softmax(-1)
        assert torch.equal(qt.topk(3, -1).indices, indices)  # ordering kept at any temperature
        # within the top-k the distribution is exact at any temperature ...
        p_top, q_top = pt.gather(-1, indices), qt.gather(-1, indices)
        assert torch.allclose(q_top / q_top.sum(-1, keepdim=True), p_top / p_top.sum(-1, keepdim=True),
                              atol=1e-6, rtol=0)
        # ... so the L1 error is at most |m - m'| + m + m' with m, m' the true and rebuilt tail masses
        m, m_rebuilt = (pt * tail).sum(-1), (qt * tail).sum(-1)
        bound = (m - m_rebuilt).abs() + m + m_rebuilt
        assert ((pt - qt).abs().sum(-1) <= bound + 1e-6).all()


def test_rebuild_logits_bounds():
    torch.manual_seed(0)
    z = torch.randn(64, 100) * 4
    values, indices = z.topk(5, dim=-1)
    tail_lse = torch.logsumexp(z.scatter(-1, indices, float("-inf")), -1)
    full = rebuild_logits(values, indices, tail_lse, 100)
    tail = torch.ones_like(z, dtype=torch.bool).scatter(-1, indices, False)
    assert (full[tail].view(64, -1).max(-1).values <= values[:, -1]).all()  # below every top-k logit
    for t, sign in ((0.5, -1), (1.0, 0), (3.0, 1)):  # tail mass: under for T < 1, exact at 1, over for T > 1
        true_mass = ((z / t).softmax(-1) * tail).sum(-1)
        mass = ((full / t).softmax(-1) * tail).sum(-1)
        if sign == 0:
            assert torch.allclose(mass, true_mass, atol=1e-6)
        else:
            assert ((mass - true_mass) * sign >= -1e-6).all()


class _RecordingDataset(TeacherCacheDataset):
    served: list

    def __getitems__(self, indices):  # the DataLoader fetches whole batches through this
        self.served.extend((self.epoch, int(i)) for i in indices)
        return super().__getitems__(indices)


def test_kd_run_from_cache_equals_live_teacher_run(raw, make_args, tmp_path):
    spec = tiny_spec()
    # the build's batch size is the training batch size: kernels give bitwise the same rows then
    build_teacher_cache(tiny_timm(seed=2), raw[128], spec, tmp_path / "c", batch_size=16, shard_size=64)

    live_student = tiny_hf_resnet(seed=1)
    DistillationTrainer(model=live_student, teacher_model=tiny_timm(seed=2),
                        args=make_args(output_dir=str(tmp_path / "live"), temperature=2.0, alpha=0.7),
                        train_dataset=with_image_transform(raw[128], spec)).train()

    cached_student = tiny_hf_resnet(seed=1)
    train = with_teacher_cache(raw[128], str(tmp_path / "c"), spec)
    trainer = DistillationTrainer(
        model=cached_student, teacher_model=None,
        args=make_args(output_dir=str(tmp_path / "cached"), temperature=2.0, alpha=0.7,
                       teacher_cache_dir=str(tmp_path / "c")),
        train_dataset=train, callbacks=[TeacherCacheCallback(train)])
    assert len(trainer.teachers) == 0  # no teacher anywhere
    trainer.train()
    live_sd, cached_sd = live_student.state_dict(), cached_student.state_dict()
    for key in live_sd:
        assert torch.equal(live_sd[key], cached_sd[key]), key
    assert any(not torch.equal(v, tiny_hf_resnet(seed=1).state_dict()[k]) for k, v in cached_sd.items()
               if v.is_floating_point())  # it did train


def test_trainer_epochs_follow_the_cache(raw, make_args, tmp_path):
    spec = tiny_spec()
    cache = build_teacher_cache(tiny_timm(seed=2), raw[32], spec, tmp_path / "c", epochs=2, augmentation="timm",
                                batch_size=16, shard_size=64)
    train = _RecordingDataset(raw[32], cache, spec)
    train.served = []
    batches = []

    class Spy(DistillationTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            batches.append({k: v.detach().clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, *a, **kw)

    # 2 steps per epoch, 6 steps: epochs 0, 1, 2 (2 reads stored epoch 0). One process, no callback:
    # accelerate's DataLoaderShard.set_epoch reaches the dataset.
    Spy(model=PlainClassifier(seed=1), args=make_args(max_steps=6, teacher_cache_dir=str(tmp_path / "c")),
        train_dataset=train).train()
    assert [e for e, _ in train.served] == [0] * 32 + [1] * 32 + [2] * 32
    assert len(batches) == 6
    for b, batch in enumerate(batches):
        served = train.served[16 * b:16 * b + 16]
        want = torch.stack([cache.logits(e, i) for e, i in served])
        assert torch.equal(batch["teacher_logits"], want)
        replay = torch.stack([cache.render(raw[32][i]["image"], cache.params(e, i)) for e, i in served])
        assert torch.equal(batch["pixel_values"], replay)
    # epoch 0 and 1 saw different views of the same images
    first = {i: cache.render(raw[32][i]["image"], cache.params(0, i)) for i in range(32)}
    second = {i: cache.render(raw[32][i]["image"], cache.params(1, i)) for i in range(32)}
    assert sum(not torch.equal(first[i], second[i]) for i in range(32)) >= 28


def test_several_processes_need_the_callback(raw, tmp_path):
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader, RandomSampler

    spec = tiny_spec()
    cache = build_teacher_cache(tiny_timm(seed=2), raw[16], spec, tmp_path / "c", epochs=2, augmentation="timm")
    ds = with_teacher_cache(raw[16], cache, spec)
    # rank 0 of 2: accelerate 1.15 gives the epoch to the sampler, not to the dataset
    loader = prepare_data_loader(DataLoader(ds, batch_size=4, sampler=RandomSampler(ds)), num_processes=2,
                                 process_index=0, put_on_device=False, use_seedable_sampler=True)
    loader.set_epoch(1)
    assert ds.epoch == 0
    callback, state = TeacherCacheCallback(ds), TrainerState()
    for epoch, want in ((1.0, 1), (1.5, 1), (2.9999999, 3), (0.0, 0)):  # resumed mid-epoch: floor
        state.epoch = epoch
        callback.on_epoch_begin(None, state, None)
        assert ds.epoch == want


def test_mismatched_cache_is_refused(raw, tmp_path):
    spec = tiny_spec()
    teacher = tiny_timm(seed=2)
    build_teacher_cache(teacher, raw[16], spec, tmp_path / "c", teacher_id="org/teacher", teacher_revision="v1")
    load_teacher_cache(tmp_path / "c", dataset=raw[16], student_spec=spec, teachers=teacher,
                       teacher_id="org/teacher", teacher_revision="v1")  # the right inputs pass
    with pytest.raises(TeacherCacheError, match="fingerprint of the teacher weights"):
        load_teacher_cache(tmp_path / "c", teachers=tiny_timm(seed=5))
    with pytest.raises(TeacherCacheError, match="dataset fingerprint"):
        load_teacher_cache(tmp_path / "c", dataset=raw["other16"])
    with pytest.raises(TeacherCacheError, match="student input spec"):
        load_teacher_cache(tmp_path / "c", student_spec=tiny_spec(mean=(0.4,)))
    with pytest.raises(TeacherCacheError, match="teacher_revision"):
        load_teacher_cache(tmp_path / "c", teacher_revision="v2")
    with pytest.raises(TeacherCacheError) as err:  # every difference is listed
        load_teacher_cache(tmp_path / "c", dataset=raw[32], student_spec=tiny_spec(size=24), teacher_id="org/other")
    message = str(err.value)
    assert all(s in message for s in ("dataset length", "image_size", "teacher_id", "org/other"))
    cache = load_teacher_cache(tmp_path / "c")
    with pytest.raises(TeacherCacheError, match="dataset fingerprint"):
        with_teacher_cache(raw["other16"], cache, spec)
    with pytest.raises(TeacherCacheError, match="student input spec"):
        with_teacher_cache(raw[16], cache, tiny_spec(std=(0.25,)))
    with pytest.raises(ValueError, match="raw image dataset"):
        with_teacher_cache(with_image_transform(raw[16], spec), cache, spec)

    # building into the folder from other inputs refuses; overwrite=True rebuilds from scratch
    other = tiny_timm(seed=5)
    with pytest.raises(TeacherCacheError, match=r"built from other inputs(.|\n)*teacher weights"):
        build_teacher_cache(other, raw[16], spec, tmp_path / "c", teacher_id="org/teacher", teacher_revision="v1")
    rebuilt = build_teacher_cache(other, raw[16], spec, tmp_path / "c", overwrite=True)
    load_teacher_cache(tmp_path / "c", teachers=other)
    x = _stack(with_teacher_cache(raw[16], rebuilt, spec), range(16), "pixel_values")  # one batch of 16
    assert torch.equal(torch.stack([rebuilt.logits(0, i) for i in range(16)]), _live([other], spec, x))


def test_partial_cache_is_refused_and_resume_equals_full_build(raw, tmp_path):
    spec = tiny_spec()
    kw = dict(epochs=2, augmentation="timm", batch_size=8, shard_size=16, seed=3)  # 80 entries, 5 shards

    def kill_after(n):
        def hook(shard):
            if shard == n - 1:
                raise KeyboardInterrupt("killed")
        return hook

    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(tiny_timm(seed=2), raw[40], spec, tmp_path / "c", on_shard_written=kill_after(2), **kw)
    manifest = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert manifest["status"] == "partial" and [s["file"] for s in manifest["shards"]] == [
        "shard-00000.arrow", "shard-00001.arrow"]
    with pytest.raises(TeacherCacheError, match="partial .*2 of 5 shards"):
        load_teacher_cache(tmp_path / "c")
    with pytest.raises(TeacherCacheError, match="partial"):
        with_teacher_cache(raw[40], str(tmp_path / "c"), spec)
    with pytest.raises(TeacherCacheError, match="built from other inputs(.|\n)*seed"):  # resume needs the same inputs
        build_teacher_cache(tiny_timm(seed=2), raw[40], spec, tmp_path / "c", **{**kw, "seed": 4})

    written = []
    resumed = build_teacher_cache(tiny_timm(seed=2), raw[40], spec, tmp_path / "c", on_shard_written=written.append,
                                  **kw)
    assert written == [2, 3, 4]  # from the last complete shard on
    full = build_teacher_cache(tiny_timm(seed=2), raw[40], spec, tmp_path / "full", **kw)
    assert resumed.config == full.config
    a, b = resumed.data[:], full.data[:]
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    build_teacher_cache(tiny_timm(seed=2), raw[40], spec, tmp_path / "c", on_shard_written=written.append, **kw)
    assert written == [2, 3, 4]  # complete: nothing recomputed
