"""Bad inputs, continued: the command line's options, the engine's requests and settings, the Hugging Face cache.

The CLI answers a bad option with its documented exit code (2: bad usage, 3: invalid configuration or input) and
a message naming the option, never a traceback; the engine and `KVCache` raise `CacheValidationError` naming the
argument and keep working.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from kv_cache import CacheValidationError, KVCache, KVCacheConfig
from kv_cache.cli import main
from kv_cache.engine import EngineConfig, InvariantCheck, KVCacheEngine, SamplingParams

from .test_bad_inputs import HEADS, Case, kv, params

CLI = [
    (["inspect", "--layers", "0"], 2, "--layers: '0' is not an int >= 1"),
    (["inspect", "--kv-heads", "-1"], 2, "--kv-heads"),
    (["inspect", "--head-dim", "x"], 2, "--head-dim: 'x'"),
    (["inspect", "--head-dim", "3"], 3, "head_dim=3"),
    (["inspect", "--group-size", "0"], 2, "--group-size"),
    (["inspect", "--budget-mb", "nan"], 2, "--budget-mb: 'nan' is not a finite number"),
    (["inspect", "--budget-mb", "-5"], 2, "--budget-mb"),
    (["inspect", "--dtype", "int8"], 2, "--dtype: invalid choice"),
    (["generate", "x", "--bits", "3"], 2, "--bits: invalid choice"),
    (["generate", "x", "--max-new-tokens", "-1"], 2, "--max-new-tokens"),
    (["generate", "x", "--max-tokens", "0"], 3, "max_tokens=0"),
    (["generate", "x", "--block-size", "12"], 3, "block_size=12"),
    (["generate", "x", "--token-budget", "0"], 3, "token_budget=0"),
    (["generate", "x", "--compression-ratio", "1.5"], 3, "compression_ratio=1.5"),
    (["generate", "x", "--residual-tokens", "-64"], 2, "--residual-tokens"),
    (["generate", "x", "--strategy", "mru"], 2, "--strategy: invalid choice"),
    (["generate", "x", "--model", "/nonexistent"], 3, "config.json"),
    (["generate"], 2, "prompt"),
    (["eval", "--configs", "nope"], 2, "unknown configs \\['nope'\\]"),
    (["demo", "--new-tokens", "0"], 2, "--new-tokens"),
    (["demo", "--bits", "3"], 2, "--bits: invalid choice"),
    (["bench", "--metrics-port", "70000"], 2, "--metrics-port: '70000' is not a TCP port"),
    (["bench", "--metrics-port", "-1"], 2, "--metrics-port"),
    (["bench", "--benchmarks", "/nonexistent"], 3, "--benchmarks '/nonexistent' holds no append.py"),
    (["nosuchcommand"], 2, "invalid choice"),
    ([], 2, "command"),
]


@pytest.mark.parametrize(("argv", "code", "message"), CLI, ids=[" ".join(argv) or "nothing" for argv, _, _ in CLI])
def test_bad_cli_options_exit_with_their_code_and_name_the_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], code: int, message: str
) -> None:
    if argv[:1] == ["bench"]:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert exit_code(argv) == code
    errors = capsys.readouterr().err
    assert "Traceback" not in errors and re.search(message, errors), errors


def test_bench_refuses_an_output_folder_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    assert exit_code(["bench", "--quick", "--out", str(tmp_path / "taken")]) == 3
    assert "--out" in capsys.readouterr().err
    assert exit_code(["inspect", "--layers", "2", "--json"]) == 0  # and the next command works


def exit_code(argv: list[str]) -> int:
    """`main(argv)`'s exit code, whether it returns one or argparse exits."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    """A random tiny Llama for the engine (which switches it to the paged attention)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


ENGINE_SETTINGS = [
    (EngineConfig, {"prefill_chunk_size": 0}, "prefill_chunk_size=0"),
    (EngineConfig, {"max_num_seqs": True}, "max_num_seqs=True"),
    (EngineConfig, {"oom_retries": -1}, "oom_retries=-1"),
    (EngineConfig, {"preemption_mode": "evict"}, "preemption_mode='evict'"),
    (EngineConfig, {"preemption_mode": "swap"}, "needs a CPU tier"),
    (EngineConfig, {"invariant_check": "always"}, "invariant_check='always'"),
    (EngineConfig, {"namespace": 5}, "namespace=5"),
    (EngineConfig, {"cpu_tier_mb": float("nan")}, "cpu_tier_mb=nan"),
    (EngineConfig, {"cpu_tier_blocks": 4, "cpu_tier_mb": 1}, "cpu_tier_blocks=4 and cpu_tier_mb=1"),
    (SamplingParams, {"max_new_tokens": 0}, "max_new_tokens=0"),
    (SamplingParams, {"temperature": -1}, "temperature=-1"),
    (SamplingParams, {"top_p": 0}, "top_p=0"),
    (SamplingParams, {"top_k": 0}, "top_k=0"),
    (SamplingParams, {"seed": "x"}, "seed='x'"),
]


