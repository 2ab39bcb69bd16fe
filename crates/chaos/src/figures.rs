//! The figures of a run: what was done, what was injected, and what the
//! checker found, as a human summary ([`std::fmt::Display`]) and as JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::check::{Report, Violations};
use crate::history::History;
use crate::run::RunConfig;

/// Faults injected, by kind.
#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<BTreeMap<String, u64>>>);

impl Faults {
    pub fn count(&self, kind: &str) {
        *self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(kind.to_owned())
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Accept latency of messages (`201` on the first attempt), in ms.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut us: Vec<u64>) -> Self {
        us.sort_unstable();
        let at = |q: f64| -> f64 {
            if us.is_empty() {
                return 0.0;
            }
            let i = ((us.len() as f64 - 1.0) * q).round() as usize;
            us[i] as f64 / 1000.0
        };
        Self {
            count: us.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// Everything a run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub seed: u64,
    pub store: String,
    pub nodes: usize,
    pub load_seconds: f64,
    pub sessions: usize,
    pub sessions_deleted: usize,
    /// Sessions that never came to rest (a turn that never ended, a queue
    /// never drained): must be zero.
    pub sessions_not_quiesced: usize,
    /// Requests by kind, then by status (`unreachable`: never connected, so
    /// nothing was sent; `no answer`: sent, fate unknown).
    pub operations: BTreeMap<String, BTreeMap<String, u64>>,
    pub faults: BTreeMap<String, u64>,
    pub acknowledged: u64,
    pub stored_entries: u64,
    pub turns: u64,
    pub turns_by_status: BTreeMap<String, u64>,
    pub stream_connections: u64,
    pub streamed_entries: u64,
    /// `500` answers (an unavailable store is `503`): must be zero.
    pub internal_errors: u64,
    pub violations: Violations,
    pub accept_latency: Latency,
    pub details: Vec<String>,
    pub passed: bool,
}

impl Figures {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &RunConfig,
        nodes: usize,
        load_seconds: f64,
        history: &History,
        report: &Report,
        operations: BTreeMap<String, BTreeMap<String, u64>>,
        faults: BTreeMap<String, u64>,
        latencies_us: Vec<u64>,
        not_quiesced: usize,
    ) -> Self {
        let live = history.sessions.iter().filter(|s| !s.deleted);
        let mut turns_by_status = BTreeMap::new();
        for s in live.clone() {
            for t in &s.turns {
                *turns_by_status.entry(t.status.clone()).or_insert(0) += 1;
            }
        }
        let internal_errors = operations
            .values()
            .flat_map(|by| by.iter())
            .filter(|(status, _)| status.starts_with("500"))
            .map(|(_, n)| n)
            .sum();
        let acknowledged = history
            .sessions
            .iter()
            .flat_map(|s| &s.messages)
            .filter(|m| !m.acks.is_empty())
            .count() as u64;
        let streams = history.sessions.iter().flat_map(|s| &s.streams);
        let passed = report.violations.total() == 0 && not_quiesced == 0 && internal_errors == 0;
        Self {
            seed: cfg.seed,
            store: cfg.store.clone(),
            nodes,
            load_seconds,
            sessions: history.sessions.len(),
            sessions_deleted: history.sessions.iter().filter(|s| s.deleted).count(),
            sessions_not_quiesced: not_quiesced,
            operations,
            faults,
            acknowledged,
            stored_entries: live.clone().map(|s| s.log.len() as u64).sum(),
            turns: live.map(|s| s.turns.len() as u64).sum(),
            turns_by_status,
            stream_connections: streams.clone().count() as u64,
            streamed_entries: streams
                .flat_map(|r| &r.events)
                .filter(|e| matches!(e, crate::history::StreamEvent::Entry(_)))
                .count() as u64,
            internal_errors,
            violations: report.violations.clone(),
            accept_latency: Latency::of(latencies_us),
            details: report.details.clone(),
            passed,
        }
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "baton-chaos  seed {}  store {} ({} node{})  load {:.1} s",
            self.seed,
            self.store,
            self.nodes,
            if self.nodes == 1 { "" } else { "s" },
            self.load_seconds
        )?;
        writeln!(f, "\noperations")?;
        for (kind, by) in &self.operations {
            let parts: Vec<String> = by.iter().map(|(s, n)| format!("{s}: {n}")).collect();
            writeln!(f, "  {kind:<16} {}", parts.join(", "))?;
        }
        writeln!(f, "\nfaults injected")?;
        if self.faults.is_empty() {
            writeln!(f, "  none")?;
        }
        for (kind, n) in &self.faults {
            writeln!(f, "  {kind:<20} {n}")?;
        }
        let statuses: Vec<String> = self
            .turns_by_status
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        writeln!(f, "\nrun")?;
        writeln!(
            f,
            "  sessions {} ({} deleted)  acknowledged messages {}  stored entries {}",
            self.sessions, self.sessions_deleted, self.acknowledged, self.stored_entries
        )?;
        writeln!(f, "  turns {} ({})", self.turns, statuses.join(", "))?;
        writeln!(
            f,
            "  stream connections {}  streamed entries {}",
            self.stream_connections, self.streamed_entries
        )?;
        writeln!(
            f,
            "  accept latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms ({} accepts)",
            self.accept_latency.p50_ms,
            self.accept_latency.p99_ms,
            self.accept_latency.max_ms,
            self.accept_latency.count
        )?;
        let v = &self.violations;
        writeln!(f, "\nguarantees (each must be 0)")?;
        let rows: [(&str, u64); 19] = [
            ("lost", v.lost),
            ("duplicated", v.duplicated),
            ("reordered", v.reordered),
            ("seq gaps", v.seq_gaps),
            ("FIFO violations", v.fifo),
            ("overlapping turns", v.overlapping_turns),
            ("overlapping turn times", v.overlapping_turn_times),
            ("turns without end", v.turns_without_end),
            ("turns ended twice", v.turns_ended_twice),
            ("leaked entries", v.leaked_entries),
            ("causality", v.causality),
            ("dispositions broken", v.dispositions),
            ("stream gaps", v.stream_gaps),
            ("stream duplicates", v.stream_duplicates),
            ("stream mismatches", v.stream_mismatches),
            ("leaked deltas", v.leaked_deltas),
            ("isolation", v.isolation),
            ("sessions not at rest", self.sessions_not_quiesced as u64),
            ("internal errors (500)", self.internal_errors),
        ];
        for (name, n) in rows {
            writeln!(f, "  {name:<24} {n}")?;
        }
        for d in &self.details {
            writeln!(f, "  ! {d}")?;
        }
        writeln!(
            f,
            "\n{}",
            if self.passed {
                "PASSED"
            } else {
                "FAILED: a guarantee was violated"
            }
        )
    }
}
