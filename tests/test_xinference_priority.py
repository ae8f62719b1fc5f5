"""Priority scheduling through Xinference: the ``priority`` extra body field and the launch options.

Units first (request mapping, launch options), then one short test against a real ``xinference-local`` (the
``server`` fixture pattern of ``test_xinference.py``): a model launched with ``schedule_policy=priority`` over REST
with the web UI's string-typed options serves a request that carries a priority (the OpenAI client sends
``extra_body`` fields at the top level, which Xinference's request models drop unless sglite's compat patch
forwards them), and refuses a priority that is not an integer with a 400 naming the field.
"""

from __future__ import annotations

import pytest

from xinf_sglang.serving.launch_options import LaunchOptions, LaunchOptionsError, to_engine_config
from xinf_sglang.openai_api.request_mapping import RequestMappingError, map_request

from .xinference_server import LAUNCH_TIMEOUT, Server, http, metrics, openai_client, wait_idle


def test_priority_field_is_mapped_and_checked() -> None:
    sampling, opts = map_request({"priority": -4, "max_tokens": 3}, "chat")
    assert opts.priority == -4 and "priority" not in sampling
    assert map_request({"extra_body": {"priority": 2}}, "completion")[1].priority == 2  # a literal extra_body
    assert map_request({}, "chat")[1].priority is None
    for bad in ["5", 1.0, True]:
        with pytest.raises(RequestMappingError, match="priority must be an integer"):
            map_request({"priority": bad}, "chat")


def test_priority_launch_options() -> None:
    opts = LaunchOptions.parse({"schedule_policy": "Priority", "schedule_low_priority_values_first": "true",
                                "priority_scheduling_preemption_threshold": "0", "disable_priority_preemption": ""})
    cfg = to_engine_config(opts, "/models/x")
    assert (cfg.schedule_policy, cfg.schedule_low_priority_values_first) == ("priority", True)
    assert (cfg.priority_scheduling_preemption_threshold, cfg.disable_priority_preemption) == (0, False)
    with pytest.raises(LaunchOptionsError, match="is only used with schedule_policy='priority'"):
        LaunchOptions.parse({"disable_priority_preemption": True})  # would silently do nothing under fcfs
    with pytest.raises(LaunchOptionsError, match="priority_scheduling_preemption_threshold=-1"):
        LaunchOptions.parse({"schedule_policy": "priority", "priority_scheduling_preemption_threshold": -1})


def test_priority_through_a_real_xinference(server: Server, custom_model: str) -> None:
    import openai

    uid = "tiny-priority"
    status, body = http(
        "POST", server.endpoint + "/v1/models",
        {"model_name": custom_model, "model_engine": "sglite", "model_uid": uid, "mem_fraction_static": "0.5",
         "schedule_policy": "priority", "priority_scheduling_preemption_threshold": "0"},
        timeout=LAUNCH_TIMEOUT,
    )
    assert status == 200, f"{body}\n{server.log_tail()}"
    try:
        assert metrics(server, uid)["launch_options"]["schedule_policy"] == "priority"
        c = openai_client(server)
        messages = [{"role": "user", "content": "hi"}]
        r = c.chat.completions.create(model=uid, messages=messages, max_tokens=4, temperature=0,
                                      extra_body={"priority": 7, "ignore_eos": True})
        assert r.usage.completion_tokens == 4
        with pytest.raises(openai.BadRequestError):  # the field reached the engine: the compat patch forwarded it
            c.chat.completions.create(model=uid, messages=messages, max_tokens=4, extra_body={"priority": "high"})
        status, body = http("POST", server.endpoint + "/v1/chat/completions",
                            {"model": uid, "messages": messages, "max_tokens": 4, "priority": 1.5})
        assert status == 400 and "priority must be an integer" in str(body), body
        m = wait_idle(server, uid)
        assert m["finished_requests"] == 1 and m["aborted_requests"] == 0  # the refused one was never queued
    finally:
        http("DELETE", f"{server.endpoint}/v1/models/{uid}", timeout=LAUNCH_TIMEOUT)
