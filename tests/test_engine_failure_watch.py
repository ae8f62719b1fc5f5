"""The plugin's side of an unrecoverable device error (issue 28 point 6): a single-device engine that failed for good
(``Scheduler.failure``, set by the runtime's loop after a sticky device error) ends its model process the way a
failed tensor-parallel rank does (`FailureWatch`), so that Xinference relaunches the model instead of it answering
500 forever.

Unit level, over a real CPU Engine in a child process (the watch ends its process with ``os._exit``): the runner's
launch is made to raise CUDA's sticky error, the runtime's own loop turns it into the engine's failure, and the
watch built by ``FailureWatch.for_engine`` (what the plugin's ``load`` builds) must end the process with
``EXIT_CODE``. Not through a real Xinference: nothing reaches a served model's runner from outside.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from xinf_sglang.serving.engine_failure import EXIT_CODE

WAIT_S = 120  # bounds a hang (engine start, the watch's drain and shutdown); not a timing assertion

CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from xinf_sglang.runtime import SamplingParams
    from xinf_sglang.serving.engine_failure import FailureWatch
    from tests.engine_helpers import make_engine

    engine = make_engine(sys.argv[1])
    watch = FailureWatch.for_engine("m", engine, lambda: 0)
    time.sleep(1.0)
    assert watch.error() is None, "a serving engine reported a failure"
    print("serving", flush=True)

    def install(scheduler):
        def launch(batch):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        scheduler.runner.launch = launch

    engine.run_on_scheduler(install)
    [out] = engine.generate(input_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_new_tokens=8))
    print("aborted:", out.finish_reason, out.error, flush=True)
    for _ in range(100):
        if watch.error() is not None:
            print("refused:", type(watch.error()).__name__, watch.error(), flush=True)
            break
        time.sleep(0.1)
    time.sleep(60)  # the watch ends the process long before
    print("still alive", flush=True)
    """
)


def test_a_sticky_device_error_ends_the_model_process(tiny_model) -> None:
    model = tiny_model("qwen2")
    child = subprocess.run([sys.executable, "-c", CHILD, str(model)], capture_output=True, text=True,
                           timeout=WAIT_S, cwd=str(_repo_root()))
    out = child.stdout + child.stderr
    assert "serving" in child.stdout, out
    assert "aborted: abort" in child.stdout and "illegal memory access" in child.stdout, out
    assert "refused: SgliteEngineFailure sglite model m:" in child.stdout and "relaunches" in child.stdout, out
    assert "still alive" not in child.stdout, out
    assert child.returncode == EXIT_CODE, out


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]
