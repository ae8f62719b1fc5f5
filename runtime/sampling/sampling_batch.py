"""One step's sampling inputs as tensors: `SamplingBatch`, built from the per-request data by `SamplingBatch.build`.

The batch holds per-row parameter tensors on the logits' device, so `sampler.sample` works on all rows at once;
only rows with their own seed are drawn one by one (a seeded request must get the same tokens whatever else shares
the batch). Tensors are only built for what some row uses: no penalty tensors when no row has a penalty, no
filter tensors when no row filters, nothing for an all-greedy batch (the benchmark path is a single argmax).
Host-to-device copies are staged in page-locked memory and asynchronous, so building never waits on the device.
A request's ``logit_bias`` becomes tensors once, when the scheduler side builds the request (`RequestBias`); a
step only concatenates the rows' tensors (up to 300 entries each), never rebuilding them from Python dicts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

__all__ = ["PenaltyInputs", "RandomRows", "RequestBias", "SamplingBatch", "uses_penalty"]


@dataclass(frozen=True)
class RequestBias:
    """One request's ``logit_bias`` as tensors on the logits' device, built once per request (`of`)."""

    token_ids: torch.Tensor
    """int64 [K]."""
    values: torch.Tensor
    """float32 [K]: added to those tokens' logits."""

    @classmethod
    def of(cls, logit_bias: dict[int, float] | None, device: torch.device | str) -> RequestBias | None:
        """The tensors of ``logit_bias`` (validated: ids in the vocabulary, at most 300), or None when empty."""
        if not logit_bias:
            return None
        device = torch.device(device)
        ids = torch.tensor(list(logit_bias), dtype=torch.int64)
        values = torch.tensor(list(logit_bias.values()), dtype=torch.float32)
        return cls(_to(ids, device), _to(values, device))


@dataclass
class PenaltyInputs:
    """Penalty parameters of the rows that use any penalty (P rows of the batch; built only when P > 0)."""

    rows: torch.Tensor
    """int64 [P]: the batch rows these tensors describe."""
    all_rows: bool
    """True when P is the whole batch, so the logits are updated without gathering rows."""
    repetition: torch.Tensor | None
    """float32 [P, 1]; None when no row has repetition_penalty != 1."""
    seen: torch.Tensor | None
    """bool [P, V]: the token occurs in the prompt or the output (what repetition_penalty applies to)."""
    frequency: torch.Tensor | None
    """float32 [P, 1]; None when no row has a frequency or presence penalty."""
    presence: torch.Tensor | None
    """float32 [P, 1]; set together with `frequency`."""
    counts: torch.Tensor | None
    """float32 [P, V]: occurrences of each token in the output (frequency / presence apply to output only)."""


@dataclass
class RandomRows:
    """Parameters of the rows that are sampled rather than argmaxed (S rows of the batch, temperature > 0)."""

    rows: torch.Tensor
    """int64 [S]: the batch rows these tensors describe."""
    all_rows: bool
    """True when S is the whole batch (no greedy row), so no gather or scatter of rows is needed."""
    temperature: torch.Tensor
    """float32 [S, 1]."""
    top_k: torch.Tensor | None
    """int64 [S, 1], disabled rows hold V; None when no row uses top_k."""
    top_p: torch.Tensor | None
    """float32 [S, 1], disabled rows hold 1; None when no row uses top_p."""
    min_p: torch.Tensor | None
    """float32 [S, 1], disabled rows hold 0; None when no row uses min_p."""
    unseeded: torch.Tensor | None
    """int64 positions (in 0..S-1) of rows without a generator; None when all S rows are unseeded."""
    seeded: list[tuple[int, torch.Generator]]
    """(position in 0..S-1, generator) for rows with their own seed; drawn one by one."""


