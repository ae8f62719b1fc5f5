"""The `Sampler`: each step's next token per request, from the step's logits.

Order of operations, per row: the grammar mask (constrained rows, one batched fill: `constrained.BatchMask`),
the logit bias, repetition / frequency / presence penalties, stop tokens banned before ``min_new_tokens``, then
either argmax (greedy rows) or temperature, top-k, top-p, min-p and a draw from what is left. Rows whose request
asks for logprobs get them from the logits as they are before the argmax / draw, scaled by the temperature
(runtime/sampling/logprobs.py). Rows with a seed
draw with their request's own generator, so a seeded request gets the same tokens whatever shares its batch.

`SamplingBatch` (runtime/sampling/sampling_batch.py) holds a step's inputs as tensors; `sample` is the vectorised
arithmetic over it; `Sampler` builds the batch from the requests and owns the grammar masks and their metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from xinf_sglang.kernels.argmax import argmax

from ..constrained import BatchMask, GrammarBackend
from .logprobs import DeviceLogprobs, OutputLogprobRows
from ..scheduler.schedule_batch import Req
from .sampling_batch import PenaltyInputs, RandomRows, SamplingBatch, uses_penalty

__all__ = ["OutputLogprobs", "Sampler", "SamplingBatch", "can_sample_ahead", "make_generator", "process_logits", "sample"]

OutputLogprobs = tuple[list[int], DeviceLogprobs]
"""(the rows of the sampled batch whose requests asked, their logprobs in that order)."""


class Sampler:
    """Picks the next token of each request of a step (see the module docstring for the order of operations).

    Args:
        vocab_size: the logits' width.
        device: the logits' device (seeded generators live there too).
        grammar_backend: the engine's grammar backend, which made the requests' matchers (called at the first
            constrained step).
    """

    def __init__(self, vocab_size: int, device: torch.device, grammar_backend: Callable[[], GrammarBackend]) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.masks = BatchMask(vocab_size, grammar_backend)
        """The grammar masks; ``masks.steps`` and ``masks.seconds`` are the engine's grammar-mask metrics."""
        if device.type == "cuda":  # compile the greedy argmax now, not during the first decode step
            argmax(torch.zeros(1, vocab_size, device=device))

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[Req]) -> tuple[torch.Tensor, OutputLogprobs | None]:
        """Next token of each request (row ``i`` of ``logits`` [B, V] is ``reqs[i]``'s), int64 on the device, not
        synchronised, and the logprobs of the rows that ask for them (None when no row does). The logits are
        consumed (masked and scaled in place)."""
        if any(r.grammar is not None for r in reqs):
            self.masks.apply(logits, [r.grammar for r in reqs])
        batch = SamplingBatch.build(
            params=[r.params for r in reqs],
            output_ids=[r.output_ids for r in reqs],
            prompt_ids=[r.input_ids for r in reqs],
            generators=[r.generator for r in reqs],
            banned_token_ids=[_banned(r) for r in reqs],
            vocab_size=self.vocab_size,
            device=self.device,
            biases=[r.logit_bias for r in reqs],
        )
        want = OutputLogprobRows.of(reqs, self.device)
        if want is None:
            return sample(logits, batch), None
        logits = process_logits(logits, batch)
        logprobs = want.logprobs(logits)  # before the draw scales the logits in place
        tokens = pick(logits, batch)
        return tokens, (want.positions, want.gather(logprobs, tokens))


def can_sample_ahead(req: Req) -> bool:
    """Whether ``req``'s next token can be sampled before its last one is known on the host: no grammar (its mask
    depends on that token), no penalty (they count it), no stop-token ban still pending (it ends with a count)."""
    return req.grammar is None and not uses_penalty(req.params) and len(req.output_ids) >= req.params.min_new_tokens


def _banned(req: Req) -> list[int]:
    """Stop tokens may not be sampled before ``min_new_tokens`` outputs exist."""
    if len(req.output_ids) < req.params.min_new_tokens:
        return sorted(req.stop_token_ids)
    return []


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with `seed` on `device` for a request's whole life, or None when there is no seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Pick one token per row of `logits` ([B, V], float32) under `batch`; returns int64 [B].

    The logits are consumed: penalties, bans and temperature are applied in place (no [B, V] copy per step), so
    pass a clone if the raw values are needed afterwards. Logits in another dtype are first copied to float32.
    """
    return pick(process_logits(logits, batch), batch)


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """`logits` with the bias, the penalties and the bans of `batch` applied (in place when already float32)."""
    if logits.dim() != 2 or tuple(logits.shape) != (batch.batch_size, batch.vocab_size):
        raise ValueError(
            f"sample expects logits of shape [{batch.batch_size}, {batch.vocab_size}] as built; "
            f"got {list(logits.shape)}"
        )
    if logits.dtype != torch.float32:
        logits = logits.float()
    if batch.bias is not None:
        rows, cols, values = batch.bias
        logits.index_put_((rows, cols), values, accumulate=True)
    if batch.penalties is not None:
        _apply_penalties(logits, batch.penalties)
    if batch.banned is not None:
        logits[batch.banned] = float("-inf")  # a Python scalar: no host-to-device copy
    return logits


def pick(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Argmax or draw per row of the processed `logits` (temperature and filters applied in place)."""
    if batch.random is None:
        return argmax(logits)  # on CUDA, small batches take the two-launch Triton argmax
    if batch.random.all_rows:
        return _sample_random(logits, batch.random)
    # Mixed batch: argmax for all (cheap), then overwrite the sampled rows.
    tokens = argmax(logits)
    tokens[batch.random.rows] = _sample_random(logits[batch.random.rows], batch.random)
    return tokens


