//! What the engine counts: turns ended by agent and status, and how long
//! they ran. Registered into the API's registry at start.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TurnLabels {
    agent: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

/// Turn counts and durations; the clones share.
#[derive(Clone, Debug)]
pub struct TurnMetrics {
    ended: Family<TurnLabels, Counter>,
    seconds: Family<AgentLabels, Histogram>,
}

impl Default for TurnMetrics {
    fn default() -> Self {
        Self {
            ended: Family::default(),
            // 10 ms to about 22 min.
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 18))
            }),
        }
    }
}

impl TurnMetrics {
    /// A turn of `agent` ended with `status` after `seconds` on this node.
    pub fn ended(&self, agent: &str, status: &str, seconds: f64) {
        self.ended
            .get_or_create(&TurnLabels {
                agent: agent.to_owned(),
                status: status.to_owned(),
            })
            .inc();
        self.seconds
            .get_or_create(&AgentLabels {
                agent: agent.to_owned(),
            })
            .observe(seconds);
    }

    /// Registers `turns_total{agent,status}` and
    /// `turn_duration_seconds{agent}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "turns",
            "Turns ended on this node, by agent and status",
            self.ended.clone(),
        );
        registry.register(
            "turn_duration_seconds",
            "How long turns ran on this node, from start to end, by agent",
            self.seconds.clone(),
        );
    }
}
