"""The official `openai` Python SDK against clawdforge's /v1 routes.

Run by tests/api/sdk.rs as `.venv-tests/bin/python tests/sdk/openai_cases.py CASE` with
CF_BASE_URL (the server, no /v1), CF_TOKEN (an app token) and case-specific CF_* vars. A
case exits 0 when every assertion holds; the Rust side then checks what the server left
behind (audit rows, processes, usage).
"""

import json
import os
import sys
import threading
import time

import openai
from openai import OpenAI

from common import TOKEN, expect, records, wait_for_stub

BASE = os.environ["CF_BASE_URL"] + "/v1"


def client(**kw):
    kw.setdefault("max_retries", 0)
    return OpenAI(base_url=BASE, api_key=kw.pop("api_key", TOKEN), **kw)


def chat_history():
    """System + history, ignored parameters accepted; the stub echoes the rendered prompt."""
    raw = client().chat.completions.with_raw_response.create(
        model="sonnet",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "I'm Sam."},
            {"role": "assistant", "content": "Hello Sam!"},
            {"role": "user", "content": [{"type": "text", "text": "My name?"}]},
        ],
        temperature=0.2, top_p=0.9, max_tokens=50, seed=7, user="u1",
        presence_penalty=0, frequency_penalty=0, stop=["\n\n\n"], metadata={"a": "b"},
    )
    assert raw.headers.get("x-request-id", "").startswith("req_"), raw.headers
    r = raw.parse()
    assert r.object == "chat.completion", r
    assert r.id.startswith("chatcmpl-"), r.id
    assert r.model == "sonnet"
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    want = ("echo: Earlier in this conversation:\n\nUser: I'm Sam.\n\nAssistant: Hello Sam!"
            "\n\nThe user's new message:\n\nMy name?")
    assert r.choices[0].message.content == want, repr(r.choices[0].message.content)
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    print(r.id)


def stream():
    """Role first, content in several deltas, finish reason, then a usage chunk."""
    s = client().chat.completions.create(
        model="default", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": os.environ.get("CF_PROMPT", "stream please")}],
    )
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= int(os.environ.get("CF_MIN_PIECES", "3")), pieces
    text = "".join(pieces)
    assert text == os.environ.get("CF_WANT", "echo: stream please"), repr(text)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"], finishes
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0, chunks[-1]


def structured():
    schema = {"type": "object", "properties": {"herbs": {"type": "array", "items": {"type": "string"}}},
              "required": ["herbs"]}
    r = client().chat.completions.create(
        model="sonnet", messages=[{"role": "user", "content": os.environ["CF_PROMPT"]}],
        response_format={"type": "json_schema", "json_schema": {"name": "herbs", "schema": schema}},
    )
    assert json.loads(r.choices[0].message.content) == json.loads(os.environ["CF_WANT"]), r
    assert r.choices[0].finish_reason == "stop"
    r = client().chat.completions.create(
        model="sonnet", messages=[{"role": "user", "content": os.environ["CF_PROMPT"]}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def image():
    url = "data:image/png;base64," + os.environ["CF_PNG_B64"]
    r = client().chat.completions.create(
        model="sonnet",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "describe the picture"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    )
    assert r.choices[0].message.content, r
    try:
        client().chat.completions.create(
            model="sonnet",
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}],
        )
        raise AssertionError("a remote image URL was accepted")
    except openai.BadRequestError as e:
        assert e.code == "bad_request" and e.param == "messages", e.body


def models():
    ids = [m.id for m in client().models.list()]
    assert ids == os.environ["CF_MODELS"].split(","), ids
    m = client().models.retrieve(ids[0])
    assert m.id == ids[0] and m.owned_by == "anthropic"
    try:
        client().models.retrieve("gpt-4o")
        raise AssertionError("an unlisted model was found")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.code == "not_found"


