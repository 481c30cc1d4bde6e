"""How low-rank the reference model's keys and values are: per-head PCA fitted on one held-out window, measured on
another (relative Frobenius error of the reconstruction), per layer, at several ranks.

Run: python benchmarks/low_rank.py [--out benchmarks/results/low_rank.txt]
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import DynamicCache

from kv_cache.low_rank import fit_basis
from kv_cache.reference_model import encode, heldout_text, load_reference_model

RANKS = (16, 32, 48)


def layer_states(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values `[tokens, kv_heads, head_dim]` of each layer after a forward of `ids`."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[None], past_key_values=cache)
    return [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in cache.layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = load_reference_model()
    text = heldout_text()
    fit_on = layer_states(model, encode(text[:2048], add_bos=True))
    test_on = layer_states(model, encode(text[50000:52048], add_bos=True))
    head_dim = fit_on[0][0].shape[-1]
    lines = [
        f"command: python {' '.join(sys.argv)}",
        f"reference model, head_dim {head_dim}; basis fitted on held-out bytes 0-2048, tested on 50000-52048",
        f"{'rank':>5} {'bytes kept':>10}  relative error per layer (keys / values)",
    ]
    for rank in RANKS:
        cells = []
        for (keys, values), (test_keys, test_values) in zip(fit_on, test_on, strict=True):
            errors = []
            for fit, test in ((keys, test_keys), (values, test_values)):
                basis = fit_basis(fit, rank=rank)
                errors.append(float((basis.reconstruct(basis.project(test)) - test).norm() / test.norm()))
            cells.append(f"{errors[0]:.3f}/{errors[1]:.3f}")
        lines.append(f"{rank:>5} {rank / head_dim:>9.0%}  " + "  ".join(cells))
    text_out = "\n".join(lines)
    print(text_out)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text_out + "\n")


if __name__ == "__main__":
    main()
