"""`Request`: one prompt's life in the engine, and `SamplingParams`, how its next tokens are picked.

A request's tokens are its prompt followed by what it generated; `num_computed` of them have keys/values in the
store (sequence `seq_id`). The rest are *pending*: more than one while it prefills (prompt chunks, or everything
again after a preemption by recompute), exactly one while it decodes (the last sampled token). A forward that
computes up to the last token yields logits for the next one.

    tokens:   prompt ............................ | output ......... |
              |<-- num_computed (in the store) -->|<-- pending ----->|
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from kv_cache.errors import CacheError, CacheValidationError


@dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen and when it stops.

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / temperature).
        top_k: sample only among the `top_k` most likely tokens (None: all).
        top_p: sample only among the most likely tokens whose probabilities sum to `top_p` (nucleus), in (0, 1].
        seed: seeds the request's own `torch.Generator` (None: drawn from torch's global generator), so its
            samples do not depend on what else runs in the batch.
        stop_token_ids: generating one of these ends the request (the token is part of the output).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise CacheValidationError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise CacheValidationError(f"temperature={self.temperature!r} must be a finite number >= 0 (0: greedy)")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise CacheValidationError(f"top_k={self.top_k!r} must be an int >= 1, or None for all tokens")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise CacheValidationError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise CacheValidationError(f"seed={self.seed!r} must be an int or None")
        stops = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in stops):
            raise CacheValidationError(f"stop_token_ids={self.stop_token_ids!r} must be token ids (ints)")
        object.__setattr__(self, "stop_token_ids", stops)


class RequestStatus(str, Enum):
    WAITING = "waiting"  # not started, or preempted (its blocks swapped out or dropped)
    RUNNING = "running"  # holds a sequence in the store
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


class FinishReason(str, Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop token was generated
    ABORT = "abort"
    ERROR = "error"  # `Request.error` says why (e.g. `CacheMemoryError`: it can never fit)


@dataclass(eq=False)  # identity: queues find and remove this very request
class Request:
    """One prompt and its generated tokens, its place in the store, and its prefix-cache accounting.

    `swapped` is the CPU tier's handle while a swap-preempted request waits; `block_hashes`/`cached_blocks` are
    the prefix cache's bookkeeping (the chain hash of each full block, and how many leading blocks the cache
    holds for this request).
    """

    request_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: CacheError | None = None
    seq_id: int | None = None
    num_computed: int = 0
    swapped: Any = None
    block_hashes: list[bytes] = field(default_factory=list)
    cached_blocks: list[int] = field(default_factory=list)  # prefix-cache serials of the leading blocks
    prefix_hit_tokens: int = 0
    recomputed_tokens: int = 0
    computed_before_preemption: int = 0
    preemptions: int = 0
    arrival_time: float = 0.0  # time.perf_counter() at add_request, seconds
    first_token_time: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.sampling.temperature > 0:
            self.generator = torch.Generator()
            seed = self.sampling.seed
            self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ()).item()))

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens without keys/values in the store yet."""
        return self.num_tokens - self.num_computed

    @property
    def is_done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.ABORTED, RequestStatus.FAILED)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens reused from the prefix cache over prompt tokens (first admission only)."""
        return self.prefix_hit_tokens / len(self.prompt_ids)

    def append_token(self, token: int) -> None:
        """Add a sampled token; finish on a stop token or at `max_new_tokens`."""
        self.output_ids.append(token)
        if token in self.sampling.stop_token_ids:
            self.finish(RequestStatus.FINISHED, FinishReason.STOP)
        elif len(self.output_ids) >= self.sampling.max_new_tokens:
            self.finish(RequestStatus.FINISHED, FinishReason.LENGTH)

    def finish(self, status: RequestStatus, reason: FinishReason, error: CacheError | None = None) -> None:
        self.status, self.finish_reason, self.error = status, reason, error

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from `logits` `[vocab]` (any float dtype), by this request's `SamplingParams`."""
        params = self.sampling
        if params.temperature == 0:
            return int(logits.argmax())
        scores = logits.float() / params.temperature
        if params.top_k is not None and params.top_k < scores.numel():
            kth = scores.topk(params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if params.top_p < 1:
            ordered, order = scores.sort(descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
            scores = scores.scatter(0, order, ordered.masked_fill(drop, -math.inf))
        probs = scores.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))