def errors():
    msgs = [{"role": "user", "content": "hi"}]
    expect(openai.AuthenticationError, 401,
           lambda: client(api_key="cf_" + "x" * 43).chat.completions.create(model="sonnet", messages=msgs))
    e = expect(openai.BadRequestError, 400,
               lambda: client().chat.completions.create(model="sonnet", messages=msgs, n=2))
    assert e.param == "n" and e.code == "bad_request", e.body
    e = expect(openai.BadRequestError, 400, lambda: client().chat.completions.create(
        model="sonnet", messages=msgs,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]))
    assert e.param == "tools", e.body
    e = expect(openai.BadRequestError, 400, lambda: client().chat.completions.create(
        model="sonnet", messages=[{"role": "assistant", "content": "last"}]))
    assert e.param == "messages", e.body
    e = expect(openai.InternalServerError, 502, lambda: client().chat.completions.create(
        model="sonnet", messages=[{"role": "user", "content": "@stub:error=the model fell over"}]))
    assert e.code == "upstream_error" and "fell over" in e.message, e.body
    e = expect(openai.PermissionDeniedError, 403, lambda: client().chat.completions.create(
        model="opus", messages=msgs))
    assert e.code == "forbidden", e.body


def budget():
    try:
        client().chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("a spent budget answered")
    except openai.APIStatusError as e:
        assert e.status_code == 402 and e.code == "budget_exhausted", e.body
        assert not isinstance(e, openai.RateLimitError)


def retry_after():
    """The token allows one request at once: a second one gets 429 with Retry-After, and the
    SDK's own retries (which honour it) get it through once the first has finished."""
    slow = threading.Thread(target=lambda: client().chat.completions.create(
        model="sonnet", messages=[{"role": "user", "content": "@stub:sleep=2"}]))
    before = records()
    slow.start()
    wait_for_stub(before)
    try:
        client().chat.completions.create(model="sonnet", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("no 429 while the token's one slot was busy")
    except openai.RateLimitError as e:
        assert e.response.headers.get("retry-after") == "1", e.response.headers
        assert e.code == "overloaded", e.body
    started = time.monotonic()
    r = client(max_retries=6).chat.completions.create(
        model="sonnet", messages=[{"role": "user", "content": "after the wait"}])
    assert r.choices[0].message.content == "echo: after the wait"
    slow.join()
    print(f"retried for {time.monotonic() - started:.2f}s")


def hangup():
    """Reads the first chunk of a stream that never ends, then closes the connection."""
    before = records()
    s = client().chat.completions.create(
        model="sonnet", stream=True, messages=[{"role": "user", "content": os.environ["CF_PROMPT"]}])
    first = next(iter(s))
    assert first.choices[0].delta.role == "assistant"
    wait_for_stub(before)
    s.close()
    print("closed", flush=True)


def idempotent():
    """The same Idempotency-Key twice: the first answer again, marked replayed; and a
    streamed request repeated with its key replays a stream the SDK's iterator finishes
    cleanly, with the same text (the Rust side counts one run each)."""
    msgs = [{"role": "user", "content": os.environ["CF_PROMPT"]}]
    key = {"Idempotency-Key": "openai-once"}
    raw = [client().chat.completions.with_raw_response.create(
        model="sonnet", messages=msgs, extra_headers=key) for _ in range(2)]
    assert raw[0].headers.get("idempotent-replayed") is None, raw[0].headers
    assert raw[1].headers.get("idempotent-replayed") == "true", raw[1].headers
    first, again = raw[0].parse(), raw[1].parse()
    assert first.id == again.id and first.choices[0].message.content == os.environ["CF_WANT"]
    assert again.choices[0].message.content == first.choices[0].message.content

    def streamed():
        s = client().chat.completions.create(
            model="sonnet", stream=True, stream_options={"include_usage": True}, messages=msgs,
            extra_headers={"Idempotency-Key": "openai-stream"})
        chunks = list(s)
        text = "".join(c.choices[0].delta.content for c in chunks
                       if c.choices and c.choices[0].delta.content)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"] and chunks[-1].usage.completion_tokens > 0, chunks
        return [c.id for c in chunks], text
    assert streamed() == streamed() and streamed()[1] == os.environ["CF_WANT"]


if __name__ == "__main__":
    globals()[sys.argv[1]]()
