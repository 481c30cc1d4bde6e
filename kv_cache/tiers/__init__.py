"""Tiers below the GPU pool: stores of encoded blocks keyed by block hash (DESIGN.md, "Tier").

| module | what |
| --- | --- |
| `base` | `Tier`: `get_many`, `put_many`, `get_chain`, `record_invalid`, `flush`, `stats`, `close`; `CircuitBreaker` |
| `codec` | `encode_block` / `decode_block`: one block, all layers, as header + raw bytes; a bad value decodes to None |
| `cpu` | `CpuTier`: host pools mirroring the device formats (swap and demoted prefix blocks) |
| `redis` | `RedisTier`, `RedisTierConfig`, `redis_key`: needs the `redis` extra, so import `kv_cache.tiers.redis` |
| `remote` | `RemoteLink`: the prefix cache's remote level (fetch, write-down); `FetchCost`: fetch vs recompute |

The lookup order is GPU pool -> CPU tier -> Redis; a tier that fails answers misses, never wrong data.
"""

from kv_cache.tiers.base import CircuitBreaker, FaultKind, Tier
from kv_cache.tiers.codec import block_layout, decode_block, encode_block, format_fingerprint, token_digest

__all__ = [
    "CircuitBreaker",
    "FaultKind",
    "Tier",
    "block_layout",
    "decode_block",
    "encode_block",
    "format_fingerprint",
    "token_digest",
]
