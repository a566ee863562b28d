//! Governance (issue #7): what each app token may do and what it has used.
//! - [`policy`]: the per-token limits and how mint and PATCH bodies set them;
//! - [`usage`]: the daily usage ledger that runs and turns add to when they finish;
//! - [`Admitter`]: the one check every run and turn passes before it may spawn (usage-limit
//!   block, model, budget, per-token concurrency and rate, then a global slot);
//! - [`idempotency`]: `Idempotency-Key`, so a repeated request gets its first answer
//!   instead of a second run.

mod admit;
pub mod idempotency;
pub mod policy;
pub mod usage;

pub use admit::{Admission, Admitter, Governor};
