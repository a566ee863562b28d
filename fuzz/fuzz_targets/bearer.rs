//! `Authorization` header values, as any client may send them: the bearer is taken out
//! (`http::extract::bearer_from_header`) and its shape checked before any lookup
//! (`auth::tokens::looks_like_app_token`).
#![no_main]

use clawdforge::auth::tokens::{hash_token, looks_like_app_token};
use clawdforge::http::extract::bearer_from_header;
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if looks_like_app_token(text) {
            let rest = text
                .strip_prefix("cf_")
                .expect("an app token starts with cf_");
            assert!(rest.len() >= 32 && rest.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
    }
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    if let Some(token) = bearer_from_header(&value) {
        assert!(!token.is_empty());
        assert_eq!(token.trim(), token);
        let header = value
            .to_str()
            .expect("a bearer comes from a visible-ASCII value");
        assert!(header.contains(token));
        assert!(header[..6].eq_ignore_ascii_case("bearer"));
        assert_eq!(hash_token(token).len(), 64);
    }
});
