//! Upload filenames, as clients send them, become the names files get in run dirs
//! (`files::sanitize`). The properties its doc promises, for any input.
#![no_main]

use clawdforge::files::sanitize::{distinct, sanitize, MAX_NAME_BYTES};
use libfuzzer_sys::fuzz_target;

/// Windows device names, which must never be a stored name's stem.
const DEVICE_NAMES: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

fn assert_safe(name: &str, original: &str) {
    assert!(!name.is_empty(), "{original:?}: empty");
    assert!(
        name.len() <= MAX_NAME_BYTES,
        "{original:?} -> {name:?}: too long"
    );
    assert!(
        !name.contains(['/', '\\']),
        "{original:?} -> {name:?}: a path separator"
    );
    assert!(
        !name.chars().any(char::is_control),
        "{original:?} -> {name:?}: a control character"
    );
    assert!(name != "." && name != "..", "{original:?} -> {name:?}");
    assert!(
        !name.starts_with(['.', '-']),
        "{original:?} -> {name:?}: hidden or flag-like"
    );
    assert_eq!(name.trim(), name, "{original:?}: surrounding whitespace");
    let stem = name.split('.').next().unwrap_or("").trim_end();
    assert!(
        !DEVICE_NAMES.iter().any(|d| d.eq_ignore_ascii_case(stem)),
        "{original:?} -> {name:?}: a device name"
    );
}

fuzz_target!(|data: &[u8]| {
    let original = String::from_utf8_lossy(data);
    let name = sanitize(&original);
    assert_safe(&name, &original);
    // A stored name is already safe, so sanitising it again changes nothing.
    assert_eq!(sanitize(&name), name, "not idempotent for {original:?}");

    // Names made distinct within a run stay distinct and path-free.
    let mut taken = vec![name.clone()];
    for _ in 0..3 {
        let next = distinct(&name, &taken);
        assert!(!taken.contains(&next), "{next:?} is taken");
        assert!(!next.contains(['/', '\\']) && !next.starts_with(['.', '-']));
        taken.push(next);
    }
});
