"""Fidelity of cache configurations on the trained reference model: perplexity, greedy agreement, needles.

For each named `KVCacheConfig` (full, INT8/4/2, eviction policies at 2x/4x/8x, ...), or another library's cache
(a `CacheFactory`, e.g. Hugging Face's `QuantizedCache`), on held-out code:

- perplexity: the model reads `prompt_tokens` of held-out text into the cache, then predicts the next
  `scored_tokens` one at a time (teacher-forced, decoding through the cache, so compression acts on every step);
- greedy agreement: the same decode, teacher-forced on the full cache's greedy continuation; the share of steps
  whose argmax equals the full cache's token;
- needle accuracy: exact greedy retrieval of a 6-character value defined at `depth` of a `context` token prompt
  (`reference_model.make_needle_prompt`), per context length and depth, over seeds `first_seed` ..
  `first_seed + probes - 1` (the reported table uses 0..; eviction was tuned on seeds >= 100, kept disjoint);
- memory: bytes of the blocks in use per token seen (`effective_bytes_per_token`, after the needle probes);
  not measured for other libraries' caches.

Our configurations run with `hf_attention`'s paged attention (heavy-hitter eviction needs its attention mass),
other caches with SDPA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import LlamaForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache

from kv_cache.config import CacheStrategy, KVCacheConfig
from kv_cache.hf_attention import register_attention
from kv_cache.hf_cache import KVCache
from kv_cache.reference_model import encode, heldout_text, make_needle_prompt


@dataclass(frozen=True)
class FidelityPlan:
    """What to measure (token counts; several windows and probes average out noise)."""

    prompt_tokens: int = 1024
    scored_tokens: int = 256
    windows: int = 2
    contexts: tuple[int, ...] = (512, 1024, 2048)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    probes: int = 5
    first_seed: int = 0


QUICK_PLAN = FidelityPlan(prompt_tokens=256, scored_tokens=64, windows=1, contexts=(512,), depths=(0.5,), probes=2)
"""A smoke run: one short window and two needle probes."""


CacheFactory = Callable[[PretrainedConfig], Cache]
"""Builds an empty cache of another library for a model config (a comparison row, run with SDPA)."""

CacheSpec = KVCacheConfig | CacheFactory


@dataclass
class FidelityRow:
    """One configuration's results (perplexity per byte, agreement and needle accuracy as fractions)."""

    name: str
    perplexity: float = math.nan
    agreement: float = math.nan
    needle_accuracy: float = math.nan
    needles: dict[str, float] = field(default_factory=dict)
    bytes_per_token: float = math.nan


def default_configs(max_tokens: int = 4096) -> dict[str, KVCacheConfig]:
    """The configurations of the fidelity table: full, INT8/4/2, each eviction policy at 2x/4x/8x, low-rank
    coefficients at 75%/50% of head_dim, and two combinations (low-rank + INT8, low-rank + eviction)."""
    configs = {"full": KVCacheConfig(max_tokens=max_tokens)}
    for bits in (8, 4, 2):
        configs[f"INT{bits}"] = KVCacheConfig(max_tokens=max_tokens, use_quantization=True, quantization_bits=bits)
    policies = {"window+sinks": CacheStrategy.LRU, "H2O+SnapKV": CacheStrategy.LFU, "adaptive": CacheStrategy.ADAPTIVE}
    for label, strategy in policies.items():
        for factor in (2, 4, 8):
            configs[f"{label} {factor}x"] = KVCacheConfig(
                max_tokens=max_tokens, cache_strategy=strategy, compression_ratio=1 - 1 / factor, sink_tokens=4
            )
    for kept in (0.75, 0.5):
        configs[f"rank {kept:.0%}"] = KVCacheConfig(max_tokens=max_tokens, low_rank_ratio=kept)
    configs["rank 75% INT8"] = KVCacheConfig(
        max_tokens=max_tokens, low_rank_ratio=0.75, use_quantization=True, quantization_bits=8
    )
    configs["H2O 2x + rank 75%"] = replace(configs["H2O+SnapKV 2x"], low_rank_ratio=0.75)
    return configs


def evaluate(
    model: LlamaForCausalLM,
    configs: Mapping[str, CacheSpec],
    plan: FidelityPlan,
    progress: Callable[[str], None] | None = None,
) -> list[FidelityRow]:
    """Measure every configuration; the first one is the reference for agreement (normally "full")."""
    windows = _heldout_windows(plan)
    reference = _cache_maker(model, next(iter(configs.values())))
    continuations = [_greedy(model, reference, prompt, plan.scored_tokens) for prompt, _ in windows]
    rows = []
    for name, spec in configs.items():
        if progress is not None:
            progress(name)
        make = _cache_maker(model, spec)
        row = FidelityRow(name)
        nll, agree, count = 0.0, 0, 0
        for (prompt, text), continuation in zip(windows, continuations, strict=True):
            nll += _teacher_forced(model, make, prompt, text)[0]
            agree += _teacher_forced(model, make, prompt, continuation)[1]
            count += len(text)
        row.perplexity = math.exp(nll / count)
        row.agreement = agree / count
        row.needles, row.bytes_per_token = _needles(model, make, plan)
        row.needle_accuracy = sum(row.needles.values()) / len(row.needles)
        rows.append(row)
    return rows


