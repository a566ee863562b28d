//! What `claude -p` prints, read by `runner::claude_json`: the result line, the fence around an
//! answer, the usage-limit message and the verdict. The CLI's output is untrusted text.
//! The input is one output line; it also serves as stderr, with several exit codes and
//! clocks (extremes included).
#![no_main]

use clawdforge::error::ApiError;
use clawdforge::runner::claude_json::{answer_value, answer_or_error, parse_result_line, strip_fence, usage_limit};
use libfuzzer_sys::fuzz_target;

/// The longest quoted CLI message (`claude_json::MESSAGE_MAX`) plus the ellipsis.
const MESSAGE_MAX_BYTES: usize = 2000 + '…'.len_utf8();
const CLOCKS: [i64; 4] = [0, 1_763_740_800, i64::MIN, i64::MAX];
const EXITS: [Option<i32>; 4] = [Some(0), Some(1), Some(-1), None];

fuzz_target!(|line: &[u8]| {
    let parsed = parse_result_line(line);
    let text = String::from_utf8_lossy(line);
    if let Some(inner) = strip_fence(&text) {
        assert!(
            text.contains(inner),
            "the inside of a fence comes from the text"
        );
    }
    let value = answer_value(&text);
    if strip_fence(&text).is_none() {
        if let Ok(direct) = serde_json::from_str::<serde_json::Value>(text.trim()) {
            assert_eq!(value, direct, "JSON without a fence is the answer as it is");
        }
    }
    for now in CLOCKS {
        if let Some(limit) = usage_limit(&text, now) {
            assert!(
                matches!(limit, ApiError::UsageLimit { retry_after_secs, .. } if retry_after_secs > 0)
            );
        }
        for exit in EXITS {
            match answer_or_error(parsed.clone(), exit, &text, now) {
                Ok(r) => {
                    assert_eq!(exit, Some(0), "only a clean exit succeeds");
                    assert!(!r.is_error);
                    assert_eq!(Some(r), parsed);
                }
                Err(ApiError::Upstream(message)) => {
                    assert!(
                        message.len() <= MESSAGE_MAX_BYTES,
                        "{} bytes",
                        message.len()
                    );
                }
                Err(ApiError::UsageLimit {
                    retry_after_secs, ..
                }) => assert!(retry_after_secs > 0),
                Err(other) => panic!("judge answered {other:?}"),
            }
        }
    }
});
