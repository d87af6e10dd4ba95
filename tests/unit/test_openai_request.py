"""OpenAI body -> RouteRequest: validation names the field, tokenization fields, cache keys."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router_service.openai_request import (
    OpenAIError,
    engine_base_url,
    parse,
    parse_bytes,
    route_request,
)


def _err(endpoint: Any, body: Any) -> OpenAIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(OpenAIError) as info:
        parse_bytes(endpoint, raw)
    return info.value


@pytest.mark.parametrize(("endpoint", "body", "param"), [
    ("chat", b"", None),
    ("chat", b"{", None),
    ("chat", b"[]", None),
    ("chat", {"model": "m"}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": ["hi"]}, "messages[0]"),
    ("chat", {"messages": [{"role": "user"}, {"content": "x"}]}, "messages[1].role"),
    ("chat", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages[0].content[0]"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -2}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "model": 5}, "model"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "cache_salt": ""}, "cache_salt"),
    ("completions", {"model": "m"}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, -1]}, "prompt"),
    ("completions", {"prompt": [1, 2**32]}, "prompt"),
    ("completions", {"prompt": [[1], "x"]}, "prompt"),
    ("completions", {"prompt": [[1], []]}, "prompt[1]"),
    ("completions", {"prompt": 7}, "prompt"),
])
def test_bad_bodies_name_the_field(endpoint: Any, body: Any, param: str | None) -> None:
    exc = _err(endpoint, body)
    assert exc.status == 400
    assert exc.param == param
    err = exc.body()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_completions_prompt_forms() -> None:
    assert parse("completions", {"prompt": "hi"}).prompt == "hi"
    assert list(parse("completions", {"prompt": [5, 6]}).token_ids) == [5, 6]  # type: ignore[arg-type]
    assert parse("completions", {"prompt": ["a", "b"]}).prompt == "a"  # batch: the first
    assert list(parse("completions", {"prompt": [[7, 8], [9]]}).token_ids) == [7, 8]  # type: ignore[arg-type]
    r = parse("completions", {"prompt": "x", "max_tokens": 9, "stream": True,
                              "stream_options": {"include_usage": True}, "cache_salt": "t1",
                              "model": "m", "unknown_field": {"kept": 1}})
    assert (r.max_output_tokens, r.stream, r.include_usage, r.cache_salt, r.model) == \
        (9, True, True, "t1", "m")
    assert r.body["unknown_field"] == {"kept": 1}
    assert r.add_special_tokens is True


def test_chat_tokenize_body_carries_template_fields() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    r = parse("chat", {"model": "m", "messages": msgs, "max_completion_tokens": 4,
                       "chat_template_kwargs": {"enable_thinking": False}, "tools": [],
                       "temperature": 0.2})
    assert r.add_special_tokens is False and r.max_output_tokens == 4
    assert r.tokenize_body() == {
        "model": "m", "messages": msgs, "add_generation_prompt": True,
        "continue_final_message": False, "add_special_tokens": False,
        "chat_template_kwargs": {"enable_thinking": False}, "tools": []}
    # sampling fields do not change the prompt ids: same cache key
    other = parse("chat", {"model": "m", "messages": msgs, "temperature": 0.9,
                           "chat_template_kwargs": {"enable_thinking": False}, "tools": []})
    assert other.tokenize_key() == r.tokenize_key()
    changed = parse("chat", {"model": "m", "messages": [{"role": "user", "content": "ho"}]})
    assert changed.tokenize_key() != r.tokenize_key()


def test_route_request_and_urls() -> None:
    r = parse("completions", {"prompt": [1, 2, 3], "cache_salt": "s", "max_tokens": 5})
    rr = route_request(r, [1, 2, 3], request_id="q1", model="base", lora_name="ad",
                       session_id="sess", allowed=frozenset({"n1"}))
    assert (rr.request_id, rr.model, rr.lora_name, rr.cache_salt, rr.session_id,
            rr.max_output_tokens, rr.allowed) == ("q1", "base", "ad", "s", "sess", 5,
                                                  frozenset({"n1"}))
    assert list(rr.token_ids or []) == [1, 2, 3]
    assert engine_base_url("http://h:1/") == "http://h:1"
    assert engine_base_url("h:1", "https") == "https://h:1"
