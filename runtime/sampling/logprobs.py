"""Log probabilities: what a step computes for the requests that ask (``SamplingParams.logprobs``, ``top_logprobs``,
``prompt_logprobs_start``), and how the values reach the host.

Output tokens (`OutputLogprobRows`, used by the `Sampler`): the log-softmax of the sampled distribution, i.e. the
logits after the grammar mask, the logit bias, the penalties and the bans, divided by the row's temperature (1 for
greedy rows), before top-k / top-p / min-p (which only decide what may be drawn). Prompt tokens (`prompt_spans`,
`prompt_logprobs`): the log-softmax of the raw logits at the position before each scored token; the runner asks
the model for those extra rows of a prefill (``ForwardBatch.logits_indices`` beyond the first ``B``).

Nothing here runs for a batch in which no request asks: the sampler and the runner check one list first. What
does run stays on the device until `DeviceLogprobs.to_host` issues one asynchronous copy per tensor (page-locked on
CUDA, recorded before the step's token copy event), so reading the values never waits for a later step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..engine.outputs import TokenLogprob
from ..scheduler.schedule_batch import Req
from .sampling_params import GREEDY_TEMPERATURE

__all__ = [
    "DeviceLogprobs",
    "OutputLogprobRows",
    "prompt_logprobs",
    "prompt_spans",
    "prompt_targets",
]


@dataclass
class DeviceLogprobs:
    """Logprobs of ``L`` positions: the chosen (sampled or prompt) token's, and the ``K`` best at each position,
    most likely first. On the device until `to_host`; ``top_k`` says how many of the ``K`` each position keeps."""

    chosen: torch.Tensor  # float32 [L]
    top_values: torch.Tensor  # float32 [L, K]
    top_ids: torch.Tensor  # int64 [L, K]
    token_ids: torch.Tensor  # int64 [L]: the chosen tokens
    top_k: list[int]  # per position, <= K

    def to_host(self) -> DeviceLogprobs:
        """The same values copied to the host without waiting (page-locked destinations on CUDA); read them only
        after the step's copy event (``Launched.host_tokens``)."""
        if not self.chosen.is_cuda:
            return self
        copy = lambda t: t.to("cpu", non_blocking=True)  # noqa: E731  # pinned destination, async
        return DeviceLogprobs(copy(self.chosen), copy(self.top_values), copy(self.top_ids), copy(self.token_ids),
                              self.top_k)

    def entries(self) -> list[TokenLogprob]:
        """One `TokenLogprob` per position (host tensors: call after `to_host` and the step's sync)."""
        chosen, ids = self.chosen.tolist(), self.token_ids.tolist()
        values, top_ids = self.top_values.tolist(), self.top_ids.tolist()
        return [
            TokenLogprob(ids[i], chosen[i], list(zip(top_ids[i][:k], values[i][:k])))
            for i, k in enumerate(self.top_k)
        ]


def _gather(logprobs: torch.Tensor, tokens: torch.Tensor, top_k: list[int]) -> DeviceLogprobs:
    """The chosen tokens' logprobs and the top ``max(top_k)`` of each row of ``logprobs`` ([L, V])."""
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    best = logprobs.topk(max(top_k), dim=-1) if max(top_k, default=0) > 0 else None
    empty = logprobs[:, :0]
    return DeviceLogprobs(
        chosen=chosen,
        top_values=best.values if best is not None else empty,
        top_ids=best.indices if best is not None else empty.long(),
        token_ids=tokens,
        top_k=top_k,
    )


# ---- output tokens ------------------------------------------------------------------------------------------


@dataclass
class OutputLogprobRows:
    """The rows of a sampling batch whose requests return output logprobs (``L`` of ``B``); build with `of`."""

    positions: list[int]  # rows of the batch, ascending
    rows: torch.Tensor | None  # int64 [L] on the device; None when L == B (no gather needed)
    temperature: torch.Tensor | None  # float32 [L, 1]; None when every row's is 1 (greedy counts as 1)
    top_k: list[int]

    @classmethod
    def of(cls, reqs: Sequence[Req], device: torch.device) -> OutputLogprobRows | None:
        """The rows of ``reqs`` that ask for output logprobs; None when none does (the usual case: nothing else
        runs)."""
        positions = [i for i, r in enumerate(reqs) if r.params.wants_output_logprobs]
        if not positions:
            return None
        params = [reqs[i].params for i in positions]
        temps = [1.0 if p.temperature < GREEDY_TEMPERATURE else p.temperature for p in params]
        return cls(
            positions=positions,
            rows=None if len(positions) == len(reqs) else _to_device(positions, torch.int64, device),
            temperature=None if all(t == 1.0 for t in temps) else _to_device(temps, torch.float32, device).unsqueeze(1),
            top_k=[p.top_logprobs for p in params],
        )

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[L, V] log-softmax of the processed ``logits`` ([B, V], not modified) at the rows' temperatures."""
        x = logits if self.rows is None else logits[self.rows]
        if self.temperature is not None:
            x = x / self.temperature
        return torch.log_softmax(x, dim=-1)

    def gather(self, logprobs: torch.Tensor, tokens: torch.Tensor) -> DeviceLogprobs:
        """The sampled ``tokens``' ([B]) logprobs and the top-k, from `logprobs`'s result."""
        chosen = tokens if self.rows is None else tokens[self.rows]
        return _gather(logprobs, chosen, self.top_k)


# ---- prompt tokens ------------------------------------------------------------------------------------------


def prompt_spans(reqs: Sequence[Req], extend_lens: Sequence[int]) -> list[range] | None:
    """For a prefill about to run (each request's new tokens start at its ``kv_len``): per request, the positions
    ``q`` of this extend whose logits score prompt token ``q + 1``; None when no request scores its prompt."""
    if not any(r.prompt_logprobs_pending for r in reqs):
        return None
    spans = [r.prompt_logit_positions(r.kv_len, n) for r, n in zip(reqs, extend_lens)]
    return spans if any(spans) else None  # a chunk before the start position scores nothing


def prompt_targets(reqs: Sequence[Req], spans: Sequence[range]) -> list[int]:
    """The scored prompt tokens, flat in the order of ``spans``' rows."""
    return [req.input_ids[q + 1] for req, span in zip(reqs, spans) for q in span]


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor, reqs: Sequence[Req],
                    spans: Sequence[range]) -> DeviceLogprobs:
    """Logprobs of the prompt tokens ``targets`` ([P], int64 on the device) from the raw ``logits`` ([P, V]) of
    the rows before them, with each request's ``top_logprobs`` alternatives."""
    top_k = [req.params.top_logprobs for req, span in zip(reqs, spans) for _ in span]
    return _gather(torch.log_softmax(logits, dim=-1), targets, top_k)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without making the host wait (page-locked staging on CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    return t.to(device) if device.type != "cuda" else t.pin_memory().to(device, non_blocking=True)
