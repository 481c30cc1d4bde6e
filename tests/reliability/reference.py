"""The plain reference model the state machines compare against: contiguous tensors per sequence and layer.

Each layer of a reference sequence holds what a read must return, token by token, as fp32 `[kv_heads, tokens,
head_dim]`: the appended values rounded to the storage dtype (and to the model dtype on the way out), and for the
tokens of sealed blocks `dequantize(quantize(block))` of the values the block held when it was sealed (the
quantizer of `kv_cache.quantizer`, per block, as tests/test_quantized_store.py builds its reference). When blocks
are sealed follows the documented rule of `kv_cache.sealing` (a layer seals every whole block older than the
`residual_tokens` window; when it does, the blocks it seals that another layer already holds whole are sealed
there too), so
the reference also predicts `num_sealed`. Nothing here imports the store.

Also the suite's shared vocabulary: the shapes, the configs (`store_config`, `quantized`), and `assert_read`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kv_cache import KVCacheConfig
from kv_cache.quantizer import dequantize_keys, dequantize_values, quantize_keys, quantize_values, value_group_size

HEADS, DIM, BLOCK, WINDOW = 2, 8, 4, 8
MAX_TOKENS = 40


def store_config(**options: object) -> KVCacheConfig:
    base: dict[str, object] = {"max_tokens": MAX_TOKENS, "block_size": BLOCK, "num_blocks": 48, "device": "cpu"}
    return KVCacheConfig(**{**base, **options})  # type: ignore[arg-type]


def quantized(bits: int, **options: object) -> KVCacheConfig:
    base: dict[str, object] = {"quantization_group_size": 4, "residual_tokens": WINDOW}
    return store_config(use_quantization=True, quantization_bits=bits, **{**base, **options})


def randn(generator: torch.Generator, batch: int, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(batch, HEADS, tokens, DIM, generator=generator).to(dtype)


Pair = tuple[torch.Tensor, torch.Tensor]


def assert_read(got: Pair, expected: Pair, sealed: int) -> None:
    """Keys/values `[batch, kv_heads, tokens, head_dim]` read back vs the reference (fp32): the first `sealed`
    tokens within fp32 rounding of the dequantized reference, the full-precision tail identical."""
    for tensor, reference in zip(got, expected, strict=True):
        tensor = tensor.float()
        torch.testing.assert_close(tensor[:, :, :sealed], reference[:, :, :sealed], rtol=0, atol=1e-6)
        assert torch.equal(tensor[:, :, sealed:], reference[:, :, sealed:])


@dataclass(frozen=True)
class Spec:
    """A store configuration under test: the config, the model dtype of the tensors fed to it, the layers, and
    the batch size `KVStore.initialize` sizes the pools for (None: sized lazily by the first append)."""

    name: str
    config: KVCacheConfig
    model_dtype: torch.dtype = torch.float32
    num_layers: int = 2
    initialize_batch: int | None = 4

    @property
    def block_size(self) -> int:
        return self.config.tokens_per_block

    @property
    def quantized(self) -> bool:
        return self.config.use_quantization

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.config.dtype or self.model_dtype

    def bits(self, layer: int) -> int:
        bits = self.config.bits_per_layer(self.num_layers)
        assert bits is not None
        return bits[layer]


@dataclass
class Layer:
    """One layer of a reference sequence: `[kv_heads, tokens, head_dim]` fp32 keys/values as a read returns
    them, tokens sealed, tokens evicted, and (when tracked) attention mass `[kv_heads, tokens]`."""

    keys: torch.Tensor
    values: torch.Tensor
    sealed: int = 0
    evicted: int = 0
    mass: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    def copy(self) -> Layer:
        mass = None if self.mass is None else self.mass.clone()
        return Layer(self.keys.clone(), self.values.clone(), self.sealed, self.evicted, mass)

    def cut(self, length: int) -> None:
        self.keys, self.values = self.keys[:, :length], self.values[:, :length]
        if self.mass is not None:
            self.mass = self.mass[:, :length]


@dataclass
class Sequence:
    layers: list[Layer] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return max(layer.length for layer in self.layers)

    def copy(self) -> Sequence:
        return Sequence([layer.copy() for layer in self.layers])


class Reference:
    """Sequences of a store of `spec`, by the id the store gave them."""

    def __init__(self, spec: Spec, kv_heads: int, head_dim: int, track_mass: bool = False) -> None:
        self.spec = spec
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.track_mass = track_mass
        self.seqs: dict[int, Sequence] = {}

    def add(self, seq_id: int) -> None:
        empty = torch.zeros(self.kv_heads, 0, self.head_dim)
        mass = torch.zeros(self.kv_heads, 0) if self.track_mass else None
        self.seqs[seq_id] = Sequence([Layer(empty, empty, mass=mass) for _ in range(self.spec.num_layers)])

    def append(self, seq_id: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values: `[kv_heads, tokens, head_dim]` in the model dtype, as given to `KVStore.append`."""
        sequence, spec = self.seqs[seq_id], self.spec
        target = sequence.layers[layer]
        stored = [x.to(spec.storage_dtype).to(spec.model_dtype).float() for x in (keys, values)]
        target.keys, target.values = torch.cat([target.keys, stored[0]], 1), torch.cat([target.values, stored[1]], 1)
        if target.mass is not None:
            target.mass = torch.cat([target.mass, torch.zeros(self.kv_heads, keys.shape[1])], 1)
        if spec.quantized:
            self._seal_after_append(sequence, layer)

    def _seal_after_append(self, sequence: Sequence, layer: int) -> None:
        size, window = self.spec.block_size, self.spec.config.residual_tokens
        own = sequence.layers[layer]
        seal_to = max(own.sealed, (own.length - window) // size * size)
        if seal_to == own.sealed:  # other layers seal only alongside a layer that seals now
            return
        for index, other in enumerate(sequence.layers):
            target = seal_to if index == layer else min(seal_to, other.length // size * size)
            if target > other.sealed:
                self._seal(other, target, self.spec.bits(index))

    def _seal(self, layer: Layer, upto: int, bits: int) -> None:
        """Replace tokens `[layer.sealed, upto)` (whole blocks) by their quantized round trip."""
        size, heads, dim = self.spec.block_size, self.kv_heads, self.head_dim
        span = slice(layer.sealed, upto)
        blocks = [x[:, span].reshape(heads, -1, size, dim).permute(1, 2, 0, 3) for x in (layer.keys, layer.values)]
        group = value_group_size(dim, self.spec.config.quantization_group_size)
        keys = dequantize_keys(*quantize_keys(blocks[0], bits), head_dim=dim)
        values = dequantize_values(*quantize_values(blocks[1], bits, group), head_dim=dim)
        for name, restored in (("keys", keys), ("values", values)):
            tokens = restored.permute(2, 0, 1, 3).reshape(heads, upto - layer.sealed, dim)
            getattr(layer, name)[:, span] = tokens.to(self.spec.model_dtype).float()
        layer.sealed = upto

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep the first `num_tokens` of every layer; a cut inside sealed blocks unseals the cut block (its kept
        tokens hold their dequantized values, now rounded to the storage dtype in the tail)."""
        sequence, size = self.seqs[seq_id], self.spec.block_size
        if num_tokens >= sequence.num_tokens:
            return
        unseal = max(layer.sealed for layer in sequence.layers) > num_tokens
        for layer in sequence.layers:
            layer.cut(min(layer.length, num_tokens))
            if unseal:
                layer.sealed = num_tokens // size * size
                tail = slice(layer.sealed, layer.length)
                for tensor in (layer.keys, layer.values):
                    tensor[:, tail] = tensor[:, tail].to(self.spec.storage_dtype).float()

    def truncate_refused(self, seq_id: int, num_tokens: int) -> bool:
        """Whether `truncate` must raise: a cut into sealed blocks while the layers differ in length or seal."""
        layers = self.seqs[seq_id].layers
        if num_tokens >= self.seqs[seq_id].num_tokens or max(x.sealed for x in layers) <= num_tokens:
            return False
        return len({x.sealed for x in layers}) > 1 or len({x.length for x in layers}) > 1

    def keep(self, seq_id: int, layer: int, keep: torch.Tensor) -> None:
        """keep: `[kv_heads, kept]` ascending token indices per head."""
        target = self.seqs[seq_id].layers[layer]
        heads = torch.arange(self.kv_heads)[:, None]
        target.evicted += target.length - keep.shape[1]
        target.keys, target.values = target.keys[heads, keep], target.values[heads, keep]
        if target.mass is not None:
            target.mass = target.mass[heads, keep]

    def adopt(self, source: int, seq_id: int, tokens: int, sealed: int) -> None:
        """`seq_id` (empty) starts with the first `tokens` of `source` in every layer, the first `sealed` sealed."""
        for layer, new in zip(self.seqs[source].layers, self.seqs[seq_id].layers, strict=True):
            new.keys, new.values = layer.keys[:, :tokens].clone(), layer.values[:, :tokens].clone()
            new.sealed = sealed
            if layer.mass is not None:  # attention mass is the sequence's own: adopted tokens start unscored
                new.mass = torch.zeros_like(layer.mass[:, :tokens])

    def add_mass(self, seq_id: int, layer: int, mass: torch.Tensor) -> None:
        """mass: `[kv_heads, tokens]` fp32 attention received by each held token."""
        target = self.seqs[seq_id].layers[layer]
        assert target.mass is not None
        target.mass = target.mass + mass

    def read(self, seq_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What `KVStore.read([seq_id], layer)` must return, as fp32 `[1, kv_heads, tokens, head_dim]`."""
        target = self.seqs[seq_id].layers[layer]
        return target.keys[None], target.values[None]
