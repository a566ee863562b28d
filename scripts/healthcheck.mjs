// Container health probe: exit 0 when clawdforge answers GET /healthz with
// {"ok": true}, 1 otherwise. Used by the Dockerfile's HEALTHCHECK and compose.
//
// Written for Node (already in the runtime image) so the image needs no curl.
// /healthz never spawns a process, so probing it every few seconds is cheap;
// it reports liveness only (`clawdforge doctor` reports readiness).
//
// The port comes from CLAWDFORGE_LISTEN so a changed port keeps the probe
// right. A wildcard bind is probed on loopback, which the IP allowlist always
// admits; a specific bind address is probed as given.

const listen = process.env.CLAWDFORGE_LISTEN || "0.0.0.0:8800";
const cut = listen.lastIndexOf(":");
let host = cut > 0 ? listen.slice(0, cut) : "0.0.0.0";
const port = cut >= 0 ? listen.slice(cut + 1) : "8800";
if (host === "0.0.0.0" || host === "") host = "127.0.0.1";
if (host === "[::]") host = "[::1]";

try {
  const res = await fetch(`http://${host}:${port}/healthz`, {
    signal: AbortSignal.timeout(4000),
  });
  const body = await res.json().catch(() => ({}));
  process.exit(res.ok && body.ok === true ? 0 : 1);
} catch {
  process.exit(1);
}
