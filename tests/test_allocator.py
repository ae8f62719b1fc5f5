"""Tests for the KV slot allocator and the request->token table (runtime/mem_cache/allocator.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xinf_sglang.runtime.mem_cache.allocator import ReqToTokenPool, TokenAllocator


def _as_set(t: torch.Tensor) -> set[int]:
    return set(t.tolist())


# ---------------------------------------------------------------------------------------------- TokenAllocator


def test_alloc_returns_distinct_int64_slots_from_one_to_size():
    a = TokenAllocator(8)
    assert a.size == 8 and a.available == 8
    s = a.alloc(8)
    assert s is not None and s.dtype == torch.int64 and s.shape == (8,)
    assert _as_set(s) == set(range(1, 9))  # slot 0 is never handed out
    assert a.available == 0


def test_first_alloc_is_ascending_from_one():
    a = TokenAllocator(10)
    assert a.alloc(3).tolist() == [1, 2, 3]


def test_alloc_zero_and_none_when_exhausted_is_never_partial():
    a = TokenAllocator(4)
    z = a.alloc(0)
    assert z is not None and z.numel() == 0 and z.dtype == torch.int64
    assert a.alloc(5) is None
    assert a.available == 4  # the failed call took nothing
    s = a.alloc(3)
    assert a.alloc(2) is None
    assert a.available == 1
    assert a.alloc(1) is not None
    assert a.alloc(1) is None
    a.free(s)
    assert a.available == 3


def test_free_makes_slots_reusable_and_result_is_not_a_view():
    a = TokenAllocator(6)
    s1 = a.alloc(4)
    kept = s1.clone()
    a.free(s1[:2])
    s2 = a.alloc(2)
    assert _as_set(s2) == _as_set(kept[:2])
    a.free(torch.tensor(s2.tolist()))
    # later frees overwrote the stack region s1 came from; s1 itself must be unchanged
    assert s1.tolist() == kept.tolist()


def test_free_accepts_int32_and_2d():
    a = TokenAllocator(6)
    s = a.alloc(4)
    a.free(s.to(torch.int32).reshape(2, 2))
    assert a.available == 6
    a.check_no_double_free()


def test_free_empty_is_noop():
    a = TokenAllocator(3, debug=True)
    a.free(torch.empty(0, dtype=torch.int64))
    assert a.available == 3


def test_slot_zero_never_handed_out_over_many_cycles():
    a = TokenAllocator(5)
    g = torch.Generator().manual_seed(0)
    held: list[torch.Tensor] = []
    for _ in range(200):
        n = int(torch.randint(0, 4, (1,), generator=g))
        s = a.alloc(n)
        if s is None:
            a.free(held.pop(0))
            continue
        assert 0 not in s.tolist()
        held.append(s)
    a.check_no_double_free()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_constructor_rejects_bad_size(bad):
    with pytest.raises(ValueError):
        TokenAllocator(bad)


@pytest.mark.parametrize("bad", [-1, 1.0, None])
def test_alloc_rejects_bad_n(bad):
    with pytest.raises(ValueError):
        TokenAllocator(4).alloc(bad)


def test_freeing_more_than_allocated_always_raises():
    a = TokenAllocator(4)  # no debug: the host-side capacity check still fires
    s = a.alloc(1)
    a.free(s)
    with pytest.raises(AssertionError, match="freed twice"):
        a.free(s)


def test_double_free_detected_after_the_fact_without_debug():
    a = TokenAllocator(4)
    s = a.alloc(2)
    a.free(s[:1])
    a.free(s[:1])  # double free; capacity not exceeded, so only the full check can see it
    with pytest.raises(AssertionError, match="double free"):
        a.check_no_double_free()


def test_debug_detects_double_free_immediately():
    a = TokenAllocator(4, debug=True)
    s = a.alloc(2)
    a.free(s[:1])
    with pytest.raises(AssertionError, match="already free"):
        a.free(s[:1])
    assert a.available == 3  # the failing call freed nothing
    a.free(s[1:])
    a.check_no_double_free()


def test_debug_detects_slot_zero_out_of_range_and_duplicates():
    a = TokenAllocator(4, debug=True)
    a.alloc(4)
    with pytest.raises(AssertionError, match="slot 0"):
        a.free(torch.tensor([0]))
    with pytest.raises(AssertionError, match="outside"):
        a.free(torch.tensor([5]))
    with pytest.raises(AssertionError, match="outside"):
        a.free(torch.tensor([-1]))
    with pytest.raises(AssertionError, match="twice in one"):
        a.free(torch.tensor([2, 2]))
    assert a.available == 0


def test_check_no_double_free_flags_out_of_range():
    a = TokenAllocator(4)
    a.alloc(1)
    a.free(torch.tensor([7]))  # no debug: goes in unchecked
    with pytest.raises(AssertionError, match="outside"):
        a.check_no_double_free()


def test_free_slots_is_a_copy():
    a = TokenAllocator(3)
    f = a.free_slots()
    f.fill_(0)
    assert _as_set(a.free_slots()) == {1, 2, 3}


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free against a set model: free list and held slots always partition 1..size."""

    SIZE = 16

    def __init__(self):
        super().__init__()
        self.a = TokenAllocator(self.SIZE, debug=True)
        self.held: list[torch.Tensor] = []

    @rule(n=st.integers(0, SIZE + 2))
    def alloc(self, n):
        before = self.a.available
        s = self.a.alloc(n)
        if n > before:
            assert s is None and self.a.available == before
        else:
            assert s is not None and s.numel() == n
            self.held.append(s)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100), cut=st.integers(0, 100))
    def free_some(self, i, cut):
        s = self.held.pop(i % len(self.held))
        k = cut % (s.numel() + 1)
        self.a.free(s[:k])
        if k < s.numel():
            self.held.append(s[k:])

    @invariant()
    def partition(self):
        free = self.a.free_slots().tolist()
        held = [x for s in self.held for x in s.tolist()]
        assert len(free) == self.a.available
        assert sorted(free + held) == list(range(1, self.SIZE + 1))


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------------------------------------- ReqToTokenPool