@dataclass
class SamplingBatch:
    """Everything `sample` needs for one step, as tensors on the logits' device. Build it with `build`."""

    batch_size: int
    vocab_size: int
    banned: tuple[torch.Tensor, torch.Tensor] | None
    """(rows, token ids), int64: logits set to -inf this step; None when nothing is banned."""
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """(rows, token ids, float32 biases) added to the logits first (OpenAI logit_bias); None when unused."""
    penalties: PenaltyInputs | None
    """None when no row uses a penalty (fast path)."""
    random: RandomRows | None
    """None when every row is greedy (fast path)."""

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        output_ids: list[list[int]],
        prompt_ids: list[list[int]],
        generators: list[torch.Generator | None],
        banned_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
        biases: list[RequestBias | None] | None = None,
    ) -> SamplingBatch:
        """Build the step's sampling inputs; all lists are per row and must have the same length.

        Args:
            params: each row's sampling parameters.
            output_ids: tokens generated so far (frequency / presence / repetition penalties).
            prompt_ids: prompt tokens (repetition penalty only); only read for rows that use it.
            generators: the row's `torch.Generator` (on `device`) when the request has a seed, else None.
            banned_token_ids: tokens that must not be sampled this step (EOS / stop ids before min_new_tokens).
            vocab_size: width of the logits `sample` will get.
            device: device of those logits.
            biases: each row's `RequestBias` (what the scheduler side built once per request); None: built from
                ``params`` now (a one-off batch).

        Raises:
            ValueError: lists of different lengths, a token id outside [0, vocab_size), or a generator on
                another device (engine bugs, not user errors).
        """
        n = len(params)
        if not len(output_ids) == len(prompt_ids) == len(generators) == len(banned_token_ids) == n:
            raise ValueError(
                "SamplingBatch.build needs one entry per row in every list; got "
                f"{n} params, {len(output_ids)} output_ids, {len(prompt_ids)} prompt_ids, "
                f"{len(generators)} generators, {len(banned_token_ids)} banned_token_ids"
            )
        device = torch.device(device)
        if biases is None:
            biases = [RequestBias.of(p.logit_bias, device) for p in params]
        elif len(biases) != n:
            raise ValueError(f"SamplingBatch.build needs one bias per row; got {len(biases)} for {n} rows")
        return cls(
            batch_size=n,
            vocab_size=vocab_size,
            banned=_build_banned(banned_token_ids, vocab_size, device),
            bias=_build_bias(biases, vocab_size, device),
            penalties=_build_penalties(params, output_ids, prompt_ids, vocab_size, device),
            random=_build_random(params, generators, vocab_size, device),
        )


def _flat_index(token_lists: list[list[int]], vocab_size: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) int64 index pairs for `token_lists` (row i = list i), range-checked, on the CPU."""
    lengths = torch.tensor([len(ids) for ids in token_lists], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    cols = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.int64)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= vocab_size):
        raise ValueError(f"{what} holds a token id outside [0, {vocab_size})")
    return rows, cols


def _build_banned(
    banned_token_ids: list[list[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not any(banned_token_ids):
        return None
    rows, cols = _flat_index(banned_token_ids, vocab_size, "banned_token_ids")
    return _to(rows, device), _to(cols, device)


def _build_bias(
    biases: list[RequestBias | None], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, token ids, values) of the rows' biases, joined: the per-request tensors are reused as they are."""
    used = [(row, b) for row, b in enumerate(biases) if b is not None]
    if not used:
        return None
    lengths = torch.tensor([b.token_ids.numel() for _, b in used], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.tensor([row for row, _ in used], dtype=torch.int64), lengths)
    cols = torch.cat([b.token_ids for _, b in used])
    if not cols.is_cuda and (int(cols.min()) < 0 or int(cols.max()) >= vocab_size):  # CUDA: checked at verify
        raise ValueError(f"logit_bias holds a token id outside [0, {vocab_size})")
    return _to(rows, device), cols, torch.cat([b.values for _, b in used])


