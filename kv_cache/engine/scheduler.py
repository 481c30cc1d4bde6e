"""`Scheduler`: the waiting and running queues, and what each engine step computes (continuous batching).

Each `schedule()` plans one step:

  1. Running requests, oldest first, get their tokens: one if decoding, else a prompt chunk out of the step's
     prefill budget (`prefill_chunk_size` tokens shared by all prefilling requests), so a long prompt is spread
     over several steps while the others keep decoding. When blocks are short the memory manager evicts cached
     prefix blocks; a chunk then halves until it fits; then the newest running request is preempted (swapped to
     the CPU tier or dropped for recompute), until this one fits. If this one is itself the newest it is
     preempted, and if it runs alone it fails with `CacheMemoryError`: nothing else can be freed.
  2. Waiting requests join, in arrival order (a preempted request keeps its place), while fewer than
     `max_num_seqs` run, prefill budget is left, and their first tokens fit without preempting anyone. A new
     request first adopts the longest cached prefix of its prompt; a swapped one is copied back.

Finished requests leave in the engine right after the forward that finished them, and free their blocks there.
Decoding rows are batched into one forward (each at its own length); each prefill chunk is one forward.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from dataclasses import dataclass, field

from kv_cache.engine.config import EngineConfig
from kv_cache.engine.request import FinishReason, Request, RequestStatus
from kv_cache.memory_manager import BlockNeeds, MemoryManager
from kv_cache.stats import CacheStatsTracker


@dataclass
class StepPlan:
    """What one step computes: `decode` rows (one token each, one forward) and `prefill` chunks (request,
    tokens), the blocks they will allocate (`reserved`), and the prefill tokens left (`budget`)."""

    budget: int
    decode: list[Request] = field(default_factory=list)
    prefill: list[tuple[Request, int]] = field(default_factory=list)
    reserved: BlockNeeds = field(default_factory=BlockNeeds)
    failed: list[Request] = field(default_factory=list)

    def add(self, request: Request, count: int) -> None:
        if request.num_pending == 1:
            self.decode.append(request)
        else:
            self.prefill.append((request, count))
            self.budget -= count


class Scheduler:
    """FIFO continuous batching over one block pool (nano-vllm's scheduler, with chunked prefill).

    Args:
        config: `max_num_seqs`, `prefill_chunk_size`.
        memory: block accounting, prefix reuse, preemption mechanics.
        tracker: where prefix-reuse and preemption counters go.
    """

    def __init__(self, config: EngineConfig, memory: MemoryManager, tracker: CacheStatsTracker) -> None:
        self.config = config
        self.memory = memory
        self.tracker = tracker
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order: the newest is last
        self._lock = threading.Lock()  # `add` may come from other threads while a step runs

    def add(self, request: Request) -> None:
        with self._lock:
            self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of whichever queue holds it (abort, finish, failure)."""
        with self._lock:
            if request in self.waiting:
                self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> StepPlan:
        """Plan one step (rules in the module docstring); preemptions and failures happen here."""
        plan = StepPlan(budget=self.config.prefill_chunk_size)
        for request in list(self.running):
            if request not in self.running or self._grant(request, plan, may_preempt=True):
                continue
            if self._wants(request, plan) and request is self.running[-1]:  # no room even alone at the end
                self._preempt_or_fail(request, plan)
        while len(self.running) < self.config.max_num_seqs and plan.budget > 0:
            head = self._head()
            if head is None or (not self._admit(head, plan) and self.running):
                break
            if head.status is RequestStatus.WAITING:  # not admitted although nothing runs: it can never fit
                self._fail(head, plan)
        return plan

    def _head(self) -> Request | None:
        with self._lock:
            return self.waiting[0] if self.waiting else None

    def _wants(self, request: Request, plan: StepPlan) -> int:
        """Tokens the request would compute this step: 1 when decoding, else a chunk of the budget left."""
        return 1 if request.num_pending == 1 else min(request.num_pending, plan.budget)

    def _grant(self, request: Request, plan: StepPlan, may_preempt: bool) -> bool:
        """Schedule the request's tokens (halving a chunk that does not fit); preempt newer ones if allowed."""
        want = self._wants(request, plan)
        if want == 0 or request.seq_id is None:
            return False
        while True:
            count = want
            while count:
                needs = self.memory.append_needs(request.seq_id, count)
                if self.memory.make_room(needs + plan.reserved):
                    plan.reserved += needs
                    plan.add(request, count)
                    return True
                count //= 2
            if not may_preempt or self.running[-1] is request:
                return False
            self._preempt(self.running[-1])

    def _admit(self, request: Request, plan: StepPlan) -> bool:
        """Start a waiting request (prefix reuse, or swap-in) if its first tokens fit; False leaves it waiting."""
        if request.swapped is not None:
            if not self.memory.make_room(self.memory.swap_in_needs(request.swapped) + plan.reserved):
                return False
            self.memory.swap_in(request)
            self._grant(request, plan, may_preempt=False)  # fits: `swap_in_needs` kept room for it
        else:
            reused = self.memory.allocate(request, plan.reserved)
            if not self._grant(request, plan, may_preempt=False):
                self.memory.free(request)
                request.num_computed = 0
                return False
            self._count_reuse(request, reused)
        with self._lock:
            self.waiting.popleft()
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return True

    def _count_reuse(self, request: Request, reused: int) -> None:
        """Prefix-cache accounting: prompt hits on first admission; after a preemption, what is recomputed."""
        if request.preemptions == 0:
            prompt = len(request.prompt_ids)
            request.prefix_hit_tokens = reused
            self.tracker.record_read(reused, prompt - reused)  # the tracker's hit rate = prompt tokens reused
            self.tracker.increment("prompt_tokens", prompt)
            self.tracker.increment("prompt_hit_tokens", reused)
            self.tracker.increment("short_prompts", int(prompt < self.memory.block_size))
        else:
            recomputed = max(0, request.computed_before_preemption - reused)
            request.recomputed_tokens += recomputed
            self.tracker.increment("recomputed_tokens", recomputed)
            self.tracker.increment("resume_reused_tokens", reused)

    def requeue(self, request: Request) -> None:
        """Preempt a running request for recompute, whatever `preemption_mode` says (rollback after an OOM)."""
        self._preempt(request, allow_swap=False)

    def _preempt(self, request: Request, allow_swap: bool = True) -> None:
        """Take a running request off the device and put it back in the waiting queue at its arrival place."""
        self.running.remove(request)
        request.computed_before_preemption = request.num_computed
        self.memory.preempt(request, allow_swap)
        request.status = RequestStatus.WAITING
        request.preemptions += 1
        self.tracker.increment("preemptions")
        with self._lock:
            bisect.insort(self.waiting, request, key=lambda r: r.arrival)

    def _preempt_or_fail(self, request: Request, plan: StepPlan) -> None:
        """The newest request cannot get a token: preempt it, or fail it if nothing else runs."""
        if len(self.running) > 1:
            self._preempt(request)
        else:
            self._fail(request, plan)

    def _fail(self, request: Request, plan: StepPlan) -> None:
        """Fail a request that cannot fit even alone (it leaves the queues; its blocks are freed)."""
        error = self.memory.capacity_error(request, self.memory.total_needs(request.num_tokens + 1))
        self.remove(request)
        self.memory.free(request)
        if request.swapped is not None:
            self.memory.discard(request.swapped)
            request.swapped = None
        request.finish(RequestStatus.FAILED, FinishReason.ERROR, error)
        self.tracker.increment("failed_requests")
        self.tracker.record_error(error)
        plan.failed.append(request)