def test_req_to_token_table_shape_dtype_bytes():
    p = ReqToTokenPool(rows=4, context_len=16, device="cpu")
    assert p.table.shape == (4, 16) and p.table.dtype == torch.int32
    assert int(p.table.abs().sum()) == 0
    assert p.rows == 4 and p.context_len == 16
    assert p.nbytes == 4 * 16 * 4 == p.table.numel() * p.table.element_size()


def test_req_to_token_rows_alloc_free():
    p = ReqToTokenPool(3, 8)
    rows = [p.alloc() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2]
    assert p.available == 0 and p.alloc() is None
    p.free(rows[1])
    assert p.available == 1
    assert p.alloc() == rows[1]


def test_req_to_token_double_free_and_range():
    p = ReqToTokenPool(2, 4)
    r = p.alloc()
    p.free(r)
    with pytest.raises(AssertionError, match="double free"):
        p.free(r)
    with pytest.raises(AssertionError, match="outside"):
        p.free(2)
    with pytest.raises(AssertionError, match="outside"):
        p.free(-1)
    with pytest.raises(TypeError):
        p.free(1.0)
    assert p.available == 2


def test_req_to_token_row_write_read():
    p = ReqToTokenPool(2, 4)
    a = TokenAllocator(8)
    r = p.alloc()
    slots = a.alloc(3)
    p.table[r, :3] = slots.to(torch.int32)
    assert p.table[r, :3].tolist() == slots.tolist()


@pytest.mark.parametrize("rows,ctx", [(0, 4), (2, 0), (2.0, 4), (2, None)])
def test_req_to_token_rejects_bad_shape(rows, ctx):
    with pytest.raises(ValueError):
        ReqToTokenPool(rows, ctx)
