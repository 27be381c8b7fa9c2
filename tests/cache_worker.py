"""Build a teacher-output cache, in one process or under ``torchrun`` (several processes).

Launched by tests/test_teacher_cache_processes.py. Usage:
``cache_worker.py CACHE_DIR [--die-after-shard N]``: with ``--die-after-shard`` the process that writes shard N
dies right after it (a build killed half-way, to be resumed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from conftest import tiny_spec, tiny_timm  # noqa: E402

from hf_distill.data import digits_dataset  # noqa: E402
from hf_distill.mixing import MixingConfig  # noqa: E402
from hf_distill.teacher_cache import build_teacher_cache  # noqa: E402


def main(cache_dir: str, die_after: int | None) -> None:
    torch.set_num_threads(1)
    raw = digits_dataset()["train"].select(range(100))

    def maybe_die(shard: int) -> None:
        if die_after is not None and shard == die_after:
            os._exit(3)  # killed: no clean-up, no manifest update by anyone else

    build_teacher_cache(tiny_timm("resnet18", seed=2), raw, tiny_spec(), cache_dir, epochs=2, augmentation="timm",
                        batch_size=16, shard_size=32, seed=0, mixing=MixingConfig(cutmix_alpha=1.0),
                        on_shard_written=maybe_die)


if __name__ == "__main__":
    die = int(sys.argv[sys.argv.index("--die-after-shard") + 1]) if "--die-after-shard" in sys.argv else None
    main(sys.argv[1], die)
