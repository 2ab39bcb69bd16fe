//! `baton-chaos`: Baton's guarantees as figures.
//!
//! The tool drives real `baton serve` processes (or a deployment's URLs)
//! over HTTP and SSE under load and scheduled faults, records every
//! client-side observation as a [`history::History`], and judges it with the
//! pure checker in [`check`] against the contract (DESIGN.md, I1–I11).

pub mod check;
pub mod history;
