#!/usr/bin/env bash
# Proves the stub CLIs in this directory behave as tests/stubs/README.md says, so a
# failing Rust test points at the server, not at its fake. Every stub run is bounded
# by timeout(1); the script fails if any process it started is still alive at the end.
#
#   tests/stubs/selftest.sh        # prints one line per check, exits 1 on any failure
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
claude=$here/claude
acpx=$here/acpx
work=$(mktemp -d)
out=$work/out
err=$work/err
rec=$work/rec
cwd=$work/cwd
mkdir -p "$work/home" "$rec" "$cwd"
# acpx keeps its state under $HOME; the marker finds every process we started.
export HOME=$work/home
export STUB_SELFTEST_MARK=$work
rc=0
failures=0

# Lists live processes (zombies excluded) whose environment carries our marker,
# except this shell and the lister itself.
cat >"$work/leftovers.py" <<'EOF'
import os, sys
mark = ("STUB_SELFTEST_MARK=" + sys.argv[1]).encode()
skip = {os.getpid(), os.getppid(), int(sys.argv[2])}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        continue
    if mark in env and int(pid) not in skip and state != "Z":
        print(pid)
EOF

leftovers() { python3 "$work/leftovers.py" "$work" "$$"; }

cleanup() {
  local pid
  for pid in $(leftovers); do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# check.py evaluates one Python expression against the last run's stdout ($out),
# stderr ($err) and exit status. Names: out, err, rc, objs (the stdout lines that
# parse as JSON objects), last, and for acpx: updates (session/update bodies),
# chunks (agent_message_chunk texts joined), reply (the response to id 2),
# after (objects printed after that response).
cat >"$work/check.py" <<'EOF'
import json, os, sys
out = open(sys.argv[1], encoding="utf-8", errors="replace").read()
err = open(sys.argv[2], encoding="utf-8", errors="replace").read()
rc = int(sys.argv[3])
objs = []
for line in out.splitlines():
    try:
        obj = json.loads(line)
    except ValueError:
        continue
    if isinstance(obj, dict):
        objs.append(obj)
last = objs[-1] if objs else {}
updates = [o["params"]["update"] for o in objs if o.get("method") == "session/update"]
chunks = "".join(u["content"]["text"] for u in updates
                 if u["sessionUpdate"] == "agent_message_chunk")
replies = [i for i, o in enumerate(objs) if o.get("id") == 2 and "method" not in o]
reply = objs[replies[0]] if replies else {}
after = objs[replies[0] + 1:] if replies else []
sys.exit(0 if eval(sys.argv[4]) else 1)
EOF

pass() { printf 'ok    %s\n' "$1"; }
fail() { printf 'FAIL  %s\n' "$1"; failures=$((failures + 1)); }

# expect NAME PYEXPR: judge the last run (see check.py).
expect() {
  if python3 "$work/check.py" "$out" "$err" "$rc" "$2"; then pass "$1"; else
    fail "$1"
    printf '      rc=%s stdout=%.300s stderr=%.300s\n' "$rc" "$(cat "$out")" "$(cat "$err")"
  fi
}

# cl PROMPT ARGS...: the claude stub with PROMPT on stdin. ax: the same for acpx.
cl() {
  local prompt=$1; shift
  rc=0
  printf '%s' "$prompt" | timeout -k 2 10 "$claude" "$@" >"$out" 2>"$err" || rc=$?
}
ax() {
  local prompt=$1; shift
  rc=0
  printf '%s' "$prompt" | timeout -k 2 10 "$acpx" "$@" >"$out" 2>"$err" || rc=$?
}

dead() {
  local state
  [[ -e /proc/$1/stat ]] || return 0
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 0
  [[ -z $state || $state == Z ]]
}
wait_dead() {
  local _
  for _ in $(seq 50); do dead "$1" && return 0; sleep 0.1; done
  return 1
}
pgrp_of() { sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f3; }
# wait_for_glob PATTERN: waits up to 5 s for a non-empty file matching PATTERN; prints it.
wait_for_glob() {
  local _ f
  for _ in $(seq 100); do
    f=$(compgen -G "$1" | head -1) || true
    if [[ -n $f && -s $f ]]; then echo "$f"; return 0; fi
    sleep 0.05
  done
  return 1
}
since() { python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$1" "$EPOCHREALTIME"; }
at_least() { python3 -c 'import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))' "$1" "$2"; }

echo "== claude stub"

cl '' --version
expect "claude --version" 'rc == 0 and out == "2.1.197 (Claude Code)\n"'

mkdir -p "$work/count"
CLAUDE_STUB_COUNT_DIR=$work/count "$claude" --version >/dev/null
CLAUDE_STUB_COUNT_DIR=$work/count "$claude" --version >/dev/null
CLAUDE_STUB_COUNT_DIR=$work/count "$acpx" --version >/dev/null
if [[ $(grep -c '^claude --version$' "$work/count/invocations.log") == 2 ]] &&
   grep -q '^acpx --version$' "$work/count/invocations.log"; then
  pass "CLAUDE_STUB_COUNT_DIR logs one line per invocation"
else fail "CLAUDE_STUB_COUNT_DIR logs one line per invocation"; fi

rc=0; printf 'any prompt' | CLAUDE_STUB_RESULT='["basil","sage"]' "$claude" -p --output-format json \
  >"$out" 2>"$err" || rc=$?
expect "CLAUDE_STUB_RESULT: the result for a prompt without directives" \
  'rc == 0 and last["result"] == "[\"basil\",\"sage\"]"'

cl '' auth status
expect "auth status: logged in" 'rc == 0 and last["loggedIn"] is True'
rc=0; CLAUDE_STUB_LOGGED_OUT=1 "$claude" auth status >"$out" 2>"$err" || rc=$?
expect "auth status: CLAUDE_STUB_LOGGED_OUT=1" 'rc == 1 and last["loggedIn"] is False'

cl 'hello there' -p --output-format json --model opus --system-prompt S \
  --append-system-prompt A --max-turns 3 --permission-mode default --no-session-persistence \
  --add-dir /tmp --allowedTools Read --dangerously-skip-permissions
expect "json: echo, one line, model in modelUsage" \
  'rc == 0 and len(out.splitlines()) == 1 and last["type"] == "result" and last["result"] == "echo: hello there" and last["is_error"] is False and list(last["modelUsage"]) == ["opus"] and last["total_cost_usd"] > 0 and last["usage"]["output_tokens"] > 0 and last["session_id"]'

# shellcheck disable=SC2016 # the backticks are prompt text, not a command
cl 'x @stub:result=```json\n{"a":1}\n```' -p --output-format json
# shellcheck disable=SC2016
expect "@stub:result with \\n escapes" 'last["result"] == "```json\n{\"a\":1}\n```"'

cl 'hi' -p
expect "text output by default" 'rc == 0 and out == "echo: hi\n"'

cl 'streamed' -p --output-format stream-json --verbose --include-partial-messages
expect "stream-json: init, three stream_events, assistant, result" \
  'rc == 0 and [o["type"] for o in objs] == ["system"] + ["stream_event"] * 3 + ["assistant", "result"] and objs[0]["subtype"] == "init" and "".join(o["event"]["delta"]["text"] for o in objs[1:4]) == "echo: streamed" and objs[4]["message"]["content"][0]["text"] == "echo: streamed" and last["result"] == "echo: streamed"'

cl 'x' -p --output-format stream-json
expect "stream-json without --verbose is refused" 'rc == 1 and "--verbose" in err'
cl 'x' -p --output-format json --frobnicate
expect "unknown flag: exit 1" 'rc == 1 and "unknown option" in err'

# Warm-pool mode: it must wait for the first line, answer each line as it comes,
# and exit at EOF.
mkfifo "$work/fifo"
rc=0
timeout -k 2 15 "$claude" -p --input-format stream-json --output-format stream-json --verbose \
  --model haiku <"$work/fifo" >"$out" 2>"$err" &
warm=$!
exec 3>"$work/fifo"
sleep 1
if kill -0 "$warm" 2>/dev/null && [[ ! -s $out ]]; then pass "stream input: waits for the first line"
else fail "stream input: waits for the first line"; fi
echo '{"type":"user","message":{"role":"user","content":"one"}}' >&3
for _ in $(seq 100); do grep -q '"type":"result"' "$out" && break; sleep 0.05; done
if grep -q '"result":"echo: one"' "$out"; then pass "stream input: answers before EOF"
else fail "stream input: answers before EOF"; fi
echo '{"type":"user","message":{"role":"user","content":[{"type":"text","text":"two"}]}}' >&3
exec 3>&-
wait "$warm" || rc=$?
expect "stream input: one init, two answers, exit 0 at EOF" \
  'rc == 0 and [o["type"] for o in objs] == ["system", "assistant", "result", "assistant", "result"] and last["result"] == "echo: two" and list(last["modelUsage"]) == ["haiku"]'

printf 'plain text\n' >"$cwd/a.txt"
printf '\xff\xfe\x00binary' >"$cwd/b.bin"
rc=0
(cd "$cwd" && printf 'record me' | CLAUDE_STUB_RECORD_DIR=$rec CLAUDE_FOO=bar \
  timeout 10 "$claude" -p --output-format json >"$out" 2>"$err") || rc=$?
cp "$(find "$rec" -name '[0-9]*-1.json' | head -1)" "$work/record.json"
printf '%s\n' "$(cat "$work/record.json")" >"$out"
expect "CLAUDE_STUB_RECORD_DIR: pid, pgid, argv, env, cwd, cwd_files, prompt" \
  'last["prompt"] == "record me" and last["argv"] == ["-p", "--output-format", "json"] and last["env"]["CLAUDE_FOO"] == "bar" and last["cwd_files"] == {"a.txt": "plain text\n", "b.bin": None} and last["pid"] > 0 and last["pgid"] > 0 and last["cwd"].endswith("/cwd")'
rm -f "$rec"/*

start=$EPOCHREALTIME
cl 'nap @stub:sleep=0.5' -p --output-format json
if at_least "$(since "$start")" 0.5; then pass "@stub:sleep waits"; else fail "@stub:sleep waits"; fi
expect "@stub:sleep then answers" 'rc == 0 and last["result"].startswith("echo: nap")'

rc=0; printf '@stub:wait-file=%s' "$work/release" | timeout 5 "$claude" -p --output-format json >"$out" 2>"$err" &
held=$!
for _ in $(seq 10); do sleep 0.05; done
if [ -s "$out" ]; then fail "@stub:wait-file holds the answer"; else pass "@stub:wait-file holds the answer"; fi
touch "$work/release"
wait "$held" || rc=$?
expect "@stub:wait-file answers once the file exists" 'rc == 0 and last["result"].startswith("echo: @stub:wait-file")'

rc=0; printf '@stub:hang' | timeout 1 "$claude" -p --output-format json >"$out" 2>"$err" || rc=$?
expect "@stub:hang never answers (timeout ends it)" 'rc == 124 and out == ""'

rc=0
(printf '@stub:ignore-term @stub:hang' | timeout -k 1 2 "$claude" -p --output-format json \
  >"$out" 2>"$err") 2>/dev/null || rc=$?
expect "@stub:ignore-term survives SIGTERM, dies of SIGKILL" 'rc == 137'

# The grandchild must share the stub's process group, so only a group kill reaches it.
rc=0
printf '@stub:grandchild @stub:hang' | CLAUDE_STUB_RECORD_DIR=$rec timeout 3 "$claude" -p \
  --output-format json >"$out" 2>"$err" &
stub=$!
if gc_file=$(wait_for_glob "$rec/grandchild-*.pid"); then
  gc=$(cat "$gc_file")
  rec_pgid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pgid"])' "$rec"/[0-9]*-1.json)
  if [[ $(pgrp_of "$gc") == "$rec_pgid" ]]; then pass "@stub:grandchild: same process group"
  else fail "@stub:grandchild: same process group"; fi
  wait "$stub" || true
  if wait_dead "$gc"; then pass "@stub:grandchild: dies with its group"
  else fail "@stub:grandchild: dies with its group"; fi
else
  fail "@stub:grandchild writes grandchild-<pid>.pid"
  wait "$stub" || true
fi
rm -f "$rec"/*

# hold-stdout: the stub answers and exits, but its grandchild keeps the pipe open.
rc=0
printf '@stub:grandchild=hold-stdout' | CLAUDE_STUB_RECORD_DIR=$rec timeout 10 "$claude" -p \
  --output-format json 2>"$err" | timeout 1.5 cat >"$out" || rc=$?
expect "@stub:grandchild=hold-stdout: answer arrives, EOF does not" 'rc == 124 and last["type"] == "result"'
gc_file=$(wait_for_glob "$rec/grandchild-*.pid") && kill "$(cat "$gc_file")"
rm -f "$rec"/*

cl 'boom @stub:crash' -p --output-format json
expect "@stub:crash: exit 3, partial line, no result" 'rc == 3 and out and not objs and "crash" in err'
cl '@stub:garbage' -p --output-format json
expect "@stub:garbage" 'rc == 0 and out == "this is not json\n"'

cl 'big @stub:flood=1000000' -p --output-format json
expect "@stub:flood: one long line, then the answer" \
  'rc == 0 and len(out) > 1000000 and out.splitlines()[0] == "x" * 1000000 and last["type"] == "result"'
cl 'big @stub:flood-lines=200000' -p --output-format json
expect "@stub:flood-lines: many JSON lines, then the answer" \
  'rc == 0 and len(out) >= 200000 and len(objs) > 2000 and len(objs) == len(out.splitlines()) and last["type"] == "result"'
# A reader that goes away mid-flood must not produce a traceback.
set +o pipefail
printf '@stub:flood=50000000' | timeout 10 "$claude" -p --output-format json 2>"$err" | head -c 10 >/dev/null
set -o pipefail
if [[ ! -s $err ]]; then pass "@stub:flood: closed pipe ends it quietly"
else fail "@stub:flood: closed pipe ends it quietly"; fi

cl 'x @stub:error=Not logged in · Please run /login' -p --output-format json
expect "@stub:error" \
  'rc == 1 and last["is_error"] is True and last["subtype"] == "success" and last["result"] == "Not logged in · Please run /login"'
cl 'x @stub:api400' -p --output-format json
expect "@stub:api400" \
  'rc == 1 and last["is_error"] is True and last["api_error_status"] == 400 and last["result"].startswith("API Error: 400 {")'
cl 'x @stub:usage-limit=1767225600' -p --output-format json
expect "@stub:usage-limit" 'rc == 1 and last["is_error"] and last["result"] == "Claude AI usage limit reached|1767225600"'
cl 'x @stub:max-turns' -p --output-format json --max-turns 2
expect "@stub:max-turns" \
  'rc == 1 and last["subtype"] == "error_max_turns" and last["is_error"] and "result" not in last and last["errors"]'

rc=0; printf '@stub:env' | CLAUDE_BAR=baz timeout 10 "$claude" -p --output-format json >"$out" 2>"$err" || rc=$?
expect "@stub:env" 'json.loads(last["result"])["CLAUDE_BAR"] == "baz"'
cl '@stub:argv' -p --output-format json --model m1
expect "@stub:argv" 'json.loads(last["result"]) == ["-p", "--output-format", "json", "--model", "m1"]'
rc=0; (cd "$cwd" && printf '@stub:cwd' | timeout 10 "$claude" -p --output-format json >"$out" 2>"$err") || rc=$?
expect "@stub:cwd" 'json.loads(last["result"]) == {"a.txt": "plain text\n", "b.bin": None}'
cl 'x @stub:stderr=warning from stub' -p --output-format json
expect "@stub:stderr" 'rc == 0 and err == "warning from stub\n" and last["result"]'

echo "== acpx stub"

g=(--format json --approve-all --cwd "$cwd")

ax '' --version
expect "acpx --version" 'rc == 0 and out == "0.19.1\n"'

ax '' "${g[@]}" claude sessions ensure --name s1
cp "$out" "$work/ensure1"
expect "sessions ensure: created" \
  'rc == 0 and last["action"] == "session_ensured" and last["created"] is True and last["name"] == "s1" and last["acpxRecordId"] and last["acpxSessionId"]'
ax '' "${g[@]}" claude sessions ensure --name s1
expect "sessions ensure again: not created, same ids" \
  "rc == 0 and last['created'] is False and last['acpxSessionId'] == json.load(open('$work/ensure1'))['acpxSessionId']"

ax 'hello' "${g[@]}" claude prompt -s s1 -f -
expect "prompt turn 1: handshake, session/new, prompt id 2" \
  'rc == 0 and objs[0]["method"] == "initialize" and objs[1]["result"]["protocolVersion"] == 1 and objs[2]["method"] == "session/new" and objs[4]["method"] == "session/prompt" and objs[4]["id"] == 2'
expect "prompt turn 1: chunks, 10 KB commands, cumulative cost, result, trailing line" \
  'chunks == "echo[turn 1]: hello" and reply["result"]["stopReason"] == "end_turn" and reply["result"]["usage"]["totalTokens"] > 0 and max(len(l) for l in out.splitlines()) > 8000 and [u["cost"]["amount"] for u in updates if u["sessionUpdate"] == "usage_update"] == [0.0012] and len(after) == 1'

ax '' "${g[@]}" claude prompt -s s1 'again @stub:context'
expect "prompt turn 2 (argv): session/load, context carries, cost is cumulative" \
  'rc == 0 and objs[2]["method"] == "session/load" and chunks == "echo[turn 2]: again @stub:context\ncontext: hello" and [u["cost"]["amount"] for u in updates if u["sessionUpdate"] == "usage_update"][-1] == 0.0024'

ax 'x' "${g[@]}" claude prompt -s nosuch -f -
expect "prompt on unknown session: NO_SESSION, exit 4" \
  'rc == 4 and last["error"]["code"] == -32002 and last["error"]["data"]["acpxCode"] == "NO_SESSION"'
ax '' "${g[@]}" codex sessions ensure --name s1
expect "agent not in CLAUDE_STUB_AGENTS: USAGE, exit 2" 'rc == 2 and last["error"]["data"]["acpxCode"] == "USAGE"'
rc=0; CLAUDE_STUB_AGENTS=claude,codex timeout 10 "$acpx" "${g[@]}" codex sessions ensure --name s1 >"$out" 2>"$err" || rc=$?
expect "CLAUDE_STUB_AGENTS=claude,codex allows codex" 'rc == 0 and last["created"] is True'
ax '' "${g[@]}" --bogus claude sessions ensure --name s1
expect "unknown global flag: USAGE, exit 2" 'rc == 2 and last["error"]["data"]["acpxCode"] == "USAGE"'

ax '' "${g[@]}" claude sessions show s1
expect "sessions show" 'rc == 0 and last["status"] == "open" and last["turnCount"] == 2 and last["turns"][0] == "hello"'
ax '' "${g[@]}" claude status -s s1
expect "status" 'rc == 0 and last["action"] == "status" and last["running"] is False'

start=$EPOCHREALTIME
ax 'nap @stub:sleep=0.5' "${g[@]}" claude prompt -s s1 -f -
if at_least "$(since "$start")" 0.5; then pass "@stub:sleep waits (acpx)"; else fail "@stub:sleep waits (acpx)"; fi
expect "@stub:sleep then answers (acpx)" 'rc == 0 and chunks.startswith("echo[turn 3]: nap")'

# Cancel: a hanging turn ends promptly with stopReason cancelled and exit 0.
rc=0
printf 'wait @stub:hang' | timeout -k 2 10 "$acpx" "${g[@]}" claude prompt -s s1 -f - >"$out" 2>"$err" &
turn=$!
for _ in $(seq 100); do
  "$acpx" "${g[@]}" claude status -s s1 | grep -q '"running":true' && break
  sleep 0.05
done
start=$EPOCHREALTIME
"$acpx" "${g[@]}" claude cancel -s s1 >"$work/cancel.out"
wait "$turn" || rc=$?
if at_least 1 "$(since "$start")" && grep -q '"cancelled":true' "$work/cancel.out"; then
  pass "cancel: reports cancelled, turn ends within 1 s"
else fail "cancel: reports cancelled, turn ends within 1 s"; fi
expect "cancel: the turn answers stopReason cancelled, exit 0" \
  'rc == 0 and reply["result"]["stopReason"] == "cancelled" and chunks'
ax '' "${g[@]}" claude cancel -s s1
expect "cancel with nothing running" 'rc == 0 and last == {"action": "cancel_requested", "cancelled": False}'

ax 'x @stub:crash' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:crash (acpx): RUNTIME error for id 2, exit 1" \
  'rc == 1 and last["id"] == 2 and last["error"]["code"] == -32603 and last["error"]["data"]["acpxCode"] == "RUNTIME"'
ax 'x @stub:fail=TIMEOUT' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:fail=TIMEOUT: exit 3" 'rc == 3 and last["error"]["data"]["acpxCode"] == "TIMEOUT"'
ax 'x @stub:hang' "${g[@]}" --timeout 0.3 claude prompt -s s1 -f -
expect "--timeout: a longer turn ends with TIMEOUT, exit 3" \
  'rc == 3 and last["id"] == 2 and last["error"]["code"] == -32070 and chunks'
ax 'x @stub:max-turns' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:max-turns (acpx): error line, exit 1" 'rc == 1 and "error" in last'
ax 'x @stub:stop=max_tokens' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:stop=max_tokens" 'rc == 0 and reply["result"]["stopReason"] == "max_tokens"'
ax 'x @stub:result=fixed\nanswer' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:result (acpx)" 'rc == 0 and chunks == "fixed\nanswer"'
ax '@stub:garbage' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:garbage (acpx)" 'rc == 0 and out == "this is not json\n"'
ax 'x @stub:flood=300000' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:flood (acpx)" 'rc == 0 and "x" * 300000 in out and reply["result"]["stopReason"] == "end_turn"'
ax 'x @stub:flood-lines=100000' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:flood-lines (acpx)" 'rc == 0 and len(objs) > 1000 and reply'
rc=0; printf '@stub:env' | CLAUDE_BAR=baz timeout 10 "$acpx" "${g[@]}" claude prompt -s s1 -f - >"$out" 2>"$err" || rc=$?
expect "@stub:env (acpx)" 'json.loads(chunks)["CLAUDE_BAR"] == "baz"'
ax '@stub:cwd' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:cwd (acpx) lists --cwd" 'json.loads(chunks) == {"a.txt": "plain text\n", "b.bin": None}'
ax 'x @stub:stderr=acpx says hi' "${g[@]}" claude prompt -s s1 -f -
expect "@stub:stderr (acpx)" 'rc == 0 and err == "acpx says hi\n"'

rc=0
printf 'rec' | CLAUDE_STUB_RECORD_DIR=$rec timeout 10 "$acpx" "${g[@]}" claude prompt -s s1 -f - >/dev/null 2>"$err" || rc=$?
printf '%s\n' "$(cat "$rec"/[0-9]*-1.json)" >"$out"
expect "CLAUDE_STUB_RECORD_DIR (acpx)" \
  'last["stub"] == "acpx" and last["prompt"] == "rec" and last["session"] == "s1" and last["cwd_files"]["a.txt"] == "plain text\n"'
rm -f "$rec"/*

rc=0
(printf '@stub:ignore-term @stub:hang' | timeout -k 1 2 "$acpx" "${g[@]}" claude prompt -s s1 -f - \
  >"$out" 2>"$err") 2>/dev/null || rc=$?
expect "@stub:ignore-term (acpx): dies of SIGKILL" 'rc == 137'

rc=0
printf '@stub:grandchild @stub:hang' | CLAUDE_STUB_RECORD_DIR=$rec timeout 3 "$acpx" "${g[@]}" claude prompt -s s1 -f - \
  >"$out" 2>"$err" &
stub=$!
if gc_file=$(wait_for_glob "$rec/grandchild-*.pid"); then
  gc=$(cat "$gc_file")
  wait "$stub" || true
  if wait_dead "$gc"; then pass "@stub:grandchild (acpx): dies with its group"
  else fail "@stub:grandchild (acpx): dies with its group"; fi
else
  fail "@stub:grandchild (acpx) writes grandchild-<pid>.pid"
  wait "$stub" || true
fi
rm -f "$rec"/*

# Queue owner: detached (own session and group), reused by later turns, killed by close.
ax '' "${g[@]}" claude sessions ensure --name q1
rc=0
printf 'warm' | CLAUDE_STUB_QUEUE_OWNER=1 CLAUDE_STUB_RECORD_DIR=$rec timeout 10 \
  "$acpx" "${g[@]}" --ttl 0 claude prompt -s q1 -f - >"$out" 2>"$err" || rc=$?
expect "queue owner: the turn itself succeeds" 'rc == 0 and reply["result"]["stopReason"] == "end_turn"'
owner_file=$(find "$HOME/.acpx-stub/owners" -name '*.pid' | head -1)
owner=$(cat "$owner_file")
turn_pgid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pgid"])' "$rec"/[0-9]*-1.json)
if ! dead "$owner" && [[ $(pgrp_of "$owner") != "$turn_pgid" ]]; then
  pass "queue owner: alive after the turn, outside the turn's process group"
else fail "queue owner: alive after the turn, outside the turn's process group"; fi
rc=0
printf 'again' | CLAUDE_STUB_QUEUE_OWNER=1 timeout 10 "$acpx" "${g[@]}" claude prompt -s q1 -f - >"$out" 2>"$err" || rc=$?
if [[ $(cat "$owner_file") == "$owner" ]]; then pass "queue owner: reused by the next turn"
else fail "queue owner: reused by the next turn"; fi
ax '' "${g[@]}" claude sessions close q1
expect "sessions close" 'rc == 0 and last["action"] == "session_closed" and last["name"] == "q1"'
if wait_dead "$owner"; then pass "sessions close kills the queue owner"
else fail "sessions close kills the queue owner"; fi
ax 'x' "${g[@]}" claude prompt -s q1 -f -
expect "prompt on a closed session: NO_SESSION, exit 4" 'rc == 4 and last["error"]["data"]["acpxCode"] == "NO_SESSION"'
ax '' "${g[@]}" claude sessions close nosuch
expect "close unknown session: NO_SESSION, exit 4" 'rc == 4 and last["error"]["data"]["acpxCode"] == "NO_SESSION"'
ax '' "${g[@]}" claude sessions ensure --name q1
expect "ensure after close: created again" 'rc == 0 and last["created"] is True'

ax '' "${g[@]}" claude sessions ensure --name t1
rm -f "$rec"/*
printf 'short' | CLAUDE_STUB_QUEUE_OWNER=1 timeout 10 "$acpx" "${g[@]}" --ttl 0.5 claude prompt -s t1 -f - >/dev/null 2>&1
owner=$(cat "$(grep -l . "$HOME"/.acpx-stub/owners/*.pid | head -1)")
if wait_dead "$owner"; then pass "queue owner: exits by itself after --ttl"
else fail "queue owner: exits by itself after --ttl"; fi

echo "== leftovers"
left=$(leftovers)
if [[ -z $left ]]; then pass "no process left behind"
else fail "processes left behind: $(echo "$left" | tr '\n' ' ')"; fi

if ((failures)); then
  echo "$failures check(s) failed"
  exit 1
fi
echo "all checks passed"
