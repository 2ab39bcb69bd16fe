//! Test support, kept out of the production crates: the store contract
//! suite ([`contract`]), which every [`baton_store::Store`] implementation
//! must pass, and PostgreSQL test schemas ([`pg`]).

pub mod contract;
pub mod pg;
