"""Importing kv_cache changes no global setting: torch flags, default dtype, threads, transformers registries."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, torch
from transformers import AttentionInterface

def settings():
    return {
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "default_dtype": str(torch.get_default_dtype()),
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "attention": sorted(AttentionInterface._global_mapping),
    }

before = settings()
import kv_cache, kv_cache.hf_attention, kv_cache.engine, kv_cache.attention, kv_cache.tiers  # noqa: E401
print(json.dumps({"before": before, "after": settings()}))
"""


def test_import_changes_no_global_setting() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["before"] == probe["after"]
    assert "kv_cache_paged" not in probe["after"]["attention"]  # registration is an explicit call
