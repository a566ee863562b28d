"""The official `anthropic` Python SDK against clawdforge's /v1/messages and /v1/models.

Run by tests/api/sdk.rs as `.venv-tests/bin/python tests/sdk/anthropic_cases.py CASE` with
CF_BASE_URL, CF_TOKEN and case-specific CF_* vars; exit 0 when every assertion holds.
"""

import base64
import os
import sys

import anthropic
from anthropic import Anthropic

from common import TOKEN, expect, records, wait_for_stub

BASE = os.environ["CF_BASE_URL"]


def client(**kw):
    kw.setdefault("max_retries", 0)
    return Anthropic(base_url=BASE, api_key=kw.pop("api_key", TOKEN), **kw)


def history():
    r = client().messages.create(
        model="haiku", max_tokens=100, system="Be brief.",
        messages=[
            {"role": "user", "content": "I'm Sam."},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello Sam!"}]},
            {"role": "user", "content": "My name?"},
        ],
        metadata={"user_id": "u1"}, stop_sequences=["\n\n\n"],
        extra_body={"temperature": 0.5, "top_k": 5},
    )
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_"), r
    assert r.model == "haiku" and r.stop_reason == "end_turn" and r.stop_sequence is None
    want = ("echo: Earlier in this conversation:\n\nUser: I'm Sam.\n\nAssistant: Hello Sam!"
            "\n\nThe user's new message:\n\nMy name?")
    assert r.content[0].type == "text" and r.content[0].text == want, r.content
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0


def stream():
    with client().messages.stream(
        model="default", max_tokens=100,
        messages=[{"role": "user", "content": os.environ.get("CF_PROMPT", "stream please")}],
    ) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert len(pieces) >= int(os.environ.get("CF_MIN_PIECES", "3")), pieces
    assert "".join(pieces) == os.environ.get("CF_WANT", "echo: stream please"), pieces
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0, final
    assert final.content[0].text == "".join(pieces)


def image():
    png = os.environ["CF_PNG_B64"]
    r = client().messages.create(
        model="sonnet", max_tokens=100,
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            {"type": "text", "text": "describe the picture"},
        ]}],
    )
    assert r.content[0].text, r
    assert base64.b64decode(png)[:4] == b"\x89PNG"


def models():
    page = client().models.list()
    ids = [m.id for m in page.data]
    assert ids == os.environ["CF_MODELS"].split(","), ids
    assert page.has_more is False and page.first_id == ids[0] and page.last_id == ids[-1]
    assert client().models.retrieve(ids[0]).type == "model"
    try:
        client().models.retrieve("claude-nope")
        raise AssertionError("an unlisted model was found")
    except anthropic.NotFoundError as e:
        assert e.status_code == 404 and e.body["error"]["type"] == "not_found_error", e.body


def errors():
    msgs = [{"role": "user", "content": "hi"}]
    e = expect(anthropic.AuthenticationError, 401, lambda: client(api_key="cf_" + "y" * 43)
               .messages.create(model="sonnet", max_tokens=10, messages=msgs))
    assert e.body["error"]["type"] == "authentication_error", e.body
    e = expect(anthropic.BadRequestError, 400, lambda: client().messages.create(
        model="sonnet", max_tokens=10, messages=msgs,
        tools=[{"name": "f", "input_schema": {"type": "object"}}]))
    assert e.body["error"]["type"] == "invalid_request_error", e.body
    expect(anthropic.BadRequestError, 400, lambda: client().messages.create(
        model="sonnet", max_tokens=10, messages=msgs,
        thinking={"type": "enabled", "budget_tokens": 1024}))
    e = expect(anthropic.InternalServerError, 502, lambda: client().messages.create(
        model="sonnet", max_tokens=10, messages=[{"role": "user", "content": "@stub:error=down"}]))
    assert e.body["error"]["type"] == "api_error" and e.body["error"]["code"] == "upstream_error"
    e = expect(anthropic.PermissionDeniedError, 403, lambda: client().messages.create(
        model="opus", max_tokens=10, messages=msgs))
    assert e.body["error"]["type"] == "permission_error", e.body


def budget():
    try:
        client().messages.create(model="sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("a spent budget answered")
    except anthropic.APIStatusError as e:
        assert e.status_code == 402 and e.body["error"]["type"] == "billing_error", e.body
        assert not isinstance(e, anthropic.RateLimitError)


def rate_limited():
    try:
        client().messages.create(model="sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("no 429")
    except anthropic.RateLimitError as e:
        assert e.body["error"]["type"] == "rate_limit_error", e.body
        assert int(e.response.headers["retry-after"]) >= 1


def hangup():
    before = records()
    with client().messages.stream(
        model="sonnet", max_tokens=10, messages=[{"role": "user", "content": os.environ["CF_PROMPT"]}],
    ) as s:
        for event in s:
            assert event.type == "message_start", event
            break
        wait_for_stub(before)
    print("closed", flush=True)


def idempotent():
    """As openai_cases.idempotent: a repeat with the key is the first answer, and a
    repeated stream replays whole, so get_final_message() works on it too."""
    msgs = [{"role": "user", "content": os.environ["CF_PROMPT"]}]
    raw = [client().messages.with_raw_response.create(
        model="sonnet", max_tokens=100, messages=msgs,
        extra_headers={"Idempotency-Key": "anthropic-once"}) for _ in range(2)]
    assert raw[0].headers.get("idempotent-replayed") is None, raw[0].headers
    assert raw[1].headers.get("idempotent-replayed") == "true", raw[1].headers
    first, again = raw[0].parse(), raw[1].parse()
    assert first.id == again.id and first.content[0].text == os.environ["CF_WANT"], first
    assert again.content[0].text == first.content[0].text

    def streamed():
        with client().messages.stream(
            model="sonnet", max_tokens=100, messages=msgs,
            extra_headers={"Idempotency-Key": "anthropic-stream"},
        ) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert final.stop_reason == "end_turn" and final.content[0].text == text, final
        return final.id, text
    assert streamed() == streamed() and streamed()[1] == os.environ["CF_WANT"]


if __name__ == "__main__":
    globals()[sys.argv[1]]()
