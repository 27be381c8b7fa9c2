"""Where the teachers' outputs come from, decided once, at construction.

A run's teacher outputs come from the live teachers (one, or an ensemble: their mean or one drawn per
batch; whole or FSDP2-sharded over the processes) or from a teacher-output cache (logits or backbone
features; mixed views replayed). :class:`TeacherSource` hides which: the trainer asks it for a
batch's teacher outputs, in training and in evaluation, and never asks where they come from. It owns
the teachers' input preparation (the adapters of :class:`~hf_distill.teachers.Teachers`), the
ensemble mean, the noisy-teacher perturbation, and the evaluation logits, computed once per example.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import nullcontext

import torch

from ..losses import perturb_logits
from .ensemble import Teachers

logger = logging.getLogger(__name__)

CACHED_FEATURES = "teacher_features/"  # a feature cache's batch keys: teacher_features/<teacher>/<target>


class TeacherSource:
    """The teachers' outputs for a batch of student inputs, without autograd.

    Logits come as one tensor (the ensemble's mean, perturbed in training for a noisy teacher); tapped
    features as ``{layer: tensor}`` (hints come from the first teacher); backbone features as
    ``{"<teacher index>/summary", "<teacher index>/spatial"}``, as a feature cache stores them.
    """

    def __init__(self, teachers: Teachers, method, args, cache=None, autocast=nullcontext,
                 eval_logits: dict[bytes, torch.Tensor] | None = None):
        self.teachers, self.method, self.args, self.cache = teachers, method, args, cache
        self._autocast = autocast
        # evaluation logits per example, keyed by its pixels: the frozen teachers give an image the same
        # logits whatever batch, batch size or dataset it comes in (kept across search trials)
        self.eval_logits_by_example = eval_logits if eval_logits is not None else {}

    def __len__(self) -> int:
        return len(self.teachers)

    @property
    def gives_logits(self) -> bool:
        """Whether the evaluation can score the teachers' logits (live teachers of a logit method)."""
        return len(self.teachers) > 0 and self.method.uses_teacher and self.method.teacher_output == "logits"

    def outputs(self, inputs: dict, pixel_values: torch.Tensor, stage, training: bool
                ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(target logits or None, features) for one batch: read from the cache when the training batch carries
        them, else computed by the live teachers (as far as ``stage`` needs them)."""
        method = self.method
        if not method.uses_teacher:
            return None, {}
        cached = self.cache is not None and training
        if method.teacher_output == "features":
            if cached and any(k.startswith(CACHED_FEATURES) for k in inputs):
                return None, {k[len(CACHED_FEATURES):]: v for k, v in inputs.items() if k.startswith(CACHED_FEATURES)}
            return None, self.feature_maps(pixel_values)
        if cached and inputs.get("teacher_logits") is not None:
            # soft labels read from the cache: the teacher does not run at all (a cache holds no tapped features:
            # a method that taps the teacher is refused one at construction)
            return self._combine([inputs["teacher_logits"].float()], training), {}
        return self.live(pixel_values, training, logits=not training or stage is None or stage.teacher_logits)

    def live(self, pixel_values: torch.Tensor, training: bool = False, logits: bool = True
             ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The live teachers' (logits, tapped features). In training, ``teacher_ensemble="random"`` runs one
        teacher drawn per batch and each teacher's logits are perturbed (noisy teacher) before the mean; the
        randomness is the global torch RNG's (seeded by ``args.seed``, restored on resume)."""
        n = len(self.teachers)
        if not n:
            return None, {}
        with self._autocast():
            if not logits:
                return None, self.teachers.features_only(pixel_values)  # e.g. FitNets' hint stage
            which = [int(torch.randint(n, (1,)).item())] if training and n > 1 and \
                self.args.teacher_ensemble == "random" else None
            outs = self.teachers(pixel_values, which)
        return self._combine(outs, training), self.teachers.pop_features()

    def _combine(self, outs: list[torch.Tensor], training: bool) -> torch.Tensor:
        if training:
            outs = [perturb_logits(z, self.args.teacher_noise_std, self.args.teacher_noise_prob) for z in outs]
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)

    def feature_maps(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every live teacher's backbone features, named as a feature cache names them."""
        with self._autocast():
            outs = self.teachers.backbone_features(pixel_values)
        # contiguous, as a feature cache gives them back: the loss then rounds the same way either way
        return {f"{i}/{name}": value.contiguous() for i, (summary, spatial) in enumerate(outs)
                for name, value in (("summary", summary), ("spatial", spatial))}

    def eval_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The teachers' clean logits of an evaluation batch (on the CPU), each example's computed once."""
        rows = pixel_values.detach().cpu().contiguous()
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in rows]
        known = [self.eval_logits_by_example.get(k) for k in keys]
        if any(v is None for v in known) or self.teachers.sharded:  # a sharded forward needs every process
            logits = self.live(pixel_values)[0].float().cpu()
            self.eval_logits_by_example.update(zip(keys, logits))
            return logits
        return torch.stack(known)


def teacher_dtype(args) -> torch.dtype:
    """``teacher_dtype``: "auto" is bf16 / fp16 with ``--bf16`` / ``--fp16`` on an accelerator, else float32."""
    choice = args.teacher_dtype
    if choice == "auto":
        on_accelerator = args.device.type not in ("cpu", "mps")
        if args.bf16 and on_accelerator:
            return torch.bfloat16
        if args.fp16 and on_accelerator:
            return torch.float16
        return torch.float32
    return getattr(torch, choice)


def place_teachers(teachers: Teachers, args, num_processes: int) -> None:
    """Cast, shard (``teacher_sharding``), move, lay out (``channels_last``) and compile the teachers, once."""
    if not len(teachers):
        return
    dtype = teacher_dtype(args)
    if args.teacher_sharding == "fsdp" and num_processes > 1:
        # cast where the teachers are (host memory), then shard: fully_shard moves one block at a time to the
        # device and keeps its shard there, so a whole teacher is never on one device
        teachers.to(dtype=dtype)
        _shard(teachers, args, num_processes)
    elif args.teacher_sharding == "fsdp":
        logger.warning("teacher_sharding='fsdp' with a single process: the teacher stays whole")
    teachers.to(device=args.teacher_device or args.device, dtype=dtype)
    if args.channels_last:
        teachers.to(memory_format=torch.channels_last)
    if args.teacher_compile_options is not None:
        teachers.compile(**args.teacher_compile_options)  # compiled at the first step, placed and cast


def _shard(teachers: Teachers, args, world: int) -> None:
    """FSDP2 over all processes for every teacher (after the cast: the shards are in teacher_dtype)."""
    from torch.distributed.device_mesh import init_device_mesh

    from ..models import count_parameters
    from .sharding import local_parameter_count, shard_teacher

    mesh = init_device_mesh(args.device.type, (world,))
    for teacher in teachers.models:
        shard_teacher(teacher, mesh)
    teachers.sharded = True
    logger.info("teachers sharded over %d processes: %d of %d parameters held here", world,
                sum(local_parameter_count(t) for t in teachers.models),
                sum(count_parameters(t) for t in teachers.models))


def open_teacher_cache(args, method, teachers, train_dataset):
    """The teacher-output cache named by ``teacher_cache_dir`` (None without one), checked against the run now
    rather than at the first step: what the method needs, the training data, the mixing, the teachers."""
    from ..teacher_cache import TeacherCacheDataset, load_teacher_cache

    if not args.teacher_cache_dir:  # (a train_dataset that reads a cache has named it already)
        return None
    cache = load_teacher_cache(args.teacher_cache_dir)  # refuses a missing or partial cache
    check_teacher_cache(args, method, cache)
    if train_dataset is not None:
        if not isinstance(train_dataset, TeacherCacheDataset):
            raise ValueError(
                f"teacher_cache_dir='{args.teacher_cache_dir}' is set but train_dataset does not read from it: pass "
                "train_dataset=with_teacher_cache(raw_dataset, teacher_cache_dir, input_spec(student))")
        if os.path.realpath(train_dataset.cache.cache_dir) != os.path.realpath(args.teacher_cache_dir):
            raise ValueError(f"train_dataset reads the teacher cache in '{train_dataset.cache.cache_dir}' but "
                             f"teacher_cache_dir is '{args.teacher_cache_dir}'")
    if teachers:
        # the teachers named here are the ones cards and eval_teacher_accuracy report: they must be the cache's
        cache.check(teachers=teachers)
    return cache


def check_teacher_cache(args, method, cache) -> None:
    """Refuse a cache this run's method and settings cannot read (checked again for every search trial)."""
    if not method.uses_teacher:
        raise ValueError(f"distill_method='{args.distill_method}' uses no teacher outputs: drop teacher_cache_dir")
    if method.layers().teacher:
        raise ValueError(f"distill_method='{args.distill_method}' needs the teacher's intermediate features, which "
                         "a teacher-output cache does not hold (it stores logits, or the backbone features of "
                         "distill_method='feature'): drop teacher_cache_dir, or use a logit method (kd, dkd, dist, "
                         "noisy_teacher, function_matching)")
    if args.teacher_ensemble == "random":
        raise ValueError("teacher_ensemble='random' cannot be served from a teacher-output cache, which stores the "
                         "mean of the teachers' logits: use teacher_ensemble='mean' or train with live teachers")
    if args.dataloader_persistent_workers:
        raise ValueError("dataloader_persistent_workers would freeze the cached epoch in the workers (cached views "
                         "change every epoch): leave it off with teacher_cache_dir")
    wanted = "features" if method.teacher_output == "features" else "logits"
    if cache.outputs != wanted:
        raise ValueError(f"the teacher cache in {args.teacher_cache_dir} holds the teachers' {cache.outputs}, but "
                         f"distill_method='{args.distill_method}' learns their {wanted}: build a cache of "
                         f"{wanted} (hf-distill cache-teacher --distill_method {args.distill_method})")
    method.check_teacher_cache(cache)  # what this objective needs from the stored outputs
    check_cache_mixing(args, cache)


def check_cache_mixing(args, cache) -> None:
    """A mixed cache stores whole mixed batches: the run must mix the same way, in batches of the same size."""
    data_seed = args.data_seed if args.data_seed is not None else args.seed
    cache.check(mixing=args.mixing, batch_size=args.per_device_train_batch_size,
                seed=data_seed if cache.mixed else None)
    per_round = args.per_device_train_batch_size * args.world_size
    if cache.mixed and args.world_size > 1 and cache.num_samples % per_round and not args.dataloader_drop_last:
        raise ValueError(f"a mixed cache of {cache.num_samples} images on {args.world_size} processes: accelerate "
                         f"would pad the epoch's last round of {per_round} with images whose stored mixing "
                         "partners are elsewhere; set dataloader_drop_last=True (or a dataset size that is a "
                         "multiple of the batch size times the processes)")
