//! The store against rows it did not write, on both backends: a row planted
//! behind its back (as a bug or an operator's hand would) makes a schema
//! backstop fire, which is an invariant breach — refused at once, counted,
//! never retried as if it were contention; and turns are listed in the
//! order of their input whatever their timestamps say.

use std::sync::Arc;

use baton_core::{NewEntry, Policy, SessionId, TurnStatus};
use baton_store::{CreateSession, PostMessage, SharedStore, SqlStore, Store, StoreError};
use baton_testkit::contract::base_config;
use sqlx::{AnyConnection, Connection};

/// A store and a connection of its own to the same database.
struct Backend {
    store: SharedStore,
    raw: AnyConnection,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<baton_testkit::pg::PgSchema>,
}

impl Backend {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("baton.db");
        let store = SqlStore::open_sqlite(&path, base_config())
            .await
            .expect("open the embedded store");
        sqlx::any::install_default_drivers();
        let mut raw = AnyConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("a second connection to the file");
        sqlx::raw_sql("PRAGMA busy_timeout = 10000")
            .execute(&mut raw)
            .await
            .expect("busy timeout");
        Self {
            store: Arc::new(store),
            raw,
            _dir: Some(dir),
            _schema: None,
        }
    }

    async fn postgres(what: &str) -> Option<Self> {
        let url = baton_testkit::pg::database_url(what)?;
        let schema = baton_testkit::pg::PgSchema::create(&url).await;
        let store = SqlStore::open_postgres(schema.url(), base_config())
            .await
            .expect("connect to PostgreSQL");
        sqlx::any::install_default_drivers();
        let raw = AnyConnection::connect(schema.url())
            .await
            .expect("a second connection to PostgreSQL");
        Some(Self {
            store: Arc::new(store),
            raw,
            _dir: None,
            _schema: Some(schema),
        })
    }

    async fn exec(&mut self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&mut self.raw)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

const OWNER: &str = "backstop-owner";

/// A `queue` session whose first message started a turn (seq 1 and 2).
async fn busy_session(store: &dyn Store) -> (SessionId, baton_store::Lease) {
    let created = store
        .create_session(CreateSession {
            owner: OWNER.to_owned(),
            agent: "demo".to_owned(),
            policy: Policy::Queue,
            metadata: serde_json::json!({}),
            idempotency_key: None,
            fingerprint: "{}".to_owned(),
            message: Some("first".to_owned()),
            permission: None,
            node: "node-1".to_owned(),
            debounce_ms: 0,
        })
        .await
        .expect("create with a message");
    let lease = created.lease.expect("the first turn's lease");
    (created.session.id, lease)
}

fn post(id: SessionId, content: &str) -> PostMessage {
    PostMessage {
        owner: OWNER.to_owned(),
        session_id: id,
        content: content.to_owned(),
        policy: None,
        idempotency_key: Some(format!("key-{content}")),
        node: "node-1".to_owned(),
        mid_turn_agents: Vec::new(),
    }
}

/// An entry at the seq the session's counter gives next, planted behind the
/// store's back: the next post trips the `(session_id, seq)` key. That is
/// answered at once as a breach of that constraint, counted once (one try,
/// no retry loop), and nothing of the post is stored.
async fn a_backstop_is_a_breach_not_contention(mut b: Backend) {
    let (id, _lease) = busy_session(&*b.store).await;
    let before = b.store.session(OWNER, id).await.expect("session");
    assert_eq!(before.last_seq, 2);
    b.exec(&format!(
        "INSERT INTO entries (session_id, seq, kind, role, content, created_at) \
         VALUES ('{id}', 3, 'message', 'assistant', 'planted', 0)"
    ))
    .await;
    match b.store.post_message(post(id, "second")).await {
        Err(StoreError::InvariantBreach { constraint, detail }) => {
            assert_eq!(constraint, "entries_pkey", "{detail}");
        }
        other => panic!("a planted seq must be a breach of entries_pkey: {other:?}"),
    }
    assert_eq!(
        b.store.invariant_breaches(),
        vec![("entries_pkey".to_owned(), 1)],
        "counted once: the breach is not tried again"
    );
    let after = b.store.session(OWNER, id).await.expect("session");
    assert_eq!(after.last_seq, 2, "nothing of the refused post is stored");
    assert_eq!(after.queued, 0);
    let page = b.store.entries(id, 0, 100).await.expect("entries");
    assert!(page
        .entries
        .iter()
        .all(|e| e.content.as_deref() != Some("second")));

    // Once the planted row is gone, the same post goes through.
    b.exec(&format!(
        "DELETE FROM entries WHERE session_id = '{id}' AND seq = 3"
    ))
    .await;
    let posted = b
        .store
        .post_message(post(id, "second"))
        .await
        .expect("the post once the row is gone");
    assert_eq!(posted.entry.seq, 3);
    assert_eq!(b.store.invariant_breaches().len(), 1);
}

/// `turns` lists turns by the seq of their first input: a turn stamped
/// later than the next one (a clock that stepped back between two nodes)
/// still comes first.
async fn turns_are_listed_in_input_order(mut b: Backend) {
    let (id, lease) = busy_session(&*b.store).await;
    b.store
        .post_message(post(id, "second"))
        .await
        .expect("a queued post");
    let first = b.store.turns(id).await.expect("turns")[0].clone();
    let end = NewEntry::turn_ended(first.id, TurnStatus::Completed, None);
    b.store
        .end_turn(&lease, first.id, TurnStatus::Completed, None, vec![end])
        .await
        .expect("end the first turn; the second starts");
    b.exec(&format!(
        "UPDATE turns SET started_at = started_at + 3600000000 WHERE id = '{}'",
        first.id
    ))
    .await;
    let turns = b.store.turns(id).await.expect("turns");
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[0].id, first.id, "input order, not wall-clock order");
    assert!(turns[0].started_at > turns[1].started_at);
    assert!(turns[0].input.from < turns[1].input.from);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_backstop_is_a_breach_not_contention() {
    a_backstop_is_a_breach_not_contention(Backend::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_backstop_is_a_breach_not_contention() {
    if let Some(b) = Backend::postgres("a_backstop_is_a_breach_not_contention").await {
        a_backstop_is_a_breach_not_contention(b).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_turns_are_listed_in_input_order() {
    turns_are_listed_in_input_order(Backend::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_turns_are_listed_in_input_order() {
    if let Some(b) = Backend::postgres("turns_are_listed_in_input_order").await {
        turns_are_listed_in_input_order(b).await;
    }
}
