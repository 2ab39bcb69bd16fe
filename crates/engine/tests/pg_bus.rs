//! The cross-node bus over a real PostgreSQL (needs `DATABASE_URL`; says so
//! on stderr and returns when it is unset, unless `BATON_REQUIRE_POSTGRES=1`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use baton_core::{SessionId, TurnId};
use baton_engine::{pg_bus, BusEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_on_one_node_reach_another_in_order() {
    let Some(url) = baton_testkit::pg::database_url("the cross-node bus") else {
        return;
    };
    let waits = baton_store::pg_timeouts(Duration::from_secs(10));
    let a = pg_bus::connect(&url, "node-a", waits).await.unwrap();
    let b = pg_bus::connect(&url, "node-b", waits).await.unwrap();
    let session = SessionId::new();
    let mut on_b = b.subscribe(session);
    let mut on_a = a.subscribe(session);
    let turn_id = TurnId::new();
    let big = "x".repeat(20_000);
    let mut sent = 0u64;
    for text in ["one", "two", big.as_str(), "three"] {
        a.publish(
            session,
            BusEvent::Delta {
                turn_id,
                epoch: 1,
                text: text.to_owned(),
                run: 1,
                offset: sent,
            },
        );
        sent += text.len() as u64;
    }
    let mut got = String::new();
    while got.len() < 3 + 3 + 20_000 + 5 {
        let ev = tokio::time::timeout(Duration::from_secs(10), on_b.recv())
            .await
            .expect("B heard nothing")
            .unwrap();
        let BusEvent::Delta {
            text, run, offset, ..
        } = ev
        else {
            panic!("unexpected {ev:?}")
        };
        // A split delta's pieces say where each starts in the run.
        assert_eq!((run, offset), (1, got.len() as u64));
        got.push_str(&text);
    }
    assert_eq!(got, format!("onetwo{big}three"));
    // The run so far, sent to a resuming reader, is split the same way.
    a.publish(
        session,
        BusEvent::TextSoFar {
            turn_id,
            epoch: 1,
            run: 1,
            offset: 0,
            text: got.clone(),
        },
    );
    let mut so_far = String::new();
    while so_far.len() < got.len() {
        let ev = tokio::time::timeout(Duration::from_secs(10), on_b.recv())
            .await
            .expect("B heard nothing")
            .unwrap();
        let BusEvent::TextSoFar { text, offset, .. } = ev else {
            panic!("unexpected {ev:?}")
        };
        assert_eq!(offset, so_far.len() as u64);
        so_far.push_str(&text);
    }
    assert_eq!(so_far, got);
    // A delivered its own events locally, once each, not again via PostgreSQL.
    let mut local = 0;
    while let Ok(ev) = on_a.try_recv() {
        assert!(matches!(
            ev,
            BusEvent::Delta { .. } | BusEvent::TextSoFar { .. }
        ));
        local += 1;
    }
    assert_eq!(local, 5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        on_a.try_recv().is_err(),
        "A's own notifications must not come back"
    );
}

/// The connection that sends notifications waits no longer than the
/// store's connections do: below the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifier_waits_below_the_lease() {
    let Some(url) = baton_testkit::pg::database_url("the bus's notifier") else {
        return;
    };
    let lease = Duration::from_secs(9);
    let waits = baton_store::pg_timeouts(lease);
    let mut conn = pg_bus::notifier(&url, waits).await.unwrap();
    for (setting, want) in [
        ("statement_timeout", waits.statement),
        ("lock_timeout", waits.statement),
        (
            "idle_in_transaction_session_timeout",
            waits.idle_in_transaction,
        ),
    ] {
        let ms: String = sqlx::query_scalar(&format!(
            "SELECT setting FROM pg_settings WHERE name = '{setting}'"
        ))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(ms, want.as_millis().to_string(), "{setting}");
        assert!(want < lease, "{setting} ends before the lease");
    }
}
