"""What both SDK case files share: the server's address and token, waiting for the stub,
and checking that a call raises the SDK's typed error."""

import os
import time

TOKEN = os.environ["CF_TOKEN"]


def records():
    """How many prompts the stub claude has recorded (CF_RECORD_DIR)."""
    return len([f for f in os.listdir(os.environ["CF_RECORD_DIR"]) if f.endswith(".json")])


def wait_for_stub(before):
    """Until the stub has recorded more than `before` prompts: proof that the server's
    process runs, read from the state it leaves, not guessed by a sleep."""
    deadline = time.monotonic() + 30
    while records() <= before:
        assert time.monotonic() < deadline, "the stub never started"
        time.sleep(0.02)


def expect(cls, status, call):
    """`call()` must raise `cls` with this HTTP status; returns the exception."""
    try:
        call()
    except cls as e:
        assert e.status_code == status, (e.status_code, e.body)
        return e
    raise AssertionError(f"no {cls.__name__}")
