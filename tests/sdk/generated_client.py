"""Calls the server through a client that openapi-python-client generated from its
/openapi.json (tests/api/openapi_client.rs generates it and runs this). Environment:
CF_BASE_URL, CF_TOKEN, CF_CLIENT_DIR (the generated project, holding package
`cf_client`). Every call goes through the generated functions and models; an answer that
does not parse into its documented model fails here."""

import io
import os
import sys

sys.path.insert(0, os.environ["CF_CLIENT_DIR"])

from cf_client import AuthenticatedClient, Client  # noqa: E402
from cf_client.api.files import upload_file  # noqa: E402
from cf_client.api.health import healthz  # noqa: E402
from cf_client.api.runs import run  # noqa: E402
from cf_client.models import ErrorBody, ErrorCode, RunBody, ToolPreset, UploadForm  # noqa: E402
from cf_client.types import File  # noqa: E402


def check(cond, what):
    if not cond:
        sys.exit(f"generated client: {what}")


base = os.environ["CF_BASE_URL"]
app = AuthenticatedClient(base_url=base, token=os.environ["CF_TOKEN"],
                          raise_on_unexpected_status=True)

health = healthz.sync_detailed(client=Client(base_url=base, raise_on_unexpected_status=True))
check(health.status_code == 200, f"/healthz answered {health.status_code}")
h = health.parsed
check(type(h).__name__ == "HealthzResponse200", f"/healthz parsed as {type(h).__name__}")
check(h.ok is True and h.claude_present is True, f"/healthz: {h.to_dict()}")
check(h.storage.value == "ok", f"/healthz storage: {h.storage}")

payload = b"hello from the generated client\n"
up = upload_file.sync_detailed(client=app, body=UploadForm(
    file=File(payload=io.BytesIO(payload),
              file_name="notes.txt", mime_type="text/plain"),
    ttl_secs=120))
check(up.status_code == 201, f"/files answered {up.status_code}: {up.content!r}")
f = up.parsed
check(f.ok is True and f.filename == "notes.txt" and f.ttl_secs == 120 and f.size == len(payload),
      f"/files: {f.to_dict()}")

res = run.sync_detailed(client=app, body=RunBody(prompt="hi", files=[f.file_token],
                                                 tools=ToolPreset.NONE, timeout_secs=30))
check(res.status_code == 200, f"/run answered {res.status_code}: {res.content!r}")
r = res.parsed
check(r.ok is True and r.stop_reason == "end_turn" and r.run_id.startswith("run_")
      and r.cost_usd > 0 and r.usage.input_tokens > 0 and r.result,
      f"/run: {r.to_dict()}")
check(res.headers["x-run-id"] == r.run_id, "X-Run-Id names the run")
print(r.run_id)

# An error answer parses into the envelope's model, its code into the documented enum.
gone = run.sync_detailed(client=app, body=RunBody(prompt="hi", files=["ff_unknown"]))
check(gone.status_code == 404 and isinstance(gone.parsed, ErrorBody)
      and gone.parsed.code == ErrorCode.NOT_FOUND, f"unknown file: {gone.content!r}")
