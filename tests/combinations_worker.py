"""The combination matrix's cases of two processes, under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Launched by tests/combinations.py. Usage: ``combinations_worker.py FOLDER [CASE INDEX ...]`` (all by default). Every rank runs every case of
two processes in order (each case's trainer spans both ranks); rank 0 writes ``FOLDER/two/results.json``:
``{case index: [outcome, detail]}``, an unexpected error recorded as ``["error", traceback tail]``.
"""

import json
import logging
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from combinations import Data, cases, run_case  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    folder = os.path.join(sys.argv[1], "two")
    state = PartialState(cpu=True)  # the process group every case's trainer joins (cpu=True: else each is alone)
    data = Data(folder)
    results, only = {}, {int(i) for i in sys.argv[2:]}
    for i, (_, case) in enumerate(cases()):
        if case["processes"] != "2" or (only and i not in only):
            continue
        try:
            results[i] = run_case(case, data, os.path.join(folder, f"case{i}"))
        except Exception:
            results[i] = ("error", traceback.format_exc()[-1500:])
        state.wait_for_everyone()
    if state.is_main_process:
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump(results, f)
