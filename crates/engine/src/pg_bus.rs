//! The cross-node bus: PostgreSQL `LISTEN/NOTIFY`.
//!
//! Every node forwards what it publishes (committed entries, deltas, cancel
//! announcements) as a notification on one channel, from one connection and
//! one task, so a node's events reach the others in the order it published
//! them. Every node listens and delivers other nodes' events to its local
//! subscribers. Notifications are best effort — a payload is at most 8000
//! bytes and nothing is kept while a listener reconnects — which is why the
//! stream reader treats the bus as a hint: a large entry travels as
//! `Committed { seq }` and the reader fetches it, and readers also resync
//! from the store periodically.

use std::sync::Arc;
use std::time::Duration;

use baton_core::SessionId;
use baton_store::PgTimeouts;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnection, PgListener};
use sqlx::Connection;
use tokio::sync::mpsc;

use crate::bus::{Bus, BusEvent, Relay};

/// The notification channel.
const CHANNEL: &str = "baton_bus";

/// PostgreSQL's payload limit is 8000 bytes; keep a margin for the envelope.
const MAX_PAYLOAD: usize = 7000;

#[derive(Serialize, Deserialize)]
struct Wire {
    node: String,
    session: SessionId,
    event: BusEvent,
}

struct PgRelay {
    node: String,
    tx: mpsc::Sender<String>,
}

impl PgRelay {
    fn send(&self, session: SessionId, event: BusEvent) {
        let wire = Wire {
            node: self.node.clone(),
            session,
            event,
        };
        match serde_json::to_string(&wire) {
            Ok(payload) => {
                // A full queue means the database is slow or away: drop, the
                // readers resync from the store.
                if self.tx.try_send(payload).is_err() {
                    tracing::debug!("cross-node bus queue full; event dropped");
                }
            }
            Err(e) => tracing::warn!(error = %e, "encoding a bus event"),
        }
    }
}

impl Relay for PgRelay {
    fn forward(&self, session: SessionId, event: &BusEvent) {
        match event {
            BusEvent::Entry(e) => {
                let fits = serde_json::to_string(e)
                    .map(|s| s.len() < MAX_PAYLOAD)
                    .unwrap_or(false);
                if fits {
                    self.send(session, event.clone());
                } else {
                    self.send(session, BusEvent::Committed { seq: e.seq });
                }
            }
            BusEvent::Delta {
                turn_id,
                epoch,
                text,
                run,
                offset,
            } if text.len() >= MAX_PAYLOAD => {
                for (at, piece) in pieces(text) {
                    self.send(
                        session,
                        BusEvent::Delta {
                            turn_id: *turn_id,
                            epoch: *epoch,
                            text: piece.to_owned(),
                            run: *run,
                            offset: offset + at as u64,
                        },
                    );
                }
            }
            BusEvent::TextSoFar {
                turn_id,
                epoch,
                run,
                offset,
                text,
            } if text.len() >= MAX_PAYLOAD => {
                for (at, piece) in pieces(text) {
                    self.send(
                        session,
                        BusEvent::TextSoFar {
                            turn_id: *turn_id,
                            epoch: *epoch,
                            run: *run,
                            offset: offset + at as u64,
                            text: piece.to_owned(),
                        },
                    );
                }
            }
            BusEvent::Cancel { turn_id, reason } if reason.len() >= MAX_PAYLOAD => {
                let reason: String = reason.chars().take(200).collect();
                self.send(
                    session,
                    BusEvent::Cancel {
                        turn_id: *turn_id,
                        reason,
                    },
                );
            }
            _ => self.send(session, event.clone()),
        }
    }
}

/// `text` cut at char boundaries into pieces that fit a notification, each
/// with its byte offset in `text`; the pieces concatenate to the whole.
fn pieces(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let mut cut = (at + MAX_PAYLOAD / 2).min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push((at, &text[at..cut]));
        at = cut;
    }
    out
}

/// The connection notifications are sent on, with the same bounded waits
/// as the store's (`waits`, below the lease): a database that stops
/// answering fails a `pg_notify` instead of holding the sender forever.
pub async fn notifier(url: &str, waits: PgTimeouts) -> Result<PgConnection, sqlx::Error> {
    let mut conn = PgConnection::connect(url).await?;
    for set in waits.statements() {
        sqlx::query(&set).execute(&mut conn).await?;
    }
    Ok(conn)
}

/// A bus whose events also reach, and come from, every other node on the
/// database at `url`. `node` names this node (its own events are not
/// delivered twice); `waits` bound every statement of the sender.
pub async fn connect(url: &str, node: &str, waits: PgTimeouts) -> Result<Bus, sqlx::Error> {
    let (tx, rx) = mpsc::channel(8192);
    let bus = Bus::with_relay(Arc::new(PgRelay {
        node: node.to_owned(),
        tx,
    }));
    let mut listener = PgListener::connect(url).await?;
    listener.listen(CHANNEL).await?;
    let conn = notifier(url, waits).await?;
    tokio::spawn(send_loop(url.to_owned(), waits, conn, rx));
    tokio::spawn(listen_loop(listener, bus.clone(), node.to_owned()));
    Ok(bus)
}

async fn send_loop(
    url: String,
    waits: PgTimeouts,
    mut conn: PgConnection,
    mut rx: mpsc::Receiver<String>,
) {
    while let Some(payload) = rx.recv().await {
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(&payload)
            .execute(&mut conn)
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cross-node bus: notify failed; reconnecting");
            let mut wait = Duration::from_millis(100);
            conn = loop {
                tokio::time::sleep(wait).await;
                match notifier(&url, waits).await {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(error = %e, "cross-node bus: reconnect failed");
                        wait = (wait * 2).min(Duration::from_secs(5));
                        // Events queued meanwhile are stale; readers resync.
                        while rx.try_recv().is_ok() {}
                    }
                }
            };
        }
    }
}

async fn listen_loop(mut listener: PgListener, bus: Bus, node: String) {
    loop {
        match listener.try_recv().await {
            Ok(Some(n)) => match serde_json::from_str::<Wire>(n.payload()) {
                Ok(w) if w.node != node => bus.deliver(w.session, w.event),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cross-node bus: undecodable notification"),
            },
            // The connection dropped; `try_recv` reconnects on the next call.
            // Notifications sent meanwhile are lost: readers resync.
            Ok(None) => tracing::warn!("cross-node bus: listener reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, "cross-node bus: listener error");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
