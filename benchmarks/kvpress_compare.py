"""Our token-eviction policies beside NVIDIA kvpress's presses, same model, probes and ratios (issues 5 and 6).

kvpress pins `transformers<5.3` and cannot install beside our pins, so it runs in a separate environment: this
script runs our side in-process and re-runs itself there (`--side kvpress`), with the repository root on
PYTHONPATH so that both sides build the probes with `kv_cache.reference_model` (it imports under either
transformers). Both sides load the shipped reference model (fp32, CPU, the same safetensors) and measure:

- needles, query in the prompt: `make_needle_prompt(context, depth, seed)` (context + query) is prefilled and
  compressed at the ratio, then 6 greedy tokens; exact match. SnapKV's observation window then holds the query.
- needles, query after compression: the context alone is compressed, then the query is prefilled uncompressed
  (kvpress's pipeline protocol: the question is not known when the context is compressed).
- perplexity: held-out windows; the prompt is compressed once at prefill and the next tokens are scored
  teacher-forced without further eviction (kvpress presses act at prefill only; our cache's evictor is switched
  off after the prefill so that both sides hold the same tokens).

Pairs of the same kind: window+sinks <-> StreamingLLMPress, H2O+SnapKV (LFU) <-> SnapKVPress (its defaults:
window 64, average pooling over 5 tokens; and with our byte-level kernel 15); Knorm has no counterpart of ours and
is listed as a further baseline. ExpectedAttention is left out: on this shared 2-core machine each press costs
minutes, and it is no kind of ours.

Run: python benchmarks/kvpress_compare.py --kvpress-python /tmp/kvpressenv/bin/python \
         --out benchmarks/results/kvpress_compare.txt [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kv_cache.reference_model import (
    encode,
    heldout_text,
    load_reference_model,
    make_needle_prompt,
    needle_query,
)

ROOT = Path(__file__).resolve().parents[1]
FACTORS = (2, 4, 8)
QUERY_TOKENS = len(needle_query(1000).encode())  # every needle key has four digits: `key_1000 ==> "`
Forward = Callable[[torch.Tensor, int, bool], torch.Tensor]  # (ids [tokens], first position, compress) -> logits


@dataclass(frozen=True)
class Plan:
    """Probes of one run: needle contexts x depths x seeds, and perplexity windows."""

    contexts: tuple[int, ...] = (512, 1024)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    report_seeds: tuple[int, ...] = (0, 1, 2)
    tuning_seeds: tuple[int, ...] = (100, 101, 102)
    prompt_tokens: int = 1024
    scored_tokens: int = 128
    windows: int = 1


QUICK = Plan(contexts=(512,), depths=(0.5,), report_seeds=(0, 1), tuning_seeds=(100, 101), windows=1)


@torch.no_grad()
def needle_hits(forward_factory: Callable[[], Forward], plan: Plan, seeds: tuple[int, ...], split: bool) -> float:
    """Exact-match rate over contexts x depths x `seeds`; `split` compresses the context without the query."""
    hits, total = 0, 0
    for context in plan.contexts:
        for depth in plan.depths:
            for seed in seeds:
                prompt, answer = make_needle_prompt(context, depth, seed)
                forward = forward_factory()
                if split:
                    query = QUERY_TOKENS
                    forward(prompt[:-query], 0, True)
                    logits = forward(prompt[-query:], prompt.numel() - query, False)
                else:
                    logits = forward(prompt, 0, True)
                got = []
                for step in range(answer.numel()):
                    got.append(int(logits.argmax()))
                    logits = forward(torch.tensor([got[-1]]), prompt.numel() + step, False)
                hits += int(got == answer.tolist())
                total += 1
    return hits / total


@torch.no_grad()
def perplexity(forward_factory: Callable[[], Forward], plan: Plan) -> float:
    """Per-byte perplexity of `scored_tokens` after a compressed `prompt_tokens` prompt, over held-out windows."""
    ids = encode(heldout_text())
    span = plan.prompt_tokens + plan.scored_tokens
    step = (ids.numel() - span) // plan.windows
    nll, count = 0.0, 0
    for start in range(0, plan.windows * step, step):
        forward = forward_factory()
        logits = forward(ids[start : start + plan.prompt_tokens], 0, True)
        for offset, target in enumerate(ids[start + plan.prompt_tokens : start + span].tolist()):
            nll -= float(torch.log_softmax(logits.float(), -1)[target])
            logits = forward(torch.tensor([target]), plan.prompt_tokens + offset, False)
        count += plan.scored_tokens
    return math.exp(nll / count)


def measure(forward_factory: Callable[[], Forward], plan: Plan, tuning: bool) -> dict[str, float]:
    """Every metric of one configuration; the tuning seeds only where `tuning` (our side: what we tuned on)."""
    return {
        "needles": needle_hits(forward_factory, plan, plan.report_seeds, split=False),
        "needles_tuning": needle_hits(forward_factory, plan, plan.tuning_seeds, split=False) if tuning else math.nan,
        "needles_split": needle_hits(forward_factory, plan, plan.report_seeds, split=True),
        "perplexity": perplexity(forward_factory, plan),
    }


def our_side(plan: Plan) -> dict[str, Any]:
    """Our full cache and each policy at each ratio, through `KVCache` and the paged attention."""
    from kv_cache.config import CacheStrategy, KVCacheConfig
    from kv_cache.hf_attention import register_attention
    from kv_cache.hf_cache import KVCache

    model = load_reference_model()
    model.set_attn_implementation(register_attention())

    def factory(config: KVCacheConfig) -> Callable[[], Forward]:
        def new() -> Forward:
            cache = KVCache(config, model.config)

            def forward(ids: torch.Tensor, position: int, compress: bool) -> torch.Tensor:
                logits = model(input_ids=ids[None], past_key_values=cache).logits[0, -1]
                if compress:  # the prompt is compressed once; later tokens are kept (kvpress's protocol)
                    cache.evictor = None
                return logits

            return forward

        return new

    rows = {"full": measure(factory(KVCacheConfig(max_tokens=4096)), plan, True)}
    kinds = {"window+sinks": CacheStrategy.LRU, "H2O+SnapKV": CacheStrategy.LFU, "adaptive": CacheStrategy.ADAPTIVE}
    for label, strategy in kinds.items():
        for factor in FACTORS:
            config = KVCacheConfig(
                max_tokens=4096, cache_strategy=strategy, compression_ratio=1 - 1 / factor, sink_tokens=4
            )
            rows[f"{label} {factor}x"] = measure(factory(config), plan, True)
            print(f"  ours {label} {factor}x {rows[f'{label} {factor}x']}", flush=True)
    return {"versions": versions(), "rows": rows}


def kvpress_side(plan: Plan, only: list[str] | None = None) -> dict[str, Any]:
    """kvpress's presses (those named in `only`, or all) at each ratio over a `DynamicCache` (SDPA), positions
    passed as its pipeline does; "full" is measured unless `only` leaves it out."""
    import contextlib

    from kvpress import KnormPress, SnapKVPress, StreamingLLMPress
    from transformers import DynamicCache

    model = load_reference_model()
    model.set_attn_implementation("sdpa")

    def factory(press: Any) -> Callable[[], Forward]:
        def new() -> Forward:
            cache = DynamicCache()

            def forward(ids: torch.Tensor, position: int, compress: bool) -> torch.Tensor:
                positions = torch.arange(position, position + ids.numel())[None]
                with press(model) if compress and press is not None else contextlib.nullcontext():
                    out = model(input_ids=ids[None], past_key_values=cache, position_ids=positions)
                return out.logits[0, -1]

            return forward

        return new

    presses = {
        "StreamingLLMPress": lambda ratio: StreamingLLMPress(compression_ratio=ratio, n_sink=4),
        "SnapKVPress": lambda ratio: SnapKVPress(compression_ratio=ratio),
        "KnormPress": lambda ratio: KnormPress(compression_ratio=ratio),
        # SnapKV with our byte-level pooling kernel (token_eviction.POOL_KERNEL): the kernel, not the code, matters
        "SnapKVPress(kernel=15)": lambda ratio: SnapKVPress(compression_ratio=ratio, kernel_size=15),
    }
    wanted = set(only) if only else {"full", *presses}
    rows = {"full": measure(factory(None), plan, False)} if "full" in wanted else {}
    for label, make in presses.items():
        if label not in wanted:
            continue
        for factor in FACTORS:
            rows[f"{label} {factor}x"] = measure(factory(make(1 - 1 / factor)), plan, False)
            print(f"  kvpress {label} {factor}x {rows[f'{label} {factor}x']}", flush=True)
    return {"versions": versions(), "rows": rows}


def versions() -> str:
    """Python, torch, transformers and (if installed) kvpress versions of this interpreter."""
    import transformers

    try:
        from importlib.metadata import version

        kvpress = version("kvpress")
    except Exception:
        kvpress = "not installed"
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"kvpress {kvpress}"
    )


PAIRS = (
    ("window+sinks", "StreamingLLMPress"),
    ("H2O+SnapKV", "SnapKVPress"),
    ("H2O+SnapKV", "SnapKVPress(kernel=15)"),
)


def format_report(ours: dict[str, Any], theirs: dict[str, Any], plan: Plan) -> str:
    """Both sides' rows, then each pair of the same kind at each ratio."""
    header = f"{'side':<8} {'config':<26} {'needles':>8} {'tuning':>7} {'q after':>8} {'ppl/byte':>9} {'vs full':>8}"
    lines = [header]
    for side, result in (("ours", ours), ("kvpress", theirs)):
        rows = result["rows"]
        for name, row in rows.items():
            ratio = row["perplexity"] / rows["full"]["perplexity"] - 1
            lines.append(
                f"{side:<8} {name:<26} {row['needles']:>8.0%} {_rate(row['needles_tuning']):>7} "
                f"{row['needles_split']:>8.0%} {row['perplexity']:>9.4f} {ratio:>+8.2%}"
            )
    lines += ["", "same kind, same ratio (needles on the report seeds; ppl lower is better):"]
    for mine, press in PAIRS:
        for factor in FACTORS:
            if f"{press} {factor}x" not in theirs["rows"]:
                continue
            a, b = ours["rows"][f"{mine} {factor}x"], theirs["rows"][f"{press} {factor}x"]
            verdict = "ours >= kvpress" if _at_least(a, b) else "kvpress ahead"
            lines.append(
                f"  {factor}x {mine:<13} {a['needles']:>5.0%} / {a['needles_split']:>4.0%} / {a['perplexity']:.4f}"
                f"   {press:<18} {b['needles']:>5.0%} / {b['needles_split']:>4.0%} / {b['perplexity']:.4f}"
                f"   {verdict}"
            )
    lines += ["", "best needle rate (report seeds) at each ratio, either protocol's minimum:"]
    for factor in FACTORS:
        best = [_best(result["rows"], factor) for result in (ours, theirs)]
        lines.append(f"  {factor}x  ours {best[0][1]:>4.0%} ({best[0][0]})   kvpress {best[1][1]:>4.0%} ({best[1][0]})")
    return "\n".join(lines)


