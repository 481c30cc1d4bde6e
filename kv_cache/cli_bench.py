"""`kv-cache bench`: the CPU benchmarks in one run, with results, tables and PNG plots in an output folder.

    kv-cache bench --quick --out bench_results/        # ~1 minute on 2 cores; without --quick: the full sizes
    kv-cache bench --metrics-port 9400                   # also serve the decode cache's metrics while it runs

Sections (each a benchmark of `benchmarks/`, imported from the source checkout, or a package function):

    append    benchmarks/append.py `run_length`: one token at a time, our store vs DynamicCache vs a bare copy
    memory    benchmarks/memory.py `measure`: bytes per token of each block format on real 1 GiB pools
    fidelity  kv_cache.fidelity `evaluate` on the shipped model: perplexity, agreement, needles, bytes per token
    decode    greedy decoding with the shipped model through a full and an INT4 `KVCache` (profiled): tokens/s
              and the memory curve; its caches are what `--metrics-port` serves

The folder gets `results.json` (everything), `<section>.png` with `<section>.json` beside it (the series the plot
holds, read back from the figure: `kv_cache.plots`), `tables.txt`, and with `--metrics-port` `metrics.prom`, the
last scrape of the endpoint (Prometheus text).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from kv_cache import plots
from kv_cache.cli_commands import Handler, non_negative_int, stream_greedy
from kv_cache.config import KVCacheConfig
from kv_cache.errors import CacheValidationError
from kv_cache.fidelity import FidelityPlan, FidelityRow, default_configs, evaluate, format_table
from kv_cache.hf_attention import register_attention
from kv_cache.hf_cache import KVCache
from kv_cache.reference_model import encode, heldout_text, load_reference_model

progress_console = Console(stderr=True, width=120)  # stdout stays clean for --json
console = Console(width=140)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
APPEND_LENGTHS = {True: (128, 512), False: (1024, 4096, 8192)}
# Quick: prompts long enough that INT4/INT2 seal blocks (past the 128-token window), few scored tokens and probes.
FIDELITY_QUICK = FidelityPlan(prompt_tokens=320, scored_tokens=16, windows=1, contexts=(384,), depths=(0.5,), probes=1)
DECODE_TOKENS = {True: 32, False: 256}
Step = Callable[[str], None]


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section, write results, tables and plots to `--out`; returns the results."""
    out = _output_folder(args.out)
    folder = Path(args.benchmarks) if args.benchmarks else BENCHMARKS
    modules = {name: _load_benchmark(folder, name) for name in ("append", "memory")}
    served = ServedCache()
    server = _serve(args.metrics_port, served)
    results: dict[str, Any] = {"quick": args.quick}
    try:
        with Progress(console=progress_console, transient=True) as progress:
            task = progress.add_task("bench", total=_steps(args.quick, modules["memory"]))

            def step(description: str) -> None:
                progress.update(task, advance=1, description=description)

            results["append"] = bench_append(modules["append"], APPEND_LENGTHS[args.quick], step)
            results["memory"] = bench_memory(modules["memory"], step)
            results["fidelity"] = bench_fidelity(args.quick, step)
            results["decode"] = bench_decode(args.quick, served, step)
        if server is not None:
            results["metrics"] = _final_scrape(server.url, out / "metrics.prom")
    finally:
        if server is not None:
            server.stop()
    results["plots"] = write_plots(results, out)
    _write(results, out, quiet=args.json)
    return results


