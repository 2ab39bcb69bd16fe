//! Prometheus metrics: request counts and latencies by route, message
//! dispositions, the queue depth a queued message finds, open streams, live
//! actors and the store's invariant breaches (read at scrape time), and,
//! registered from the engine and the store, turns by agent and status,
//! turn durations, and store commit latency and batch size.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use baton_core::DispositionType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConstraintLabels {
    constraint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DispositionLabels {
    disposition: String,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    messages: Family<DispositionLabels, Counter>,
    streams: Gauge,
    actors: Gauge,
    late: Family<AgentLabels, Counter>,
    breaches: Family<ConstraintLabels, Counter>,
    queue_depth: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("baton");
        let requests = Family::<RouteLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        let messages = Family::<DispositionLabels, Counter>::default();
        let streams = Gauge::default();
        let actors = Gauge::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP latency until the response head",
            latency.clone(),
        );
        registry.register(
            "messages",
            "User messages accepted, by disposition",
            messages.clone(),
        );
        registry.register("open_streams", "SSE streams open", streams.clone());
        registry.register(
            "session_actors",
            "Sessions with a turn running on this node",
            actors.clone(),
        );
        let late = Family::<AgentLabels, Counter>::default();
        registry.register(
            "agent_late_updates",
            "Agent updates dropped because no prompt of a live turn was in flight",
            late.clone(),
        );
        let breaches = Family::<ConstraintLabels, Counter>::default();
        registry.register(
            "invariant_breaches",
            "Schema backstops that fired (a unique index the store never violates), by constraint",
            breaches.clone(),
        );
        let queue_depth = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "queue_depth",
            "A queued or merged message's position in its session's queue when it was accepted",
            queue_depth.clone(),
        );
        Self {
            registry,
            breaches,
            requests,
            latency,
            messages,
            streams,
            actors,
            late,
            queue_depth,
        }
    }
}

/// Decrements the open-streams gauge when dropped.
pub struct StreamGauge(Gauge);

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// The API's metrics with the engine's turn metrics and the store's
    /// commit metrics in the same registry.
    pub fn for_engine(engine: &baton_engine::Engine) -> Self {
        let mut m = Self::default();
        engine.turn_metrics().register(&mut m.registry);
        if let Some(stats) = engine.store().commit_stats() {
            stats.register(&mut m.registry);
        }
        m
    }

    /// A message queued at `position` (1: next).
    pub fn queue_depth(&self, position: u64) {
        self.queue_depth.observe(position as f64);
    }

    /// Counts an accepted message (retries count as `replayed`).
    pub fn message(&self, kind: DispositionType, replayed: bool) {
        let disposition = if replayed {
            "replayed".to_owned()
        } else {
            serde_json::to_value(kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        self.messages
            .get_or_create(&DispositionLabels { disposition })
            .inc();
    }

    /// Counts an open stream until the guard drops.
    pub fn stream_opened(&self) -> StreamGauge {
        self.streams.inc();
        StreamGauge(self.streams.clone())
    }
}

/// Records every request's route, status and latency.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    let labels = RouteLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    state
        .metrics
        .latency
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64());
    response
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", operation_id = "getMetrics",
    responses((status = 200, description = "The metrics in the OpenMetrics text format", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
pub async fn render(State(state): State<AppState>) -> Response {
    state
        .metrics
        .actors
        .set(state.engine.active_actors() as i64);
    for (name, agent) in state.engine.agents().iter() {
        let counter = state.metrics.late.get_or_create(&AgentLabels {
            agent: name.to_owned(),
        });
        let total = agent.late_updates();
        counter.inc_by(total.saturating_sub(counter.get()));
    }
    for (constraint, total) in state.engine.store().invariant_breaches() {
        let counter = state
            .metrics
            .breaches
            .get_or_create(&ConstraintLabels { constraint });
        counter.inc_by(total.saturating_sub(counter.get()));
    }
    let mut out = String::new();
    // Writing to a String cannot fail; a metric that cannot be encoded is
    // logged and left out.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &state.metrics.registry) {
        tracing::error!(error = %e, "encoding metrics");
    }
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