def _best(rows: dict[str, dict[str, float]], factor: int) -> tuple[str, float]:
    """The configuration at `factor` whose worse needle protocol is best, and that rate."""
    at = {name: min(row["needles"], row["needles_split"]) for name, row in rows.items() if name.endswith(f" {factor}x")}
    name = max(at, key=lambda key: at[key])
    return name, at[name]


def _rate(value: float) -> str:
    """A rate as a percentage, or '-' where it was not measured (NaN)."""
    return "-" if math.isnan(value) else f"{value:.0%}"


def _at_least(ours: dict[str, float], theirs: dict[str, float]) -> bool:
    """Ours is at least as good: needle rates (both protocols) not lower, perplexity not higher (0.1% slack)."""
    return (
        ours["needles"] >= theirs["needles"]
        and ours["needles_split"] >= theirs["needles_split"]
        and ours["perplexity"] <= theirs["perplexity"] * 1.001
    )


def run_kvpress(python: str, quick: bool) -> dict[str, Any]:
    """Re-run this script under the kvpress interpreter and read its JSON; an install error is raised with its
    message so that the results file can say why."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "kvpress.json"
        command = [python, __file__, "--side", "kvpress", "--json", str(out), *(["--quick"] if quick else [])]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"kvpress side failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
        print(done.stdout, end="")
        return json.loads(out.read_text())


SETUP = """kvpress environment (kvpress pins transformers<5.3; ours is 5.23):
  python3 -m venv /tmp/kvpressenv && cd /tmp/kvpressenv
  bin/pip install torch==2.13.0 && bin/pip install kvpress    # kvpress 0.5.5 brings transformers 5.2.0
