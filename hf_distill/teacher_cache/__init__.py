"""Teacher-output cache: soft labels computed once, read back at every epoch (FKD-style).

Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (ECCV 2022):
the teacher runs once over the training images - once per epoch when the views are random -
and each view's soft labels are stored together with the parameters of the view, so that
training replays exactly the view the teacher saw and never runs the teacher.

    cache = build_teacher_cache(teacher, train_raw, input_spec(student), "cache/", epochs=3,
                                augmentation="timm", top_k=None)
    train = with_teacher_cache(train_raw, cache, input_spec(student))
    args = DistillationTrainingArguments(..., teacher_cache_dir="cache/")
    trainer = DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=train,
                                  callbacks=[TeacherCacheCallback(train)])

On disk (``cache_dir``)::

    cache_info.json        manifest: status ("partial" | "complete"), what the cache was built from
                           ("config": teachers and their weight fingerprints, teacher id/revision,
                           student input spec, transform, dataset fingerprint/length, epochs, top_k, ...),
                           num_classes, num_entries and the list of complete shards
    shard-00000.arrow      ``datasets`` Arrow files (``Dataset.from_file``), ``shard_size`` entries each
    shard-00001.arrow      ...

Entry ``g`` (global row number over the shards, in order) holds view ``index = g % N`` of epoch
``g // N`` (``N = len(dataset)``). Columns: ``index`` (int64), ``epoch`` (int32), ``label`` (int64,
the dataset's label, for checks), the view parameters ``crop_top, crop_left, crop_height,
crop_width`` (int32, a box of the original image) and ``flip`` (bool), then either ``logits``
(float32 ``[C]``) or, with ``top_k``, ``topk_values`` (float32 ``[k]``, descending), ``topk_indices``
(int32 ``[k]``) and ``tail_logsumexp`` (float32: logsumexp of the ``C - k`` other logits).

Transforms (``augmentation``):

* ``"none"``: resize to the student's size + normalise (:func:`hf_distill.data.build_transform`,
  the same pixels as ``with_image_transform(..., augmentation="none")``). Deterministic, so one
  entry per sample whatever ``epochs`` says; the stored box is the whole image, ``flip`` False.
* ``"timm"``: the geometry of timm's training transform: random-resized-crop (scale (0.08, 1),
  ratio (3/4, 4/3), torchvision's sampling algorithm, the student's interpolation) then a
  horizontal flip with probability 0.5. No colour jitter (it is not a geometric view and would
  have to be stored too). The parameters of ``(epoch, index)`` come from
  ``numpy.random.default_rng([seed, epoch, index])``: they do not depend on the batch size, the
  shard size or on resuming, and are stored, so replay (``torchvision.transforms.functional``
  crop-resize-flip of the stored box) gives exactly the view the teacher saw.

Several teachers: each gets its own input adapter (:class:`hf_distill.teachers.Teachers`) and the
cache stores the mean of their logits (``teacher_ensemble="mean"``; ``"random"`` cannot be cached).

Exactness: full logits are stored as the float32 the teacher produced, so training reads bit for
bit what the teacher computed on the replayed view. A cached run equals a live-teacher run bit for
bit when the build's ``batch_size`` equals the training batch size (and the precision is the
same: the live trainer runs the teacher under autocast with --bf16/--fp16 on an accelerator,
the build in ``dtype``): CPU/GPU kernels are not batch-size invariant (other batch sizes differ in
the last bits, ~1e-7), though a row's result does not depend on the other rows of a batch of the
same size (on CPU; cuDNN may choose algorithms per call). ``top_k`` is lossy: see
:func:`rebuild_logits`.

Mismatch policy: :func:`build_teacher_cache` on a folder whose manifest was built from other
inputs **refuses** (listing the differences) unless ``overwrite=True``, which deletes the
cache's files and rebuilds it from scratch. The same inputs resume a partial cache from its
last complete shard, or return a complete one without running the teacher.
:func:`load_teacher_cache` refuses a partial cache and any difference from what it is given.

Epochs: :class:`TeacherCacheDataset` has ``set_epoch(epoch)`` and serves the entries of epoch
``epoch % stored_epochs``. In one process, accelerate's ``DataLoaderShard.set_epoch`` (called by
the Trainer before each epoch, and by ``DataLoaderShard.__iter__``) forwards the epoch to the
dataset. With several processes the sampler is wrapped in a ``BatchSamplerShard`` and accelerate
1.15 does *not* forward it to the dataset: add :class:`TeacherCacheCallback` (it sets the epoch at
``on_epoch_begin`` from ``state.epoch``; harmless in one process). Dataloader workers get the epoch
when they are started at each epoch; ``dataloader_persistent_workers=True`` would freeze it.

Layout: :mod:`.views` (view parameters and their replay), :mod:`.store` (manifest, shards, what a cache was
built from), :mod:`.coordinator` (the processes of a build and the shard plan decided once),
:mod:`.build` (:func:`build_teacher_cache`), :mod:`.reading` (:class:`TeacherCache`, lazy per-row reads)
and :mod:`.dataset` (training data).
"""

from .build import build_teacher_cache
from .coordinator import process_state, shards_to_build
from .dataset import TeacherCacheCallback, TeacherCacheDataset, with_teacher_cache
from .reading import TeacherCache, load_teacher_cache
from .store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TeacherCacheError,
    default_shard_size,
    rebuild_logits,
    teacher_fingerprint,
)
from .views import AUGMENTATIONS, HFLIP_PROB, RRC_RATIO, RRC_SCALE, ViewParams, draw_view_params, render_view

__all__ = [
    "TeacherCache",
    "TeacherCacheCallback",
    "TeacherCacheDataset",
    "TeacherCacheError",
    "ViewParams",
    "build_teacher_cache",
    "load_teacher_cache",
    "rebuild_logits",
    "teacher_fingerprint",
    "with_teacher_cache",
]
