#!/usr/bin/env bash
# Fuzzing (not a test): runs each cargo-fuzz target in fuzz/ (the CLI result parser, the
# ACP line parser, the filename sanitiser, the bearer shape check, the client address
# behind proxies) for a bounded time and exits non-zero if any of them crashed. A crashing input is left in
# fuzz/artifacts/TARGET/; keep it as a regression case (see README, "Proof").
#
#   scripts/fuzz.sh                      # every target, FUZZ_SECS (default 60) each
#   FUZZ_SECS=600 scripts/fuzz.sh filename bearer
#
# FUZZ_SANITIZER (default none): the code under test is safe Rust (unsafe_code is
# forbidden), where a sanitizer finds little and slows every run; `address` works too.
# Needs cargo; installs cargo-fuzz from crates.io if missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

secs="${FUZZ_SECS:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
case "$secs" in
  '' | *[!0-9]*) echo "fuzz: FUZZ_SECS must be a whole number of seconds" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
# libFuzzer's instrumentation needs -Z flags; this lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

# -a: debug assertions, so an integer overflow is a crash too.
cargo fuzz build -s "$sanitizer" -a

failed=()
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  echo "fuzz: $target for ${secs}s" >&2
  if cargo fuzz run -s "$sanitizer" -a "$target" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -print_final_stats=1 >"$logs/$target.log" 2>&1; then
    runs="$(awk '/^stat::number_of_executed_units:/ {print $2}' "$logs/$target.log")"
    cov="$(grep -o 'cov: [0-9]*' "$logs/$target.log" | tail -n 1 || true)"
    echo "fuzz: $target: ${runs:-?} inputs in ${secs}s, ${cov:-cov: ?}, no crash" >&2
  else
    failed+=("$target")
    echo "fuzz: $target CRASHED; the end of its log:" >&2
    tail -n 40 "$logs/$target.log" >&2
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${secs}s each, no crash" >&2
