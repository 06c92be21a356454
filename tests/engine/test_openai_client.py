"""The official ``openai`` client against the API server (real tiny engines in worker processes)."""

from __future__ import annotations

import openai
import pytest

from tests.engine.server_harness import LiveServer, tiny_workers


@pytest.fixture(scope="module")
def client():
    with LiveServer(tiny_workers(2)) as srv:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.code == "model_not_found"


def test_completions_plain_and_streamed_agree(client) -> None:
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw)
    assert plain.object == "text_completion" and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 12 and plain.usage.prompt_tokens == len("The quick brown fox") + 1
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_plain_and_streamed_agree_and_report_cached_tokens(client) -> None:
    messages = [{"role": "system", "content": "You are terse. " * 8},
                {"role": "user", "content": "Say something about prefill and decode."}]
    kw = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kw)
    assert first.object == "chat.completion" and first.choices[0].message.role == "assistant"
    assert first.usage.completion_tokens == 8
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # the same prompt again, streamed: its full blocks come from the prefix cache of the same worker
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    usage = chunks[-1].usage
    assert usage.prompt_tokens == first.usage.prompt_tokens
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_client_sees_bad_requests_as_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", n=2)
    assert info.value.status_code == 400 and "n=2" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x" * 3000, max_tokens=1)
    still = client.completions.create(model="tiny", prompt="still up?", max_tokens=2)
    assert still.usage.completion_tokens <= 2
