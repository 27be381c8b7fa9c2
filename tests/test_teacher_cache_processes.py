"""A teacher-output cache built by 2 processes (torchrun, gloo on CPU) equals a 1-process build, also after
a process dies half-way and the build is resumed."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "cache_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cache_dir, processes: int, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    if processes == 1:
        cmd = [sys.executable, WORKER, str(cache_dir), *extra]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
        cmd = [torchrun, "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port",
               str(_port()), WORKER, str(cache_dir), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _shards(cache_dir):
    from datasets import Dataset

    names = sorted(n for n in os.listdir(cache_dir) if n.startswith("shard-") and n.endswith(".arrow"))
    return names, [Dataset.from_file(os.path.join(cache_dir, n)).with_format("numpy", dtype=None)[:] for n in names]


def test_two_processes_build_the_same_cache_as_one_even_after_a_kill(tmp_path):
    from hf_distill.teacher_cache import TeacherCacheError, load_teacher_cache

    one = _run(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    # 100 images x 2 epochs of mixed batches of 16 (7 per epoch), 2 batches per shard: 7 shards
    killed = _run(tmp_path / "two", 2, "--die-after-shard", "1")
    assert killed.returncode != 0
    with pytest.raises(TeacherCacheError, match="partial"):
        load_teacher_cache(tmp_path / "two")
    written, _ = _shards(tmp_path / "two")
    assert 0 < len(written) < 7  # killed half-way, its shards on disk
    resumed = _run(tmp_path / "two", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    names_one, data_one = _shards(tmp_path / "one")
    names_two, data_two = _shards(tmp_path / "two")
    assert names_one == names_two and len(names_one) == 7
    for a, b in zip(data_one, data_two):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), key
    cache = load_teacher_cache(tmp_path / "two")
    assert cache.mixed and cache.manifest["status"] == "complete" and len(cache) == 200
