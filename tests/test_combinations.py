"""The combination matrix (issue 24): all-pairs cases over method x teacher source x precision x processes x mixing x
data x lifecycle (the cases of two processes in one torchrun launch); each supported case trains, evaluates and meets its invariants, each unsupported one is refused at
construction in one line (tests/combinations.py); docs/combinations.md is the generated table."""

from itertools import product

import pytest
from combinations import DIMENSIONS, DOC, REFUSALS, _pairs, all_pairs, broken_rules, cases, is_open, run_all, table


def test_all_pairs_covers_every_pair_a_supported_case_can_hold():
    names = list(DIMENSIONS)
    space = [dict(zip(names, v)) for v in product(*DIMENSIONS.values())]
    supported = [c for c in space if not broken_rules(c) and not is_open(c)]
    generated = all_pairs(DIMENSIONS, lambda c: not broken_rules(c) and not is_open(c))
    assert all(c in supported for c in generated)
    assert set().union(*map(_pairs, generated)) == set().union(*map(_pairs, supported))  # computed independently
    assert len(generated) < len(supported) / 5  # CI-sized: 37 of the supported combinations
    rules = [r for r, _ in cases() if r is not None]
    assert rules == [name for name, _ in REFUSALS]  # one case per refusal rule, breaking that rule alone


@pytest.mark.filterwarnings("ignore")
def test_every_case_trains_or_is_refused_in_one_line_and_the_doc_is_current(tmp_path):
    results, _ = run_all(str(tmp_path))  # raises at the first case that neither trains nor is refused as expected
    with open(DOC) as f:
        assert f.read() == table(results), "docs/combinations.md is stale: python tests/combinations.py"
