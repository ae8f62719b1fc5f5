"""A device error the engine cannot recover from (issue 28 point 6): CUDA's sticky errors (an illegal memory
access, a device-side assert, a launch failure) break the device for the rest of the process, so every later step
would fail too and the model would answer 500 forever. After one the engine marks itself failed
(``Scheduler.failure``, what the plugin can watch, as it watches a tensor-parallel launcher), aborts the requests in
flight with an error that says the model must be relaunched, and refuses every later request with it at once,
without trying another step. Any other step error still fails only the requests of that step."""

from __future__ import annotations

import pytest
import torch

from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.errors import EngineFailure

from .engine_helpers import make_engine

LONG = SamplingParams(max_new_tokens=400, ignore_eos=True)
SHORT = SamplingParams(max_new_tokens=4, ignore_eos=True)


def _break_steps(engine, error: Exception, after_steps: int = 3) -> list[int]:
    """From now on the runner's launch raises ``error`` once ``after_steps`` more steps ran; returns a list that
    counts every launch attempted."""
    attempts: list[int] = []

    def install(scheduler):
        real = scheduler.runner.launch

        def launch(batch):
            attempts.append(1)
            if len(attempts) > after_steps:
                raise error
            return real(batch)

        scheduler.runner.launch = launch

    engine.run_on_scheduler(install)
    return attempts


def test_an_unrecoverable_device_error_fails_the_engine_for_good(tiny_model) -> None:
    with make_engine(tiny_model("qwen2")) as engine:
        assert engine.run_on_scheduler(lambda s: s.failure) is None
        attempts = _break_steps(engine, torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
        [out] = engine.generate(input_ids=[[5, 6, 7]], sampling_params=LONG)
        assert out.finish_reason == "abort"
        assert "illegal memory access" in out.error and "relaunched" in out.error, out.error
        failure = engine.run_on_scheduler(lambda s: s.failure)
        assert isinstance(failure, EngineFailure) and str(failure) in out.error
        tried = len(attempts)
        [later] = engine.generate(input_ids=[[8, 9]], sampling_params=SHORT)
        assert later.finish_reason == "abort" and later.error == out.error and later.token_ids == []
        assert len(attempts) == tried, "a step was tried on the failed device"
        assert engine.metrics()["running_requests"] == engine.metrics()["waiting_requests"] == 0


@pytest.mark.parametrize("error", [RuntimeError("a one-off bug"), torch.OutOfMemoryError("CUDA out of memory")],
                         ids=["bug", "oom"])
def test_other_step_errors_fail_only_that_steps_requests(tiny_model, error) -> None:
    with make_engine(tiny_model("qwen2")) as engine:
        attempts = _break_steps(engine, error)
        [out] = engine.generate(input_ids=[[5, 6, 7]], sampling_params=LONG)
        assert out.finish_reason == "abort" and "engine error" in out.error
        assert engine.run_on_scheduler(lambda s: s.failure) is None
        engine.run_on_scheduler(lambda s: setattr(s.runner, "launch", type(s.runner).launch.__get__(s.runner)))
        [later] = engine.generate(input_ids=[[8, 9]], sampling_params=SHORT)
        assert later.finish_reason == "length" and len(later.token_ids) == 4 and len(attempts) > 3


def test_an_out_of_memory_step_says_what_to_relaunch_with(tiny_model) -> None:
    """Seed 002's lesson: a step that runs out of device memory fails its requests with the fraction that would
    have left the allocation it tried (here 1.5 GiB more) outside the static part."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 79 GiB")
    with make_engine(tiny_model("qwen2"), mem_fraction_static=0.5) as engine:
        _break_steps(engine, oom, after_steps=0)
        [out] = engine.generate(input_ids=[[5, 6, 7]], sampling_params=SHORT)
        plan = engine.run_on_scheduler(lambda s: s.limits.memory_plan)
        advice = plan.lower_fraction_advice(int(1.5 * 1024**3))
        assert out.finish_reason == "abort" and "Tried to allocate 1.50 GiB" in out.error
        assert "lower mem_fraction_static from 0.5 to" in advice and out.error.endswith(advice), out.error
