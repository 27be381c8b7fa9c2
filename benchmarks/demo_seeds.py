"""The embedded demo over several seeds (the seed also picks the split and the labelled subset).

    python benchmarks/demo_seeds.py 0 1 2 3 4      # one thread per process; results/demo_seeds.json
"""
import json
import sys
from pathlib import Path

import torch

from hf_distill.demo import run_demo

torch.set_num_threads(1)
out = {}
for seed in [int(s) for s in sys.argv[1:]]:
    out[seed] = run_demo(f"/tmp/demo_seed{seed}", seed=seed, print_fn=lambda *a, **k: None)
    print(seed, out[seed], flush=True)
    (Path(__file__).parent / "results" / "demo_seeds.json").write_text(json.dumps(out, indent=1))
