"""The fidelity benchmark compares our caches with other libraries' caches on equal terms."""

from __future__ import annotations

import math

import pytest
from transformers import DynamicCache

from kv_cache import KVCacheConfig
from kv_cache.fidelity import FidelityPlan, evaluate, format_table
from kv_cache.reference_model import load_reference_model

TINY = FidelityPlan(prompt_tokens=64, scored_tokens=16, windows=1, contexts=(256,), depths=(0.5,), probes=1)


def test_another_librarys_cache_is_a_row_and_our_full_cache_matches_it() -> None:
    rows = evaluate(
        load_reference_model(),
        {"full": KVCacheConfig(max_tokens=512), "DynamicCache": lambda config: DynamicCache(config=config)},
        TINY,
    )
    ours, theirs = rows
    assert ours.perplexity == pytest.approx(theirs.perplexity, rel=1e-4)  # paged attention vs SDPA, fp32
    assert theirs.agreement == 1.0 and theirs.needles == ours.needles
    assert ours.bytes_per_token > 0 and math.isnan(theirs.bytes_per_token)
    assert format_table(rows).splitlines()[2].split()[-2:] == ["-", "-"]  # memory not measured for theirs
