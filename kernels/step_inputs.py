"""The inputs of a decode step replayed as a CUDA graph, written in one launch.

A graph reads its inputs from fixed tensors, so every step copies its batch into them: the token ids, positions,
request rows, lengths and new slots, plus the padding rows up to the captured batch size; and the request->token
table gets each request's new slot. As torch ops that was about ten small launches per step (a few microseconds
each, on the critical path between two graph replays at batch 1). ``fill_decode_inputs_triton`` does all of it in
one launch; ``fill_decode_inputs_ref`` is the same in torch (the ground truth in tests).

``static`` is ``int64 [5, P]`` (``P`` the captured size, ``B <= P`` real rows), one row per field in
``DECODE_FIELDS`` order. Padding rows get token 0 at position 0 of request row 0 with length 1 and slot 0 (the
dummy slot), and write nothing to the table.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

DECODE_FIELDS = ("input_ids", "positions", "req_pool_indices", "seq_lens", "out_cache_loc")
# What a padding row holds, per field.
DECODE_PADDING = (0, 0, 0, 1, 0)


def _check(static: torch.Tensor, host_fields: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor) -> int:
    b = ids.shape[0]
    if static.dim() != 2 or static.shape[0] != len(DECODE_FIELDS) or static.dtype != torch.int64:
        raise ValueError(f"static must be int64 [{len(DECODE_FIELDS)}, P], got {tuple(static.shape)} {static.dtype}")
    if host_fields.shape != (3, b) or slots.shape != (b,) or b > static.shape[1]:
        raise ValueError(
            f"need host_fields [3, B] (positions, request rows, lengths), ids [B] and slots [B] with B <= "
            f"{static.shape[1]}; got {tuple(host_fields.shape)}, {tuple(ids.shape)}, {tuple(slots.shape)}"
        )
    return b


def fill_decode_inputs_ref(
    static: torch.Tensor, host_fields: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor, req_to_token: torch.Tensor
) -> None:
    """Write the ``B`` real rows (``ids``, ``host_fields`` = positions / request rows / lengths, new ``slots``)
    and the padding rows into ``static``, and ``req_to_token[row, position] = slot`` for the real rows."""
    b = _check(static, host_fields, ids, slots)
    static[0, :b] = ids
    static[1:4, :b] = host_fields
    static[4, :b] = slots
    for field, value in enumerate(DECODE_PADDING):
        static[field, b:] = value
    req_to_token[host_fields[1], host_fields[0]] = slots.to(req_to_token.dtype)


if triton is not None:

    # The batch sizes vary step to step: one compiled kernel for all of them (triton would otherwise compile a
    # variant per size class, on the hot path, the first time each class shows up).
    @triton.jit(
        do_not_specialize=["b", "p", "s_host"],
        do_not_specialize_on_alignment=["b", "p", "s_host", "HOST", "IDS", "SLOTS"],
    )
    def _fill_decode_inputs_kernel(
        STATIC, HOST, IDS, SLOTS, TABLE, b, p, s_static, s_host, s_table, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        real = offs < b
        pad = (offs >= b) & (offs < p)
        ids = tl.load(IDS + offs, mask=real, other=0)
        pos = tl.load(HOST + offs, mask=real, other=0)
        row = tl.load(HOST + s_host + offs, mask=real, other=0)
        seq_len = tl.load(HOST + 2 * s_host + offs, mask=real, other=1)
        slot = tl.load(SLOTS + offs, mask=real, other=0)
        keep = real | pad
        tl.store(STATIC + offs, ids, mask=keep)
        tl.store(STATIC + s_static + offs, pos, mask=keep)
        tl.store(STATIC + 2 * s_static + offs, row, mask=keep)
        tl.store(STATIC + 3 * s_static + offs, seq_len, mask=keep)
        tl.store(STATIC + 4 * s_static + offs, slot, mask=keep)
        tl.store(TABLE + row * s_table + pos, slot.to(TABLE.dtype.element_ty), mask=real)


def fill_decode_inputs_triton(
    static: torch.Tensor, host_fields: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor, req_to_token: torch.Tensor
) -> None:
    """``fill_decode_inputs_ref`` in one Triton launch. The padding values must be ``DECODE_PADDING`` (the
    kernel's ``other=`` values)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use fill_decode_inputs_ref")
    b = _check(static, host_fields, ids, slots)
    p = static.shape[1]
    if static.stride(1) != 1 or host_fields.stride(1) != 1 or ids.stride(0) != 1 or slots.stride(0) != 1:
        raise ValueError("static, host_fields, ids and slots need a contiguous last dim")
    block = max(16, min(1024, triton.next_power_of_2(p)))
    _fill_decode_inputs_kernel[(triton.cdiv(p, block),)](
        static, host_fields, ids, slots, req_to_token, b, p,
        static.stride(0), host_fields.stride(0), req_to_token.stride(0), BLOCK=block, num_warps=1,
    )


def fill_decode_inputs(
    static: torch.Tensor, host_fields: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor, req_to_token: torch.Tensor
) -> None:
    """Dispatching ``fill_decode_inputs``: Triton for CUDA tensors, the reference elsewhere."""
    args = (static, host_fields, ids, slots, req_to_token)
    if static.is_cuda and triton is not None:
        return fill_decode_inputs_triton(*args)
    return fill_decode_inputs_ref(*args)
