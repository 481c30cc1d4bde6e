"""Fidelity of every cache configuration on the shipped reference model (the table of `kv-cache eval`).

Perplexity per byte on held-out code decoded through each cache, greedy agreement with the full cache, needle
retrieval accuracy per context length and depth, and bytes per token seen; plus a PNG of quality against memory.

Run: python benchmarks/fidelity.py [--quick] [--first-seed N] [--out benchmarks/results/fidelity.txt]
                                   [--plot benchmarks/results/fidelity.png]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from kv_cache.cli_commands import plot_fidelity
from kv_cache.fidelity import QUICK_PLAN, FidelityPlan, default_configs, evaluate, format_table
from kv_cache.reference_model import load_reference_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--first-seed", type=int, default=0, help="needle seeds; eviction was tuned on >= 100")
    args = parser.parse_args()
    plan = replace(QUICK_PLAN if args.quick else FidelityPlan(), first_seed=args.first_seed)
    start = time.perf_counter()
    rows = evaluate(load_reference_model(), default_configs(), plan, lambda name: print(f"  {name}", flush=True))
    cells = list(rows[0].needles)
    lines = [
        f"command: python {' '.join(sys.argv)}",
        f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
        f"{time.perf_counter() - start:.0f} s",
        f"plan: {plan}",
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
