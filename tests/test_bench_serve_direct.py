"""``bench serve``'s engine-direct target (``bench_serve.direct``): the runner's workload sent to an in-process
``Engine`` (tiny llama, CPU) instead of over HTTP, timed and counted as over HTTP. No timing assertions."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from xinf_sglang.runtime import SamplingParams
from xinf_sglang.tools.bench_serve.client import request_body
from xinf_sglang.tools.bench_serve.datasets import make_workload
from xinf_sglang.tools.bench_serve.direct import send_direct
from xinf_sglang.tools.bench_serve.options import DatasetOptions
from xinf_sglang.tools.bench_serve.runner import RunSpec, run_workload
from xinf_sglang.tools.bench_serve.stats import summarize
from xinf_sglang.tools.bench_serve.text import RandomText, load_tokenizer

from .engine_helpers import make_engine


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    with make_engine(model_dir) as eng:
        yield eng


def test_workload_runs_on_the_engine_with_every_token_counted(engine, model_dir: Path) -> None:
    options = DatasetOptions(num_prompts=6, input_len=(4, 16), output_len=(3, 9))
    workload = make_workload(options, RandomText(load_tokenizer(str(model_dir))), seed=3)
    run = asyncio.run(run_workload(engine, workload, RunSpec("direct", 2, math.inf, 3), sender=send_direct))
    result = summarize(run, "direct", "engine-direct", workload.dataset, math.inf, 2)
    assert (result.completed, result.failed) == (6, 0)
    wanted = [c.turns[0].output_len for c in workload.conversations]
    assert [o.completion_tokens for o in run.outcomes] == wanted
    assert result.total_output_tokens == sum(wanted)
    assert all(0 < o.ttft_s <= o.e2e_s and o.prompt_tokens > 0 for o in run.outcomes)
    assert engine.check_invariants() == []


def test_direct_text_is_the_engines_greedy_text(engine) -> None:
    body = request_body("completions", "direct", "def main():", 8)
    outcome = asyncio.run(send_direct(engine, "completions", body))
    [want] = engine.generate(prompt=["def main():"],
                             sampling_params=SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    assert outcome.ok and outcome.text == want.text and outcome.completion_tokens == 8


def test_chat_messages_are_rendered_with_the_models_template(engine) -> None:
    messages = [{"role": "user", "content": "hello"}]
    outcome = asyncio.run(send_direct(engine, "chat", request_body("chat", "direct", messages, 4)))
    rendered = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert outcome.ok and outcome.prompt_tokens == len(engine.tokenizer(rendered, add_special_tokens=False).input_ids)


def test_a_refused_request_is_a_failed_outcome(engine) -> None:
    body = request_body("completions", "direct", "x " * 5000, 4)  # longer than the tiny model's context
    outcome = asyncio.run(send_direct(engine, "completions", body))
    assert not outcome.ok and "context" in outcome.error.lower(), outcome.error
