"""Build the data for, train, and evaluate the reference model of `kv_cache.reference_model`.

A ~3M-parameter byte-level Llama (8 query / 2 KV heads, head_dim 64, rotary positions, context 2048), trained on
the Python standard library's source mixed with synthetic retrieval lines (`key_4821 = "7f3a9c"` early,
`key_4821 ==> "7f3a9c"` late, real code between) so that it learns long-range copying.

    # 1. once, on Python 3.11 (the corpus is carried to the GPU, so its Python version does not matter):
    #    .train_data/stdlib_corpus.npz (git-ignored) and the shipped kv_cache/data/heldout_code.txt
    python scripts/train_reference_model.py build-data
    # 2. the shipped run: ~3.5 minutes on an H100 (benchmarks/results/reference_model.txt)
    python scripts/train_reference_model.py train --device cuda --out-dir kv_cache/data/reference_model
    #    or on a CPU, fewer steps fitted to ~50 minutes (a weaker model):
    python scripts/train_reference_model.py train --device cpu --phases 512x16x1000,2048x4x1000 \
        --time-budget 3000 --workers 1 --out-dir /tmp/reference_model
    # 3. the report: held-out perplexity and needle accuracy
    python scripts/train_reference_model.py evaluate

Every random choice flows from `--seed` (data batches are seeded by (seed, seq_len, step), whatever the number of
loader workers); GPU kernels may still differ in the last bits from run to run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from kv_cache.reference_model import (
    BOS_ID,
    EOS_ID,
    HELDOUT_PATH,
    NEEDLE_VALUE_CHARS,
    NEEDLE_VALUE_LENGTH,
    PAD_ID,
    VOCAB_SIZE,
    encode,
    greedy_continuation,
    heldout_text,
    load_reference_model,
    make_needle_prompt,
    needle_definition,
    needle_query,
)

DEFAULT_DATA = Path(".train_data/stdlib_corpus.npz")
# Held out of training; shipped as kv_cache/data/heldout_code.txt for perplexity and needle filler.
HELDOUT_FILES = (
    "json/decoder.py",
    "json/encoder.py",
    "http/client.py",
    "http/server.py",
    "fractions.py",
    "statistics.py",
    "textwrap.py",
)
EXCLUDED_PARTS = ("site-packages", "pydoc_data", "__pycache__")


def model_config(max_positions: int = 2048) -> LlamaConfig:
    """The reference architecture: 4 layers, hidden 256, 8 query / 2 KV heads of 64, MLP 512, byte vocabulary."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------- data


