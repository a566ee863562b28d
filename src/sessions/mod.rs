//! Multi-turn sessions through `acpx`: creating, turning, cancelling and closing them, and
//! the rows that record them.

pub mod acpx;
pub mod parse;
pub mod store;
