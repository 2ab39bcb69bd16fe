//! `GET /v1/sessions/{id}/stream`: Server-Sent Events with gapless resume (I9).
//!
//! The order of operations is what makes resume gapless: subscribe to the
//! live bus first, then read the backlog from the store, then follow the
//! live events, dropping any entry already sent (`seq <= last`) and filling
//! any hole (`seq > last + 1`, or a lagged receiver) from the store. Every
//! entry on the bus is committed, and so is everything before it, so the
//! store can always fill the hole. Deltas carry no id and go out only for a
//! turn the stream knows to be running (the session's turn when it opened,
//! or one whose `turn_started` it sent, until its `turn_ended`): a stream
//! resumed past a turn's end drops that turn's late deltas from another
//! node's bus. They are also dropped when they come from a worker
//! whose lease epoch is older than one already seen (I8; the rule lives in
//! `baton_core::late::DeltaFilter`). At shutdown a stream ends only once the
//! node's turns have ended, after sending what they stored last.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use baton_core::late::DeltaFilter;
use baton_core::{Entry, Seq, SessionId, TurnId};
use baton_engine::BusEvent;
use baton_store::{SharedStore, StoreError};
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ApiError, ApiResult};
use crate::extract::{parse_u64, Owner, SessionPath};
use crate::AppState;

/// How many entries one store read fetches while catching up.
const PAGE: u32 = 500;

/// How often a stream checks the store for entries the bus did not bring.
const RESYNC: Duration = Duration::from_secs(3);

/// A delta as sent on the stream.
#[derive(Serialize)]
struct Delta<'a> {
    turn_id: TurnId,
    text: &'a str,
}

/// Follow a session live, resuming after `Last-Event-ID` or `?after=N`.
#[utoipa::path(get, path = "/v1/sessions/{id}/stream", operation_id = "streamSession",
    params(("id" = String, Path), ("after" = Option<u64>, Query, description = "Resume after this seq"),
        ("Last-Event-ID" = Option<String>, Header, description = "Wins over ?after")),
    responses((status = 200, description = "The session's entries from the resume point on, then live: `entry` events with id = seq, `delta` events without id", content_type = "text/event-stream", body = String),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn stream(
    State(state): State<AppState>,
    Owner(owner): Owner,
    SessionPath(id): SessionPath,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let session = state.engine.session(&owner, id).await?;
    // Repeated headers are one list (RFC 9110 §5.3): the same id twice is
    // that id; two different ones say nothing a resume can use.
    let mut ids = headers.get_all("last-event-id").iter();
    let first = ids.next();
    if let Some(first) = first {
        if ids.any(|v| v.as_bytes().trim_ascii() != first.as_bytes().trim_ascii()) {
            return Err(ApiError::invalid(
                "Last-Event-ID is given twice with different values",
            ));
        }
    }
    let after = match first {
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| ApiError::invalid("Last-Event-ID must be an integer"))?;
            parse_u64("Last-Event-ID", v.trim())?
        }
        None => match q.get("after") {
            Some(v) => parse_u64("after", v)?,
            None => 0,
        },
    };
    if after > session.last_seq {
        return Err(ApiError::invalid(format!(
            "cannot resume after seq {after}: the session's last_seq is {}",
            session.last_seq
        )));
    }
    // Subscribe before reading the backlog: nothing committed from here on
    // can be missed.
    let live = state.engine.bus().subscribe(id);
    let (tx, rx) = mpsc::channel(256);
    let store = state.engine.store().clone();
    let gauge = state.metrics.stream_opened();
    let closed = state.engine.shutdown_signal();
    let bus = state.engine.bus().clone();
    tokio::spawn(async move {
        let _gauge = gauge;
        // Streams end when the server has stopped its turns, so graceful
        // shutdown does not wait on them; clients resume elsewhere with
        // Last-Event-ID.
        if let Err(e) = follow(store, id, after, session.turn_id, live, &tx, closed).await {
            tracing::debug!(session = %id, error = %e, "stream ended");
        }
        bus.prune(id);
    });
    Ok(Sse::new(ReceiverStream::new(rx)).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    ))
}