def stdlib_files(root: Path) -> list[str]:
    """The standard library's .py files under `root`, as sorted relative POSIX paths, minus exclusions."""
    paths = (p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    return sorted(p for p in paths if not any(part in p.split("/") for part in EXCLUDED_PARTS))


def build_data(out: Path) -> None:
    """Write the training corpus (`out`, .npz: bytes, file offsets, file names) and the held-out text file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [n for n in stdlib_files(root) if n not in HELDOUT_FILES]
    blobs = [(root / n).read_bytes() for n in names]
    offsets = np.cumsum([0] + [len(b) for b in blobs[:-1]], dtype=np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    listing = np.frombuffer(json.dumps(names).encode(), dtype=np.uint8)
    np.savez_compressed(out, text=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets, names=listing)
    heldout = b"".join(f"# ---- {n} ----\n".encode() + (root / n).read_bytes() for n in HELDOUT_FILES)
    HELDOUT_PATH.write_bytes(heldout)
    print(f"python {sys.version.split()[0]}: {len(names)} training files, {sum(map(len, blobs)):,} bytes -> {out}")
    print(f"{len(HELDOUT_FILES)} held-out files, {len(heldout):,} bytes -> {HELDOUT_PATH}")


def load_stream(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The training token stream (int16 [tokens], files separated by EOS) and its newline positions."""
    with np.load(data) as archive:
        text, offsets = archive["text"], archive["offsets"]
    stream = np.append(np.insert(text.astype(np.int16), offsets[1:], EOS_ID), np.int16(EOS_ID))
    return stream, np.flatnonzero(stream == ord("\n"))


class Batches(Dataset):
    """Batch `step` of one phase: LongTensor [batch, seq_len], BOS first; a share of rows carries needles."""

    def __init__(self, stream: np.ndarray, newlines: np.ndarray, shape: tuple[int, int, int], seed: int) -> None:
        self.stream, self.newlines = stream, newlines
        self.batch, self.seq_len, self.steps = shape
        self.seed = seed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.seq_len, step])
        rows = np.empty((self.batch, self.seq_len), dtype=np.int64)
        rows[:, 0] = BOS_ID
        for row in rows:
            row[1:] = self.needle_text(rng) if rng.random() < 0.6 else self.code(rng, self.seq_len - 1)
        return torch.from_numpy(rows)

    def code(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """`length` consecutive tokens of the stream from a random start."""
        start = int(rng.integers(0, len(self.stream) - length))
        return self.stream[start : start + length]

    def needle_text(self, rng: np.random.Generator) -> np.ndarray:
        """Code with 1-8 needles (at most one per 100 tokens) spliced in at line starts, each defined before asked."""
        count = int(rng.integers(1, max(1, min(8, self.seq_len // 100)) + 1))
        keys = rng.choice(9000, size=count, replace=False) + 1000
        values = ["".join(NEEDLE_VALUE_CHARS[i] for i in rng.integers(0, 16, NEEDLE_VALUE_LENGTH)) for _ in keys]
        lines = [needle_definition(k, v) for k, v in zip(keys, values, strict=True)]
        lines += [needle_query(k) + v + '"\n' for k, v in zip(keys, values, strict=True)]
        filler_len = self.seq_len - 1 - sum(len(line) for line in lines)
        defined_at = rng.random(count) * filler_len
        asked_at = defined_at + np.sqrt(rng.random(count)) * (filler_len - defined_at)  # more long ranges
        start = int(rng.integers(0, len(self.stream) - filler_len))
        cuts = self.line_starts(start, np.concatenate([defined_at, asked_at]).astype(np.int64), filler_len)
        filler, pieces, previous = self.stream[start : start + filler_len], [], 0
        for index in np.lexsort((np.arange(2 * count), cuts)):  # by cut, definitions before their queries
            pieces += [filler[previous : cuts[index]], np.frombuffer(lines[index].encode(), dtype=np.uint8)]
            previous = cuts[index]
        return np.concatenate([*pieces, filler[previous:]])

    def line_starts(self, start: int, cuts: np.ndarray, limit: int) -> np.ndarray:
        """Each cut (relative to `start`) moved forward to the next line start, at most `limit`."""
        index = np.minimum(np.searchsorted(self.newlines, start + cuts), len(self.newlines) - 1)
        return np.clip(self.newlines[index] + 1 - start, 0, limit)


# ---------------------------------------------------------------- training


def parse_phases(spec: str) -> list[tuple[int, int, int]]:
    """`"512x128x1500,2048x32x1500"` -> [(batch, seq_len, steps), ...] from SEQxBATCHxSTEPS items."""
    phases = []
    for item in spec.split(","):
        seq_len, batch, steps = (int(part) for part in item.split("x"))
        phases.append((batch, seq_len, steps))
    return phases


def phases_text(phases: list[tuple[int, int, int]]) -> str:
    """The `--phases` spelling of `phases`, so that a fitted run can be repeated exactly."""
    return ",".join(f"{seq_len}x{batch}x{steps}" for batch, seq_len, steps in phases)


def fit_phases(phases: list[tuple[int, int, int]], budget: float, device: torch.device) -> list[tuple[int, int, int]]:
    """Scale every phase's steps so that training takes about `budget` seconds, timed on a throwaway model."""
    model = LlamaForCausalLM(model_config()).to(device)
    optimizer = make_optimizer(model, 1e-4, device)
    shapes = [(batch, seq_len) for batch, seq_len, _ in phases]
    seconds = [step_seconds(model, optimizer, torch.randint(0, 256, shape, device=device)) for shape in shapes]
    print(
        "time per step: " + ", ".join(f"{t * 1e3:.1f} ms at seq {s[1]}" for s, t in zip(shapes, seconds, strict=True))
    )
    scale = budget / sum(phase[2] * t for phase, t in zip(phases, seconds, strict=True))
    return [(batch, seq_len, max(1, round(steps * scale))) for batch, seq_len, steps in phases]


def step_seconds(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """Mean wall time of a training step on `ids` [batch, seq_len]: 3 warm-ups, then 5 timed."""
    for _ in range(3):
        train_step(model, optimizer, ids)
    synchronize(ids.device)
    began = time.perf_counter()
    for _ in range(5):
        train_step(model, optimizer, ids)
    synchronize(ids.device)
    return (time.perf_counter() - began) / 5


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host clock reads the real time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learning_rate(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train(args: argparse.Namespace) -> LlamaForCausalLM:
    """Train from scratch through the phases; print the loss every `--log-every` steps; return the model."""
    device = torch.device(args.device)
    phases = parse_phases(args.phases)
    if args.time_budget:
        phases = fit_phases(phases, args.time_budget, device)
    print(f"phases: {phases_text(phases)}")
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config()).to(device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    optimizer = make_optimizer(model, args.lr, device)
    stream, newlines = load_stream(args.data)
    total, step, began = sum(p[2] for p in phases), 0, time.perf_counter()
    for shape in phases:
        loader = DataLoader(
            Batches(stream, newlines, shape, args.seed),
            batch_size=None,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
        )
        running, count = torch.zeros((), device=device), 0
        for index, batch in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, args.lr)
            running += train_step(model, optimizer, batch.to(device, non_blocking=True))
            step, count = step + 1, count + 1
            if count == args.log_every or index == shape[2] - 1:
                elapsed = time.perf_counter() - began
                print(f"step {step:5d}/{total}  seq {shape[1]}  loss {running.item() / count:.4f}  {elapsed:6.1f}s")
                running, count = running.zero_(), 0
                if args.time_limit and elapsed > args.time_limit:
                    print(f"WARNING: stopping at step {step}: --time-limit {args.time_limit}s reached")
                    return model
    print(f"training time: {time.perf_counter() - began:.1f}s for {step} steps")
    return model


def train_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> torch.Tensor:
    """One AdamW step on next-byte cross-entropy under bf16 autocast; returns the detached loss."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_nll(model: LlamaForCausalLM, window: int = 2048) -> float:
    """Mean next-byte negative log-likelihood (nats) over the held-out text, in windows of `window` tokens."""
    ids = encode(heldout_text())
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window - 1):
        chunk = torch.cat([torch.tensor([BOS_ID]), ids[start : start + window - 1]]).to(device)[None]
        logits = model(input_ids=chunk).logits.float()
        losses = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total, count = total + losses.item(), count + chunk.shape[1] - 1
    return total / count


def unigram_nll(data: Path) -> float:
    """Held-out NLL (nats/byte) of a unigram byte model fit on the training corpus (add-one smoothing)."""
    with np.load(data) as archive:
        counts = np.bincount(archive["text"], minlength=256).astype(np.float64) + 1.0
    probs = counts / counts.sum()
    heldout = np.frombuffer(heldout_text().encode(), dtype=np.uint8)
    return float(-np.log(probs[heldout]).mean())


def needle_accuracy(model: LlamaForCausalLM, context: int, depth: float, probes: int) -> float:
    """Share of `probes` needle prompts (seeds 0..probes-1) whose greedy answer matches exactly."""
    pairs = [make_needle_prompt(context, depth, seed) for seed in range(probes)]
    prompts, answers = torch.stack([p for p, _ in pairs]), torch.stack([a for _, a in pairs])
    generated = greedy_continuation(model, prompts, answers.shape[1])
    return (generated == answers).all(dim=1).float().mean().item()


def evaluate(model: LlamaForCausalLM, data: Path, probes: int) -> None:
    """Print held-out perplexity beside the unigram baseline, and the needle accuracy grid."""
    model.eval()
    nll, base = heldout_nll(model), unigram_nll(data)
    print(f"held-out perplexity (bytes): {math.exp(nll):.3f}  ({nll / math.log(2):.3f} bits/byte)")
    print(f"unigram baseline perplexity: {math.exp(base):.3f}  ({base / math.log(2):.3f} bits/byte)")
    depths = (0.1, 0.5, 0.9)
    print(f"needle accuracy, greedy exact match, {probes} probes each")
    print("context  " + "  ".join(f"depth {d:.1f}" for d in depths))
    for context in (512, 1024, 2048):
        cells = [needle_accuracy(model, context, depth, probes) for depth in depths]
        print(f"{context:7d}  " + "  ".join(f"{c:9.0%}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("build-data", "train", "evaluate"))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the corpus .npz from build-data")
    parser.add_argument("--out-dir", type=Path, default=None, help="save_pretrained folder (train)")
    parser.add_argument("--model-dir", type=Path, default=None, help="model to evaluate (default: the shipped one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--phases", default="512x128x2993,2048x32x2993", help="SEQxBATCHxSTEPS,...")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=6, help="data loader processes")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--time-budget", type=float, default=0.0, help="scale --phases' steps to about this many s")
    parser.add_argument("--time-limit", type=float, default=0.0, help="stop training after this many seconds")
    parser.add_argument("--probes", type=int, default=20, help="needle probes per (context, depth)")
    args = parser.parse_args()
    if args.command == "build-data":
        build_data(args.data)
        return
    if args.command == "train":
        model = train(args)
        if args.out_dir is not None:
            model.to(torch.bfloat16).save_pretrained(args.out_dir)
            print(f"saved to {args.out_dir}")
        model = model.float()
    else:
        model = load_reference_model(args.model_dir, device=args.device)
    evaluate(model, args.data, args.probes)


if __name__ == "__main__":
    main()
