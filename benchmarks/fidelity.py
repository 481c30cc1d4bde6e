"""Fidelity of every cache configuration on the shipped reference model (the table of `kv-cache eval`).

Perplexity per byte on held-out code decoded through each cache, greedy agreement with the full cache, needle
retrieval accuracy per context length and depth, and bytes per token seen; plus a PNG of quality against memory.

Where optimum-quanto imports, Hugging Face's `QuantizedCache` (quanto backend, its defaults: keys and values
grouped per token over 64 channels, a 128-token full-precision window) at INT4 and INT2 joins the table as
"HF quanto INT4/INT2". It installs beside transformers 5.23 but is not one of our dependencies: run this script
with an interpreter that has it (and kv_cache on PYTHONPATH), e.g. `--only full INT4 INT2 "HF quanto INT4"
"HF quanto INT2"`.

Run: python benchmarks/fidelity.py [--quick] [--first-seed N] [--only NAME ...]
                                   [--out benchmarks/results/fidelity.txt] [--plot benchmarks/results/fidelity.png]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from kv_cache.cli_commands import plot_fidelity
from kv_cache.fidelity import QUICK_PLAN, CacheSpec, FidelityPlan, default_configs, evaluate, format_table
from kv_cache.reference_model import load_reference_model


def quanto_caches() -> dict[str, CacheSpec]:
    """Hugging Face `QuantizedCache` with the quanto backend at INT4 and INT2, or nothing if quanto is missing."""
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return {}
    from transformers import QuantizedCache

    def factory(bits: int) -> CacheSpec:
        return lambda config: QuantizedCache(backend="quanto", config=config, nbits=bits)

    return {f"HF quanto INT{bits}": factory(bits) for bits in (4, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--first-seed", type=int, default=0, help="needle seeds; eviction was tuned on >= 100")
    parser.add_argument("--only", nargs="+", default=None, help="these rows only (the first is the reference)")
    args = parser.parse_args()
    plan = replace(QUICK_PLAN if args.quick else FidelityPlan(), first_seed=args.first_seed)
    configs: dict[str, CacheSpec] = {**default_configs(), **quanto_caches()}
    if args.only:
        unknown = [name for name in args.only if name not in configs]
        if unknown:
            parser.error(f"--only: unknown rows {unknown}; known: {list(configs)}")
        configs = {name: configs[name] for name in args.only}
    start = time.perf_counter()
    rows = evaluate(load_reference_model(), configs, plan, lambda name: print(f"  {name}", flush=True))
    cells = list(rows[0].needles)
    lines = [
        f"command: python {shlex.join(sys.argv)}",
        f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
        f"{time.perf_counter() - start:.0f} s",
        f"plan: {plan}",
        f"HF quanto rows: {'included' if quanto_caches() else 'optimum-quanto not installed here'}",
        "",
        format_table(rows),
        "",
        "needle accuracy per context@depth:",
        f"{'config':<18} " + " ".join(f"{cell:>9}" for cell in cells),
        *(f"{row.name:<18} " + " ".join(f"{row.needles[cell]:>9.0%}" for cell in cells) for row in rows),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.plot:
        plot_fidelity(rows, Path(args.plot))


if __name__ == "__main__":
    main()
