"""Times chat completions through the official `openai` SDK (pinned in
tests/sdk/requirements.txt, run with .venv-tests/bin/python) for examples/bench.rs.
CF_BASE_URL (the server, no /v1) and CF_TOKEN (an app token) name the server. Each line on
stdin asks for one request, `chat` (whole answer) or `stream` (streamed): the driver makes it
and prints one JSON line, `{"ms": total, "first_ms": first content chunk or null}`, so the
caller decides when each request goes (e.g. once the warm pool has refilled). One client for
all requests, as an app keeps one."""

import json
import os
import sys
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ["CF_BASE_URL"] + "/v1", api_key=os.environ["CF_TOKEN"],
                max_retries=0)
messages = [{"role": "user", "content": "ping"}]

for line in sys.stdin:
    mode = line.strip()
    start = time.perf_counter()
    first = None
    if mode == "chat":
        r = client.chat.completions.create(model="sonnet", messages=messages)
        if not r.choices[0].message.content:
            sys.exit(f"bench_openai: an empty answer: {r}")
    elif mode == "stream":
        text = ""
        for chunk in client.chat.completions.create(model="sonnet", messages=messages,
                                                    stream=True):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece and first is None:
                first = (time.perf_counter() - start) * 1000
            text += piece or ""
        if not text:
            sys.exit("bench_openai: a stream without content")
    else:
        sys.exit(f"bench_openai: unknown request kind {mode!r}")
    print(json.dumps({"ms": (time.perf_counter() - start) * 1000, "first_ms": first}),
          flush=True)