def _cache_maker(model: LlamaForCausalLM, spec: CacheSpec) -> Callable[[], Cache]:
    """A function returning a fresh, empty cache of `spec`, with `model` switched to the attention it needs."""
    if isinstance(spec, KVCacheConfig):
        model.set_attn_implementation(register_attention())
        return lambda: KVCache(spec, model.config)
    model.set_attn_implementation("sdpa")
    return lambda: spec(model.config)


def _heldout_windows(plan: FidelityPlan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt ids, next `scored_tokens` ids) windows spread over the held-out text."""
    ids = encode(heldout_text(), add_bos=False)
    span = plan.prompt_tokens + plan.scored_tokens
    step = max(1, (ids.numel() - span) // plan.windows)
    starts = [i * step for i in range(plan.windows)]
    return [(ids[s : s + plan.prompt_tokens], ids[s + plan.prompt_tokens : s + span]) for s in starts]


@torch.no_grad()
def _teacher_forced(
    model: LlamaForCausalLM, make: Callable[[], Cache], prompt: torch.Tensor, targets: torch.Tensor
) -> tuple[float, int]:
    """Decode `targets` one at a time after `prompt` through a cache from `make`: (sum of NLL, argmax hits)."""
    cache = make()
    logits = model(input_ids=prompt[None], past_key_values=cache).logits[0, -1]
    nll, hits = 0.0, 0
    for target in targets.tolist():
        nll -= float(torch.log_softmax(logits.float(), -1)[target])
        hits += int(int(logits.argmax()) == target)
        logits = model(input_ids=torch.tensor([[target]]), past_key_values=cache).logits[0, -1]
    return nll, hits


@torch.no_grad()
def _greedy(model: LlamaForCausalLM, make: Callable[[], Cache], prompt: torch.Tensor, count: int) -> torch.Tensor:
    """`count` greedy tokens after `prompt` with a cache from `make`: LongTensor [count]."""
    cache = make()
    logits = model(input_ids=prompt[None], past_key_values=cache).logits[0, -1]
    out = []
    for _ in range(count):
        token = int(logits.argmax())
        out.append(token)
        logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache).logits[0, -1]
    return torch.tensor(out)


def _needles(model: LlamaForCausalLM, make: Callable[[], Cache], plan: FidelityPlan) -> tuple[dict[str, float], float]:
    """Accuracy per `context@depth` cell, and the cache's bytes per held token after the longest probe."""
    cells: dict[str, float] = {}
    bytes_per_token = math.nan
    for context in plan.contexts:
        for depth in plan.depths:
            correct = 0
            for seed in range(plan.first_seed, plan.first_seed + plan.probes):
                prompt, answer = make_needle_prompt(context, depth, seed)
                got, bytes_per_token = _answer(model, make, prompt, answer.numel())
                correct += int(torch.equal(got, answer))
            cells[f"{context}@{depth}"] = correct / plan.probes
    return cells, bytes_per_token


@torch.no_grad()
def _answer(
    model: LlamaForCausalLM, make: Callable[[], Cache], prompt: torch.Tensor, count: int
) -> tuple[torch.Tensor, float]:
    """`count` greedy tokens after `prompt`, and the cache's bytes per token seen (NaN: not our cache)."""
    cache = make()
    logits = model(input_ids=prompt[None], past_key_values=cache).logits[0, -1]
    tokens = []
    for _ in range(count):
        tokens.append(int(logits.argmax()))
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache).logits[0, -1]
    memory = float(cache.get_stats()["effective_bytes_per_token"]) if isinstance(cache, KVCache) else math.nan
    return torch.tensor(tokens), memory


def format_table(rows: Sequence[FidelityRow]) -> str:
    """A fixed-width table: perplexity (and ratio to the first row), agreement, needle accuracy, bytes/token."""
    base = rows[0]
    lines = [
        f"{'config':<18} {'ppl/byte':>9} {'vs full':>8} {'agree':>7} {'needles':>8} {'bytes/tok':>10} {'vs full':>8}"
    ]
    for row in rows:
        lines.append(
            f"{row.name:<18} {row.perplexity:>9.4f} {row.perplexity / base.perplexity - 1:>+7.2%} "
            f"{row.agreement:>7.1%} {row.needle_accuracy:>8.1%} " + _memory_columns(row, base)
        )
    return "\n".join(lines)


def _memory_columns(row: FidelityRow, base: FidelityRow) -> str:
    """Bytes per token and the ratio to `base`, or dashes where the cache's memory was not measured."""
    if math.isnan(row.bytes_per_token):
        return f"{'-':>10} {'-':>8}"
    return f"{row.bytes_per_token:>10.0f} {row.bytes_per_token / base.bytes_per_token:>7.3f}x"
