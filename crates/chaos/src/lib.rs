//! `baton-chaos`: Baton's guarantees as figures.
//!
//! The tool drives real `baton serve` processes (or a deployment's URLs)
//! over HTTP and SSE under load and scheduled faults, records every
//! client-side observation as a [`history::History`], and judges it with the
//! pure checker in [`check`] against the contract (DESIGN.md, I1–I11).
//!
//! - [`history`]: what a run observed, as plain data.
//! - [`check`]: the pure checker.
//! - [`client`]: requests and stream reads, counted.
//! - [`servers`]: `baton serve` processes and the database proxies.
//! - [`run`]: load, faults, quiescence, read-back; the final pass.
//! - [`figures`]: the summary, human and JSON.

pub mod check;
pub mod client;
pub mod figures;
pub mod history;
pub mod run;
pub mod servers;
