"""The trained reference model: a ~3M-parameter byte-level Llama shipped in `kv_cache/data/reference_model/`.

Random-weight models attend almost uniformly, so they cannot tell a good eviction policy or quantizer from a bad
one. This model was trained by `scripts/train_reference_model.py` on the Python standard library's source files
mixed with synthetic retrieval lines, so it really predicts code and really copies from far back.

Vocabulary: ids 0..255 are the bytes of UTF-8 text; `BOS_ID`, `EOS_ID` and `PAD_ID` follow. No tokenizer file.

Needle probe (the retrieval format the model was trained on)::

    <BOS> held-out code ... key_4821 = "7f3a9c"\\n ... held-out code ...\\nkey_4821 ==> "      -> answer: 7f3a9c
          |<------------ depth * context ------------>|
          |<------------------------------ context_tokens ------------------------------>|
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import Cache, LlamaForCausalLM

from kv_cache.errors import CacheValidationError

BYTE_VOCAB = 256
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259

DATA_DIR = Path(__file__).resolve().parent / "data"
REFERENCE_MODEL_DIR = DATA_DIR / "reference_model"
HELDOUT_PATH = DATA_DIR / "heldout_code.txt"

NEEDLE_KEYS = range(1000, 10000)
NEEDLE_VALUE_CHARS = "0123456789abcdef"
NEEDLE_VALUE_LENGTH = 6
MIN_NEEDLE_CONTEXT = 64


def load_reference_model(
    path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """Load the shipped model (or the `save_pretrained` folder at `path`) in eval mode on `device`."""
    folder = Path(path) if path is not None else REFERENCE_MODEL_DIR
    if not (folder / "config.json").is_file():
        raise CacheValidationError(f"path={str(folder)!r} holds no config.json; pass a save_pretrained folder")
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


def encode(text: str, add_bos: bool = False) -> torch.Tensor:
    """UTF-8 bytes of `text` as ids: LongTensor [tokens], with `BOS_ID` first when `add_bos`."""
    ids = list(text.encode("utf-8"))
    return torch.tensor([BOS_ID, *ids] if add_bos else ids, dtype=torch.long)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Text of byte ids [tokens]; special ids are dropped and invalid UTF-8 becomes U+FFFD."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return bytes(i for i in values if 0 <= i < BYTE_VOCAB).decode("utf-8", errors="replace")


def heldout_text() -> str:
    """Held-out standard-library source (files never trained on), concatenated, a few hundred KB."""
    return HELDOUT_PATH.read_bytes().decode("utf-8")


def needle_definition(key: int, value: str) -> str:
    """The line that defines a needle, e.g. `key_4821 = "7f3a9c"` and a newline."""
    return f'key_{key} = "{value}"\n'


def needle_query(key: int) -> str:
    """The text that asks for a needle; the model should continue it with the value."""
    return f'key_{key} ==> "'


def random_needle(rng: random.Random) -> tuple[int, str]:
    """A random key in `NEEDLE_KEYS` and a random value of `NEEDLE_VALUE_LENGTH` hex characters."""
    key = rng.choice(NEEDLE_KEYS)
    return key, "".join(rng.choice(NEEDLE_VALUE_CHARS) for _ in range(NEEDLE_VALUE_LENGTH))


def make_needle_prompt(context_tokens: int, depth: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A retrieval probe: a needle defined at relative `depth` of held-out code, asked for at the end.

    Returns `(prompt_ids, answer_ids)`: LongTensor [context_tokens] (BOS first, the query last) and LongTensor
    [NEEDLE_VALUE_LENGTH] (the value's bytes). The same arguments always give the same probe.
    """
    if context_tokens < MIN_NEEDLE_CONTEXT:
        raise CacheValidationError(f"context_tokens={context_tokens} is too short; use >= {MIN_NEEDLE_CONTEXT}")
    if not 0.0 <= depth <= 1.0:
        raise CacheValidationError(f"depth={depth} is outside [0, 1]; it is the needle's relative position")
    rng = random.Random(seed)
    key, value = random_needle(rng)
    definition, query = needle_definition(key, value).encode(), needle_query(key).encode()
    filler = _heldout_window(rng, context_tokens - 1 - len(definition) - len(query))
    at = _next_line_start(filler, round(depth * len(filler)))
    text = filler[:at] + definition + filler[at:]
    prompt = torch.tensor([BOS_ID, *text, *query], dtype=torch.long)
    return prompt, torch.tensor(list(value.encode()), dtype=torch.long)


def _heldout_window(rng: random.Random, length: int) -> bytes:
    """`length` bytes of held-out code starting at a random line start, ending with a newline."""
    source = HELDOUT_PATH.read_bytes()
    if length + 1 > len(source):
        raise CacheValidationError(
            f"context_tokens needs {length} bytes of filler but the held-out text has {len(source)}; ask for fewer"
        )
    start = _next_line_start(source, rng.randrange(len(source) - length))
    window = (source[start:] + source)[: length - 1]
    return window + b"\n"


def _next_line_start(text: bytes, position: int) -> int:
    """The first line start at or after `position` in `text`, or `len(text)` if none."""
    if position == 0 or text[position - 1 : position] == b"\n":
        return position
    newline = text.find(b"\n", position)
    return len(text) if newline < 0 else newline + 1


@torch.no_grad()
def greedy_continuation(
    model: LlamaForCausalLM, prompt_ids: torch.Tensor, num_tokens: int, past_key_values: Cache | None = None
) -> torch.Tensor:
    """Greedy decode `num_tokens` ids after `prompt_ids` (LongTensor [batch, tokens] or [tokens]).

    `past_key_values` is the (empty) cache to decode with, e.g. a kv_cache `KVCache`; `None` uses the model's
    default. Returns LongTensor [batch, num_tokens] (or [num_tokens] for a 1-D prompt), on the prompt's device.
    """
    if num_tokens < 1:
        raise CacheValidationError(f"num_tokens={num_tokens}; greedy_continuation decodes at least 1 token")
    ids = prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), past_key_values=past_key_values, use_cache=True)
    generated = [out.logits[:, -1].argmax(dim=-1)]
    for _ in range(num_tokens - 1):
        out = model(input_ids=generated[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
        generated.append(out.logits[:, -1].argmax(dim=-1))
    tokens = torch.stack(generated, dim=1).to(prompt_ids.device)
    return tokens if prompt_ids.dim() == 2 else tokens[0]