each side alone (what this file was made from; the default command runs both):
  python benchmarks/kvpress_compare.py --side ours --json ours.json
  PYTHONPATH=. /tmp/kvpressenv/bin/python benchmarks/kvpress_compare.py --side kvpress --json kvpress.json"""


def merged(paths: list[str]) -> dict[str, Any]:
    """Several `--side kvpress` results as one: rows of later files added to the first's (same versions)."""
    results = [json.loads(Path(path).read_text()) for path in paths]
    rows = {name: row for result in results for name, row in result["rows"].items()}
    return {"versions": results[0]["versions"], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["ours", "kvpress"], default=None, help="run one side and write --json")
    parser.add_argument("--json", default=None)
    parser.add_argument("--kvpress-python", default="/tmp/kvpressenv/bin/python")
    parser.add_argument("--ours-json", default=None, help="reuse our side's results from a previous --side ours")
    parser.add_argument("--kvpress-json", nargs="*", default=None, help="reuse (and merge) --side kvpress results")
    parser.add_argument("--presses", nargs="*", default=None, help="with --side kvpress: only these (and 'full')")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    plan = QUICK if args.quick else Plan()
    start = time.perf_counter()
    if args.side is not None:
        result = our_side(plan) if args.side == "ours" else kvpress_side(plan, args.presses)
        Path(args.json or f"{args.side}.json").write_text(json.dumps(result, indent=1))
        return
    ours = json.loads(Path(args.ours_json).read_text()) if args.ours_json else our_side(plan)
    theirs = merged(args.kvpress_json) if args.kvpress_json else run_kvpress(args.kvpress_python, args.quick)
    lines = [
        f"command: python {' '.join(sys.argv)}",
        SETUP,
        f"ours:    {ours['versions']} (this environment, paged attention)",
        f"kvpress: {theirs['versions']} ({args.kvpress_python}, SDPA over DynamicCache)",
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, CPU, fp32; "
        f"{time.perf_counter() - start:.0f} s",
        f"plan: {asdict(plan)}",
        "needles: exact match of the 6 characters over contexts x depths x seeds; 'needles' = report seeds "
        f"{plan.report_seeds} (among the fidelity table's), 'tuning' = seeds {plan.tuning_seeds} (among those our "
        "policies were tuned on; ours only), 'q after' = report seeds with the query prefilled after the context "
        "was compressed; ppl = held-out windows, prompt compressed once, then teacher-forced",
        "",
        format_report(ours, theirs, plan),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
