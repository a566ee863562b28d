# clawdforge container image.
#
#   docker build -t clawdforge:latest .        (or: docker compose build)
#
# Two stages: a Rust toolchain image builds the binary, and a Node 22
# image runs it, because the agent CLIs (`claude`, `acpx`, the ACP adapter) are
# npm packages that need Node >= 22 (see docs/cli-behaviour.md). What the
# server answers once it runs: docs/api.md.

# The builder's toolchain. The crate's MSRV is 1.89, what the locked
# dependencies need (scripts/lint-packaging.sh checks the tag against
# Cargo.lock); pin a tag we have built with. bookworm on both
# stages so the binary links against the same glibc it runs on.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG NODE_IMAGE=node:22-bookworm-slim

# --------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src

# Dependencies change far less often than our code: build them against a dummy
# main first so this layer stays cached across source edits. If the manifest
# ever gains a build.rs or explicitly declared targets, copy them here too.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/.fingerprint/clawdforge-* \
              target/release/deps/clawdforge-* target/release/clawdforge*

COPY src ./src
# COPY keeps the build context's mtimes, which can be older than the dummy
# build; touching makes cargo's mtime-based fingerprint see the real sources.
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked \
    && test -x target/release/clawdforge

# --------------------------------------------------------------------------
FROM ${NODE_IMAGE} AS runtime

# tini as PID 1: the server spawns many short-lived agent process trees and
# must not leave zombies behind; it also forwards SIGTERM for a clean exit.
# ca-certificates: the agents talk TLS to Anthropic (and npm at build time).
# util-linux: `setpriv`, through which the server starts every agent so that it
# dies with a SIGKILLed server (already in the base image; named so it stays).
# Versions are not pinned: the base tag fixes the Debian release, and bookworm
# only ships security fixes, which we want; exact pins break the build as soon
# as the archive drops the old revision.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini ca-certificates util-linux \
    && rm -rf /var/lib/apt/lists/*

# Claude Code refuses --dangerously-skip-permissions (used by the ACP adapter)
# as root, so the service runs as an unprivileged user. Fixed uid/gid so
# volume ownership is predictable for operators who bind-mount instead.
# The volume mount points are created here, owned by that user, because Docker
# seeds a fresh named volume with the image's ownership of its mount point.
RUN groupadd --gid 10001 clawdforge \
    && useradd --uid 10001 --gid 10001 --home-dir /home/clawdforge --create-home \
               --shell /usr/sbin/nologin clawdforge \
    && mkdir -p /data /home/clawdforge/.claude /home/clawdforge/.acpx \
                /home/clawdforge/.cache /home/clawdforge/.local /home/clawdforge/.config \
                /home/clawdforge/.npm \
    && chown -R 10001:10001 /data /home/clawdforge \
    && chmod 0700 /home/clawdforge/.claude /home/clawdforge/.acpx

# The same pinned installer the developers and CI use, so the image runs exactly
# the CLI versions the tests ran against. Installed as root into /opt: the
# service user can run but not modify them (the read-only root fs enforces it
# too). The npm cache goes to a throwaway dir so it does not bloat the layer.
COPY scripts/install-agents.sh /opt/clawdforge/install-agents.sh
RUN NPM_CONFIG_CACHE=/tmp/npm-cache NPM_CONFIG_UPDATE_NOTIFIER=false \
        bash /opt/clawdforge/install-agents.sh /opt/agents \
    && rm -rf /tmp/npm-cache /root/.npm

COPY scripts/healthcheck.mjs /opt/clawdforge/healthcheck.mjs
COPY --from=builder /src/target/release/clawdforge /usr/local/bin/clawdforge

# CLAUDE_CONFIG_DIR holds the `claude /login` credentials and .claude.json.
# DISABLE_AUTOUPDATER: the CLIs are pinned by the image; a self-update would
# fail on the read-only root fs anyway. The server hands PATH, HOME and the
# CLAUDE_*/DISABLE_* variables on to the agent processes it starts.
ENV PATH=/opt/agents/node_modules/.bin:$PATH \
    HOME=/home/clawdforge \
    CLAWDFORGE_DATA_DIR=/data \
    CLAWDFORGE_LISTEN=0.0.0.0:8800 \
    CLAUDE_CONFIG_DIR=/home/clawdforge/.claude \
    DISABLE_AUTOUPDATER=1

# /data: SQLite db, uploads, run and session working dirs.
# .claude: the login; losing it means running `claude /login` again.
# .acpx: acpx's session records and queue locks, which must survive restarts
#        for open sessions to be resumable and reconcilable.
VOLUME ["/data", "/home/clawdforge/.claude", "/home/clawdforge/.acpx"]

USER 10001:10001
WORKDIR /data
EXPOSE 8800

# node is already in the image, so the probe costs no extra package. It reads
# CLAWDFORGE_LISTEN so a changed port does not make the container "unhealthy".
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["node", "/opt/clawdforge/healthcheck.mjs"]

LABEL org.opencontainers.image.title="clawdforge" \
      org.opencontainers.image.description="LAN appliance brokering HTTP access to coding agents (claude -p, acpx)" \
      org.opencontainers.image.licenses="MIT"

ENTRYPOINT ["tini", "--", "clawdforge"]
CMD ["serve"]