def _apply_penalties(logits: torch.Tensor, pen: PenaltyInputs) -> None:
    """Apply repetition (HF), then frequency and presence (OpenAI) penalties to the penalised rows, in place."""
    x = logits if pen.all_rows else logits[pen.rows]
    if pen.seen is not None and pen.repetition is not None:
        penalised = torch.where(x > 0, x / pen.repetition, x * pen.repetition)
        x = torch.where(pen.seen, penalised, x)
    if pen.counts is not None and pen.frequency is not None and pen.presence is not None:
        x = x - pen.counts * pen.frequency - (pen.counts > 0).float() * pen.presence
    if pen.all_rows:
        logits.copy_(x)
    else:
        logits[pen.rows] = x


def _sample_random(logits: torch.Tensor, rows: RandomRows) -> torch.Tensor:
    """Sample one token per row of `logits` ([S, V], the sampled rows only); int64 [S]."""
    probs = torch.softmax(logits.div_(rows.temperature), dim=-1)
    threshold = _keep_threshold(probs, rows)
    if threshold is not None:
        # Filtering by a per-row probability threshold keeps every row's values (no renormalisation, no scatter),
        # so a seeded row draws from exactly the same vector whatever filters the other rows use.
        probs.masked_fill_(probs < threshold, 0.0)
    return _draw(probs, rows)


def _keep_threshold(probs: torch.Tensor, rows: RandomRows) -> torch.Tensor | None:
    """Per-row [S, 1] probability below which tokens are dropped (top_k, top_p, min_p combined); None = keep all.

    Disabled filters give a threshold no real probability falls below, so rows that do not use a filter are
    unaffected when other rows of the batch do.
    """
    thresholds = []
    if rows.top_k is not None or rows.top_p is not None:
        sorted_probs = probs.sort(dim=-1, descending=True).values
        if rows.top_k is not None:
            thresholds.append(sorted_probs.gather(1, rows.top_k - 1))
            if rows.top_p is not None:
                # top_p applies to what top_k kept (HF order): zero the rest before accumulating.
                ranks = torch.arange(sorted_probs.shape[1], device=probs.device)
                sorted_probs.masked_fill_(ranks >= rows.top_k, 0.0)
        if rows.top_p is not None:
            thresholds.append(_top_p_threshold(sorted_probs, rows.top_p))
    if rows.min_p is not None:
        thresholds.append(probs.amax(dim=-1, keepdim=True) * rows.min_p)
    if not thresholds:
        return None
    threshold = thresholds[0]
    for t in thresholds[1:]:
        threshold = torch.maximum(threshold, t)
    return threshold


def _top_p_threshold(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Smallest probability in each row's nucleus: the shortest prefix of the sorted row reaching top_p of its mass.

    A token is kept when the mass strictly before it is below top_p, so the most likely token is always kept.
    """
    cumulative = sorted_probs.cumsum(dim=-1)
    before = cumulative - sorted_probs
    kept = (before < top_p * cumulative[:, -1:]).sum(dim=-1, keepdim=True).clamp_(min=1)
    threshold = sorted_probs.gather(1, kept - 1)
    # top_p == 1 means disabled; rounding in the cumulative sum must not drop the tail of such rows.
    return threshold.masked_fill_(top_p >= 1.0, 0.0)


def _draw(probs: torch.Tensor, rows: RandomRows) -> torch.Tensor:
    """One draw per row from (unnormalised) `probs`: unseeded rows in one call, seeded rows with their generator."""
    if rows.unseeded is None:
        return torch.multinomial(probs, 1).squeeze(1)
    tokens = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    if rows.unseeded.numel():
        tokens[rows.unseeded] = torch.multinomial(probs[rows.unseeded], 1).squeeze(1)
    for pos, generator in rows.seeded:
        tokens[pos] = torch.multinomial(probs[pos], 1, generator=generator)[0]
    return tokens