def _output_folder(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheValidationError(f"--out {path!r} cannot be used as a folder ({error}); pass another") from error
    return out


def _load_benchmark(folder: Path, name: str) -> ModuleType:
    """Import `folder/<name>.py` (the benchmarks live in the source checkout, not in the package)."""
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kv_cache_benchmark_{name}", path)
    if not path.is_file() or spec is None or spec.loader is None:
        raise CacheValidationError(
            f"--benchmarks {str(folder)!r} holds no {name}.py; run from a source checkout of kv_cache or pass "
            "--benchmarks DIR (the repository's benchmarks/ folder)"
        )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _steps(quick: bool, memory: ModuleType) -> int:
    fidelity = len(_fidelity_configs(quick)) + 1  # + the reference continuations
    return len(APPEND_LENGTHS[quick]) + len(memory.FORMATS) + fidelity + 2


def bench_append(module: ModuleType, lengths: tuple[int, ...], step: Step) -> dict[str, Any]:
    """`append.run_length` at each length: total ms, us per token over the first and last 10%, and vs bare."""
    rows = []
    torch.manual_seed(0)
    for length in lengths:
        step(f"append: {length} tokens")
        keys, values = (torch.randn(length, 1, module.HEADS, 1, module.DIM) for _ in range(2))
        results = module.run_length(length, keys, values)
        bare = results["bare copy"][0]
        for method, (total, first, last) in results.items():
            timing = {"total_ms": total * 1e3, "first_us": first, "last_us": last, "vs_bare": total / bare}
            rows.append({"length": length, "method": method, **timing})
    return {"lengths": list(lengths), "heads": module.HEADS, "head_dim": module.DIM, "rows": rows}


def bench_memory(module: ModuleType, step: Step) -> dict[str, Any]:
    """`memory.measure` of each format: bytes per token read off real pools, and the ratio to bf16."""
    rows: dict[str, dict[str, float]] = {}
    for name, options in module.FORMATS:
        step(f"memory: {name}")
        rows[name] = module.measure(options)
    base = next(iter(rows.values()))["bytes_per_token"]
    for row in rows.values():
        row["vs_first"] = row["bytes_per_token"] / base
    return {"shape": {"layers": module.LAYERS, "kv_heads": module.HEADS, "head_dim": module.DIM}, "rows": rows}


def _fidelity_configs(quick: bool) -> dict[str, KVCacheConfig]:
    configs = default_configs()
    return {name: configs[name] for name in ("full", "INT4", "INT2")} if quick else configs


def bench_fidelity(quick: bool, step: Step) -> dict[str, Any]:
    """`fidelity.evaluate` on the shipped model (a short plan and three configurations with `--quick`)."""
    plan = FIDELITY_QUICK if quick else FidelityPlan()
    step("fidelity: reference")
    rows = evaluate(load_reference_model(), _fidelity_configs(quick), plan, lambda name: step(f"fidelity: {name}"))
    return {"plan": plan.__dict__, "rows": [row.__dict__ for row in rows], "table": format_table(rows)}


class ServedCache:
    """What `--metrics-port` serves: the stats of the cache the bench is using (empty before there is one)."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None

    def stats(self) -> dict[str, Any]:
        return self.cache.get_stats() if self.cache is not None else {}


@torch.no_grad()
def bench_decode(quick: bool, served: ServedCache, step: Step) -> dict[str, Any]:
    """Greedy decoding through a full and an INT4 cache (profiling on): speed, bytes per token, memory curve."""
    model = load_reference_model()
    model.set_attn_implementation(register_attention())
    prompt = encode(heldout_text()[:600], add_bos=True)
    configs = {
        "full precision": KVCacheConfig(max_tokens=4096, enable_profiling=True),
        "INT4": KVCacheConfig(max_tokens=4096, enable_profiling=True, use_quantization=True, residual_tokens=64),
    }
    runs = {}
    for name, config in configs.items():
        step(f"decode: {name}")
        served.cache = KVCache(config, model.config)
        run = stream_greedy(model, served.cache, prompt, DECODE_TOKENS[quick])
        stats = served.cache.get_stats()
        runs[name] = {**run, "stats": {key: value for key, value in stats.items() if not isinstance(value, dict)}}
    return {"prompt_tokens": prompt.numel(), "new_tokens": DECODE_TOKENS[quick], "runs": runs}


def _serve(port: int | None, served: ServedCache) -> Any:
    if port is None:
        return None
    from kv_cache.metrics import serve_metrics

    server = serve_metrics(port, served.stats)
    progress_console.print(f"serving the decode cache's metrics at {server.url}")
    return server


def _final_scrape(url: str, path: Path) -> dict[str, Any]:
    """GET the endpoint once more (the cache's final state) and keep the text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    path.write_text(text)
    return {"url": url, "file": str(path), "samples": sum(1 for line in text.splitlines() if line[:1] not in "#")}


def write_plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    """One PNG (and its series as JSON) per section; {} and a note when matplotlib is missing."""
    if plots.pyplot() is None:
        progress_console.print("matplotlib is not installed (pip install 'kv-cache-engine[plots]'): no plots")
        return {}
    append_rows = results["append"]["rows"]
    methods = list(dict.fromkeys(row["method"] for row in append_rows))
    append = {method: _columns(append_rows, method, "length", "last_us") for method in methods}
    memory = {name: row["bytes_per_token"] for name, row in results["memory"]["rows"].items()}
    decode = {name: plots.columns(run["memory_curve"]) for name, run in results["decode"]["runs"].items()}
    tokens = "tokens in the sequence"
    figures = {
        "append": plots.lines("Appending one token at a time (CPU)", (tokens, "us per token, last 10%"), append, True),
        "memory": plots.bars("Bytes per token, Llama-1B shape", "bytes per token (all layers)", memory, "bytes"),
        "fidelity": plots.fidelity([FidelityRow(**row) for row in results["fidelity"]["rows"]]),
        "decode": plots.lines("KV cache memory while decoding", (tokens, "KV blocks in use (MiB)"), decode),
    }
    for name, figure in figures.items():
        plots.save(figure, out / f"{name}.png")
    return {name: str(out / f"{name}.png") for name in figures}


def _columns(rows: list[dict[str, Any]], method: str, x: str, y: str) -> tuple[list[float], list[float]]:
    picked = [row for row in rows if row["method"] == method]
    return [row[x] for row in picked], [row[y] for row in picked]


def tables(results: dict[str, Any]) -> str:
    """The sections' results as fixed-width tables."""
    lines = [f"{'T':>6} {'method':<18} {'total ms':>9} {'us/tok first':>13} {'us/tok last':>12} {'vs bare':>8}"]
    for r in results["append"]["rows"]:
        lines.append(
            f"{r['length']:>6} {r['method']:<18} {r['total_ms']:>9.1f} {r['first_us']:>13.2f} "
            f"{r['last_us']:>12.2f} {r['vs_bare']:>7.2f}x"
        )
    lines += ["", f"{'format':<6} {'bytes/token':>12} {'vs first':>9}"]
    for name, row in results["memory"]["rows"].items():
        lines.append(f"{name:<6} {row['bytes_per_token']:>12,.0f} {row['vs_first']:>8.3f}x")
    lines += ["", results["fidelity"]["table"], "", f"{'decode':<16} {'tokens/s':>9} {'bytes/token':>12}"]
    for name, run in results["decode"]["runs"].items():
        lines.append(f"{name:<16} {run['tokens_per_s']:>9.0f} {run['bytes_per_token']:>12,.0f}")
    return "\n".join(lines)


def _write(results: dict[str, Any], out: Path, quiet: bool) -> None:
    """results.json and tables.txt; the tables on the console too unless `quiet` (--json)."""
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = tables(results)
    (out / "tables.txt").write_text(text + "\n")
    if not quiet:
        console.print(text, highlight=False, markup=False)
        console.print(f"results, tables and plots in {out}/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench_results", help="output folder (created; files are overwritten)")
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute on a laptop")
    parser.add_argument("--benchmarks", default="", help="the benchmarks/ folder (default: the source checkout's)")
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        help="serve the decode cache's Prometheus metrics on this port while running (0: any free port)",
    )


def port_number(text: str) -> int:
    """A TCP port for argparse: 0 (any free one) to 65535."""
    port = non_negative_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0 to 65535)")
    return port


COMMAND: tuple[Handler, Callable[[argparse.ArgumentParser], None], str] = (
    run_bench,
    add_arguments,
    "run the CPU benchmarks; results, tables and PNG plots in --out",
)
