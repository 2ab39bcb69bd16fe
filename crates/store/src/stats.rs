//! What the store measures of its own commits: how long a commit takes
//! and how many writes share it (the group commit of the embedded writer
//! and of PostgreSQL's lanes; a write run alone after a conflict counts as
//! a commit of one).

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Commit latency and batch size; cheap to clone (the clones share).
#[derive(Clone, Debug)]
pub struct CommitStats {
    seconds: Histogram,
    batch: Histogram,
}

impl Default for CommitStats {
    fn default() -> Self {
        Self {
            // 50 µs to about 6.5 s.
            seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 18)),
            // 1 to 512 writes.
            batch: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
        }
    }
}

impl CommitStats {
    /// One commit of `writes` writes that took `seconds`.
    pub fn observe(&self, seconds: f64, writes: usize) {
        self.seconds.observe(seconds);
        self.batch.observe(writes as f64);
    }

    /// Registers both histograms (`store_commit_duration_seconds`,
    /// `store_commit_batch_size`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "store_commit_duration_seconds",
            "Time of one store commit (of a batch of writes)",
            self.seconds.clone(),
        );
        registry.register(
            "store_commit_batch_size",
            "Writes committed together in one transaction",
            self.batch.clone(),
        );
    }
}
