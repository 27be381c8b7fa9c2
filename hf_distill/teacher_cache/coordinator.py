"""The processes of a cache build (one, or those ``torchrun`` started) and the coordinator's plan: which shards
are still to build is decided once, by the main process, and given to every process alike, so that no two
processes can see the disk at different moments and disagree about who builds what."""

from __future__ import annotations

import torch

from .store import _shard_on_disk


def process_state():
    """accelerate's view of the processes (one, or those ``torchrun`` started). On a machine without a GPU it
    must be told so (``cpu=True``), or each torchrun process would believe it is alone. The processes wait
    for each other at the end of the build, after unequal shares of teacher passes: the timeout is long."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))


def shards_to_build(state, cache_dir: str, plan: list[tuple[int, int]]) -> list[int]:
    """The shards of ``plan`` not complete on disk, as the main process sees them, on every process.

    Each process then builds ``missing[process_index::num_processes]``: with one list for all, every shard
    is built exactly once (a process that looked after another had written a shard would skip it, and the
    shares would shift)."""
    missing = ([i for i, span in enumerate(plan) if not _shard_on_disk(cache_dir, i, span)]
               if state.is_main_process else None)
    if state.num_processes > 1:
        box = [missing]
        torch.distributed.broadcast_object_list(box, src=0)
        missing = box[0]
    return list(missing)
