"""The shipped reference model: it loads from the package, round-trips through save_pretrained, is really trained
(held-out perplexity, needle retrieval), and its byte tokenizer and needle probes behave."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from kv_cache.errors import CacheValidationError
from kv_cache.reference_model import (
    BOS_ID,
    EOS_ID,
    NEEDLE_VALUE_CHARS,
    NEEDLE_VALUE_LENGTH,
    PAD_ID,
    REFERENCE_MODEL_DIR,
    VOCAB_SIZE,
    decode,
    encode,
    greedy_continuation,
    heldout_text,
    load_reference_model,
    make_needle_prompt,
    needle_query,
)

# Measured: 2.26 on these bytes (2.17 on the whole held-out text); a unigram byte model gets 23.7.
HELDOUT_PERPLEXITY_BOUND = 3.0


def test_shipped_model_loads_with_from_pretrained_from_the_package() -> None:
    model = LlamaForCausalLM.from_pretrained(REFERENCE_MODEL_DIR)
    config = model.config
    assert (config.vocab_size, config.num_attention_heads, config.num_key_value_heads) == (VOCAB_SIZE, 8, 2)
    assert config.max_position_embeddings >= 2048
    assert 2_000_000 < sum(p.numel() for p in model.parameters()) < 4_000_000
    assert (REFERENCE_MODEL_DIR / "model.safetensors").stat().st_size < 8_000_000


def test_load_reference_model_is_eval_mode_in_the_asked_dtype(model: LlamaForCausalLM) -> None:
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_load_reference_model_rejects_a_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(CacheValidationError, match="path="):
        load_reference_model(tmp_path)


def test_save_pretrained_round_trip_gives_identical_logits(model: LlamaForCausalLM, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path)
    reloaded = load_reference_model(tmp_path)
    ids = encode("def add(a, b):\n    return a + b\n", add_bos=True)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_tokenizer_round_trips_text(text: str) -> None:
    ids = encode(text)
    assert ids.dtype == torch.long
    assert bytes(ids.tolist()) == text.encode("utf-8")
    assert decode(ids) == text


def test_encode_adds_bos_and_decode_drops_special_ids() -> None:
    ids = encode("é", add_bos=True)
    assert ids.tolist() == [BOS_ID, 0xC3, 0xA9]
    assert decode([BOS_ID, *b"ab", EOS_ID, PAD_ID]) == "ab"


def test_needle_prompt_has_the_asked_length_and_is_deterministic() -> None:
    prompt, answer = make_needle_prompt(300, 0.5, seed=3)
    again, same_answer = make_needle_prompt(300, 0.5, seed=3)
    assert prompt.shape == (300,) and prompt[0].item() == BOS_ID
    assert torch.equal(prompt, again) and torch.equal(answer, same_answer)
    assert answer.shape == (NEEDLE_VALUE_LENGTH,) and set(decode(answer)) <= set(NEEDLE_VALUE_CHARS)
    text = decode(prompt)
    key = int(text.rsplit("key_", 1)[1].split(" ")[0])
    assert text.endswith(needle_query(key))
    defined_at = text.index(f'key_{key} = "{decode(answer)}"')
    assert 0.4 * len(text) < defined_at < 0.7 * len(text)


@pytest.mark.parametrize(("context_tokens", "depth"), [(10, 0.5), (256, -0.1), (256, 1.5), (10_000_000, 0.5)])
def test_make_needle_prompt_rejects_bad_arguments(context_tokens: int, depth: float) -> None:
    with pytest.raises(CacheValidationError):
        make_needle_prompt(context_tokens, depth, seed=0)


def test_shipped_model_answers_a_needle_probe(model: LlamaForCausalLM) -> None:
    prompt, answer = make_needle_prompt(256, 0.1, seed=0)  # smallest logit margin over the answer: 7.4
    assert torch.equal(greedy_continuation(model, prompt, len(answer)), answer)


def test_shipped_model_predicts_heldout_code(model: LlamaForCausalLM) -> None:
    ids = encode(heldout_text()[:4000], add_bos=True)[:1024][None]
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert math.exp(nll) < HELDOUT_PERPLEXITY_BOUND
