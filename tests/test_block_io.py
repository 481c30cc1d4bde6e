"""block_io: run expansion against a plain Python loop (the writes and seals are tested through the store)."""

from __future__ import annotations

import pytest
import torch

from kv_cache.block_io import Run, expand_runs


@pytest.mark.parametrize("seed", range(5))
def test_expand_runs_matches_a_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    runs: list[Run] = [
        (int(torch.randint(0, 1000, (1,), generator=gen)), int(torch.randint(0, 1000, (1,), generator=gen)), length)
        for length in torch.randint(1, 20, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
    ]
    firsts, seconds = expand_runs(runs, torch.device("cpu"))
    assert firsts.tolist() == [first + t for first, _, length in runs for t in range(length)]
    assert seconds.tolist() == [second + t for _, second, length in runs for t in range(length)]
    assert firsts.dtype == seconds.dtype == torch.long
