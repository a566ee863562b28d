//! What `acpx --format json` prints during a turn, read by `sessions::acp_log::TurnLog`: one
//! JSON-RPC message per line from the agent side, so untrusted. The input is a turn's
//! output (lines split on newlines); what it shows and the cost must stay sane.
#![no_main]

use clawdforge::sessions::acp_log::TurnLog;
use libfuzzer_sys::fuzz_target;

/// Totals recorded after an earlier turn.
const PREVIOUS_TOTALS: [f64; 3] = [0.0, 0.0036, 1e9];

fuzz_target!(|data: &[u8]| {
    let mut log = TurnLog::default();
    let mut shown = 0;
    for line in data.split(|&b| b == b'\n') {
        if let Some(v) = log.push(line) {
            assert!(v.is_object(), "only JSON objects are shown");
            shown += 1;
        }
    }
    assert_eq!(
        log.events.len(),
        shown,
        "every line shown is kept, no other"
    );
    let _ = log.text();
    for previous in PREVIOUS_TOTALS {
        let (cost, total) = log.cost(previous);
        if let Some(cost) = cost {
            assert!(cost >= 0.0 && cost.is_finite(), "a turn's cost is {cost}");
        }
        assert!(total.is_finite(), "the session's total is {total}");
    }
});