/// Why a stream stopped.
#[derive(Debug)]
enum Stop {
    Disconnected,
    Store(StoreError),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Disconnected => f.write_str("client disconnected"),
            Self::Store(e) => write!(f, "{e}"),
        }
    }
}

struct Cursor<'a> {
    tx: &'a mpsc::Sender<Result<Event, Infallible>>,
    last: Seq,
    deltas: DeltaFilter,
}

impl Cursor<'_> {
    async fn send_entry(&mut self, e: &Entry) -> Result<(), Stop> {
        if e.seq <= self.last {
            return Ok(());
        }
        let data = serde_json::to_string(e)
            .map_err(|err| Stop::Store(StoreError::Internal(err.to_string())))?;
        let event = Event::default()
            .event("entry")
            .id(e.seq.to_string())
            .data(data);
        self.tx
            .send(Ok(event))
            .await
            .map_err(|_| Stop::Disconnected)?;
        self.last = e.seq;
        self.deltas.entry(e);
        Ok(())
    }

    /// Sends every stored entry after `last`, up to `upto` (or the end).
    async fn catch_up(
        &mut self,
        store: &SharedStore,
        id: SessionId,
        upto: Option<Seq>,
    ) -> Result<(), Stop> {
        loop {
            let page = store
                .entries(id, self.last, PAGE)
                .await
                .map_err(Stop::Store)?;
            let target = upto.unwrap_or(page.last_seq).min(page.last_seq);
            for e in page.entries.iter().take_while(|e| e.seq <= target) {
                self.send_entry(e).await?;
            }
            if self.last >= target || page.entries.is_empty() {
                return Ok(());
            }
        }
    }
}

/// Resolves once the node's turns have stopped at shutdown.
async fn ended(closed: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here.
    let _ = closed.wait_for(|c| *c).await.map(|_| ());
}

async fn follow(
    store: SharedStore,
    id: SessionId,
    after: Seq,
    active: Option<TurnId>,
    mut live: broadcast::Receiver<BusEvent>,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
    mut closed: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Stop> {
    let mut cur = Cursor {
        tx,
        last: after,
        // The session's turn when it was read, before subscribing: a turn
        // that ended before then ended at or before `after`, and none of
        // its deltas may follow (I8).
        deltas: DeltaFilter::opened(active),
    };
    cur.catch_up(&store, id, None).await?;
    // The bus is a hint across nodes (notifications can be dropped while a
    // listener reconnects): resync from the store now and then, so a stream
    // never waits on an event that will not come.
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            // Live events first: deltas already queued here go out before a
            // resync sends stored entries past them. (A delta that arrives
            // while a resync reads the store can still follow the message it
            // led to; deltas are a preview, the stored message is the
            // record, and none follows its turn's end.)
            biased;
            ev = live.recv() => ev,
            _ = resync.tick() => {
                cur.catch_up(&store, id, None).await?;
                continue;
            }
            _ = tx.closed() => return Err(Stop::Disconnected),
            _ = ended(&mut closed) => {
                // The node's turns are over: send what they stored last.
                return cur.catch_up(&store, id, None).await;
            }
        };
        match event {
            Ok(BusEvent::Entry(e)) => {
                if e.seq > cur.last + 1 {
                    cur.catch_up(&store, id, Some(e.seq - 1)).await?;
                }
                cur.send_entry(&e).await?;
            }
            Ok(BusEvent::Delta {
                turn_id,
                epoch,
                text,
                ..
            }) => {
                if cur.deltas.admit(turn_id, epoch).is_err() {
                    continue;
                }
                let data = serde_json::to_string(&Delta {
                    turn_id,
                    text: &text,
                })
                .map_err(|err| Stop::Store(StoreError::Internal(err.to_string())))?;
                tx.send(Ok(Event::default().event("delta").data(data)))
                    .await
                    .map_err(|_| Stop::Disconnected)?;
            }
            Ok(BusEvent::Committed { seq }) => {
                if seq > cur.last {
                    cur.catch_up(&store, id, Some(seq)).await?;
                }
            }
            Ok(
                BusEvent::Cancel { .. }
                | BusEvent::Steer { .. }
                | BusEvent::Released
                | BusEvent::TextWanted { .. }
                | BusEvent::TextSoFar { .. },
            ) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => cur.catch_up(&store, id, None).await?,
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}