def _to(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without making the host wait for the device's queued work: staged in page-locked
    memory and copied asynchronously (a pageable copy would block until the step in flight finished)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _column(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-row parameter as a [N, 1] tensor, so it broadcasts over the vocabulary."""
    return _to(torch.tensor(values, dtype=dtype), device).unsqueeze(1)


def _build_penalties(
    params: list[SamplingParams],
    output_ids: list[list[int]],
    prompt_ids: list[list[int]],
    vocab_size: int,
    device: torch.device,
) -> PenaltyInputs | None:
    rows = [i for i, p in enumerate(params) if _uses_repetition(p) or _uses_additive(p)]
    if not rows:
        return None
    chosen = [params[i] for i in rows]
    repetition = seen = frequency = presence = counts = None
    if any(_uses_repetition(p) for p in chosen):
        repetition = _column([p.repetition_penalty for p in chosen], torch.float32, device)
        # Rows whose penalty is 1 need no token set: scaling by 1 is a no-op whatever `seen` says.
        tokens = [prompt_ids[i] + output_ids[i] if _uses_repetition(params[i]) else [] for i in rows]
        seen = _scatter(tokens, vocab_size, torch.bool, device, "prompt_ids/output_ids")
    if any(_uses_additive(p) for p in chosen):
        frequency = _column([p.frequency_penalty for p in chosen], torch.float32, device)
        presence = _column([p.presence_penalty for p in chosen], torch.float32, device)
        tokens = [output_ids[i] if _uses_additive(params[i]) else [] for i in rows]
        counts = _scatter(tokens, vocab_size, torch.float32, device, "output_ids")
    return PenaltyInputs(
        rows=_to(torch.tensor(rows, dtype=torch.int64), device),
        all_rows=len(rows) == len(params),
        repetition=repetition,
        seen=seen,
        frequency=frequency,
        presence=presence,
        counts=counts,
    )


def _uses_repetition(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0


def _uses_additive(p: SamplingParams) -> bool:
    return p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _scatter(
    token_lists: list[list[int]], vocab_size: int, dtype: torch.dtype, device: torch.device, what: str
) -> torch.Tensor:
    """[N, V] tensor: per row, the number of occurrences of each token (bool dtype: whether it occurs)."""
    rows, cols = _flat_index(token_lists, vocab_size, what)
    out = torch.zeros(len(token_lists), vocab_size, dtype=dtype, device=device)
    ones = torch.ones(cols.numel(), dtype=dtype, device=device)
    out.index_put_((_to(rows, device), _to(cols, device)), ones, accumulate=dtype != torch.bool)
    return out


def _build_random(
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    vocab_size: int,
    device: torch.device,
) -> RandomRows | None:
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not rows:
        return None
    chosen = [params[i] for i in rows]
    seeded = [(pos, generators[i]) for pos, i in enumerate(rows) if generators[i] is not None]
    for _, g in seeded:
        if torch.device(g.device).type != device.type:
            raise ValueError(f"a row's generator is on {g.device} but the logits are on {device}")
    unseeded = [pos for pos, i in enumerate(rows) if generators[i] is None]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in chosen]
    return RandomRows(
        rows=_to(torch.tensor(rows, dtype=torch.int64), device),
        all_rows=len(rows) == len(params),
        temperature=_column([p.temperature for p in chosen], torch.float32, device),
        top_k=_column(top_k, torch.int64, device) if any(k < vocab_size for k in top_k) else None,
        top_p=_column([p.top_p for p in chosen], torch.float32, device) if any(p.top_p < 1 for p in chosen) else None,
        min_p=_column([p.min_p for p in chosen], torch.float32, device) if any(p.min_p > 0 for p in chosen) else None,
        unseeded=None if not seeded else _to(torch.tensor(unseeded, dtype=torch.int64), device),
        seeded=seeded,  # type: ignore[arg-type]  # None generators were filtered out above
    )


def uses_penalty(p: SamplingParams) -> bool:
    """Whether ``p`` uses a repetition, frequency or presence penalty (they read the tokens generated so far)."""
    return _uses_repetition(p) or _uses_additive(p)