@pytest.mark.parametrize(("kind", "options", "match"), ENGINE_SETTINGS, ids=[m for _, _, m in ENGINE_SETTINGS])
def test_bad_engine_settings_name_the_field(kind: type, options: dict, match: str) -> None:
    with pytest.raises(CacheValidationError, match=match):
        kind(**options)


class EngineUnderTest:
    """A small engine with one finished request; `check()` proves it still serves requests and its pool is whole."""

    def __init__(self, model: PreTrainedModel) -> None:
        config = KVCacheConfig(num_blocks=32, block_size=4, max_tokens=64, device="cpu")
        self.engine = KVCacheEngine(model, config, EngineConfig(invariant_check=InvariantCheck.EVERY_STEP))
        self.sampling = SamplingParams(max_new_tokens=3)
        self.expected = self.engine.generate([[1, 2, 3, 4, 5]], self.sampling)

    def check(self) -> None:
        assert self.engine.generate([[1, 2, 3, 4, 5]], self.sampling) == self.expected
        self.engine.check_invariants()


REQUESTS = [
    ("empty prompt", lambda e: e.engine.add_request([]), "prompt_ids"),
    ("negative token id", lambda e: e.engine.add_request([1, -1]), "prompt_ids"),
    ("float token id", lambda e: e.engine.add_request([1, 2.5]), "prompt_ids"),
    ("bool token id", lambda e: e.engine.add_request([True]), "prompt_ids"),
    ("2-D prompt tensor", lambda e: e.engine.add_request(torch.ones(1, 3, dtype=torch.long)), "prompt_ids"),
    ("float prompt tensor", lambda e: e.engine.add_request(torch.ones(3)), "prompt_ids"),
    ("unknown request", lambda e: e.engine.get_request(99), "request_id=99"),
    ("abort an unknown request", lambda e: e.engine.abort(99), "request_id=99"),
    ("token eviction", lambda e: KVCacheEngine(e.engine.model, KVCacheConfig(token_budget=8)), "token eviction"),
]


@pytest.mark.parametrize(("name", "call", "match"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_bad_requests_are_refused_and_the_engine_keeps_serving(
    model: PreTrainedModel, name: str, call: Any, match: str
) -> None:
    subject = EngineUnderTest(model)
    with pytest.raises(CacheValidationError, match=match):
        call(subject)
    subject.check()


class HFCacheUnderTest:
    """A Hugging Face `KVCache` of a 2-layer model (SDPA, so `update` returns every token) holding 5 tokens for a
    batch of 2; `check()` proves it still usable."""

    def __init__(self) -> None:
        self.cache = KVCache(KVCacheConfig(block_size=4, device="cpu"), tiny_config())
        self.keys = kv(2, 5)
        for layer in range(2):
            self.cache.update(self.keys, self.keys, layer)

    def check(self) -> None:
        new = kv(2)
        for layer in range(2):
            keys, _ = self.cache.update(new, new, layer)
            assert torch.equal(keys, torch.cat([self.keys, new], 2))
        self.cache.store.check_invariants()


HF_CASES = [
    Case("dtype", lambda s: s.cache.update(*[kv(2).int()] * 2, 0), "dtypes"),
    Case("KV heads", lambda s: s.cache.update(*[kv(2, heads=HEADS + 1)] * 2, 0), "3 KV heads"),
    Case("batch", lambda s: s.cache.update(*[kv(3)] * 2, 0), "batch 3 but 2"),
    Case("layer past the model", lambda s: s.cache.update(kv(2), kv(2), 5), "layer"),
    Case("beam index out of range", lambda s: s.cache.reorder_cache(torch.tensor([2, 0])), "batch indices"),
    Case("selected row out of range", lambda s: s.cache.batch_select_indices(torch.tensor([5])), "batch indices"),
    Case("crop to a float", lambda s: s.cache.crop(1.5), "1.5"),
    Case(
        "repeat 0 times",
        lambda s: s.cache.batch_repeat_interleave(0),
        "repeats=0",
    ),
]


@pytest.mark.parametrize("case", params(HF_CASES))
def test_hf_cache_refuses_and_stays_usable(case: Case) -> None:
    subject = HFCacheUnderTest()
    with pytest.raises(case.error, match=case.match):
        case.call(subject)
    subject.check()


def test_hf_cache_refuses_models_it_cannot_page() -> None:
    with pytest.raises(CacheValidationError, match="model_config is required"):
        KVCache(KVCacheConfig(), None)
    config = tiny_config()
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(CacheValidationError, match=r"layer types \['linear_attention'\]"):
        KVCache(KVCacheConfig(), config)
