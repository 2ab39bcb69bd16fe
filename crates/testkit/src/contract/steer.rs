//! Contracts of steering and debounce: a `steer` message joins the running
//! turn only when that turn will see it; what the turn takes becomes its
//! input, and what it did not take when it ends is the next turn's, decided
//! under the session's lock (I6); a debounce window is stored, moves with
//! each message, and its turn is started exactly once, by any node.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{
    DispositionType, EntryType, InputRange, NewEntry, Policy, Seq, ToolInfo, TurnId, TurnStatus,
};

use super::{shared, unique, Fixture};
use baton_store::{Begin, Lease, PostMessage, SharedStore, StoreConfig, StoreError, Take};

impl Fixture {
    /// A `steer` message from a node whose agents take mid-turn input (or,
    /// with `takes` false, do not).
    fn steer(&self, id: baton_core::SessionId, content: &str, takes: bool) -> PostMessage {
        PostMessage {
            mid_turn_agents: if takes {
                vec![self.agent.clone()]
            } else {
                Vec::new()
            },
            ..self.msg_with(id, content, Policy::Steer)
        }
    }

    /// Takes the session's starting turn under `lease`; it must run.
    async fn run(&self, lease: &Lease, turn: TurnId) {
        match self.store.take_turn(lease).await.expect("take_turn") {
            Take::Run(todo, Begin::Run) => assert_eq!(todo.turn.id, turn),
            other => panic!("turn {turn} runs, got {other:?}"),
        }
    }
}

/// `steer` joins the running turn when its agent takes mid-turn input and
/// no cancel is under way, else it is `queued`. The steered batch gathers
/// every message waiting before it; taking it moves the turn's input and the
/// queue; the renewal says steered input waits. Taking what no steer covers
/// is refused; a turn that ended takes nothing, and its end gave the steered
/// input to the next turn.
pub async fn steered_input_joins_the_running_turn_or_the_next<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, super::base_config()).await;
    let id = f.session(Policy::Queue).await;
    let idle = f.post(f.steer(id, "hello", true)).await;
    assert_eq!(
        idle.disposition.kind,
        DispositionType::Started,
        "steer on an idle session starts a turn"
    );
    let t1 = idle.disposition.turn_id.expect("a started turn");
    let lease = idle.lease.clone().expect("the lease");
    f.run(&lease, t1).await;

    let deaf = f.post(f.steer(id, "deaf", false)).await; // 3
    assert_eq!(
        deaf.disposition.kind,
        DispositionType::Queued,
        "an agent that does not take mid-turn input: steer queues"
    );
    assert_eq!(deaf.disposition.position, Some(1));
    assert!(deaf.steer.is_none());
    let q = f.post(f.msg(id, "queued")).await; // 4
    let s = f.post(f.steer(id, "steered", true)).await; // 5
    assert_eq!(s.disposition.kind, DispositionType::Steered);
    assert_eq!(s.disposition.turn_id, Some(t1));
    assert_eq!(s.steer, Some(t1), "the engine is told to wake the turn");
    assert_eq!(f.view(id).await.queued, 3);

    let renewal = f.store.renew_lease(&lease).await.expect("renew");
    assert_eq!(renewal.steer, Some((t1, s.entry.seq)));
    let batch = f
        .store
        .steered_input(&lease, t1, 1)
        .await
        .expect("steered_input")
        .expect("steered input waits");
    assert_eq!(batch.upto, s.entry.seq);
    let seqs: Vec<Seq> = batch.messages.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        vec![deaf.entry.seq, q.entry.seq, s.entry.seq],
        "the batch gathers every message waiting before the steered one"
    );
    assert!(f
        .store
        .steered_input(&lease, t1, s.entry.seq)
        .await
        .expect("steered_input")
        .is_none());
    expect_err!(
        f.store.take_input(&lease, t1, s.entry.seq + 1).await,
        StoreError::Internal(_),
        "taking past the last steered message"
    );
    let stranger = Lease {
        owner: unique("stranger"),
        ..lease.clone()
    };
    expect_err!(
        f.store.take_input(&stranger, t1, s.entry.seq).await,
        StoreError::StaleEpoch { .. },
        "take_input without the lease"
    );
    f.store
        .take_input(&lease, t1, s.entry.seq)
        .await
        .expect("take_input");
    f.store
        .take_input(&lease, t1, s.entry.seq)
        .await
        .expect("taking again is a no-op");
    let turns = f.turns(id).await;
    assert_eq!(
        turns[0].input,
        InputRange {
            from: 1,
            to: s.entry.seq
        },
        "the turn's record lists the steered input it took"
    );
    let view = f.view(id).await;
    assert_eq!(view.queued, 0, "the taken messages wait no more");
    assert_eq!(
        f.store.renew_lease(&lease).await.expect("renew").steer,
        None
    );
    f.log(id).await;

    // A cancel under way: the turn will not see more input.
    f.store
        .request_cancel(&f.owner, id, "user", Some(t1))
        .await
        .expect("request_cancel");
    let late = f.post(f.steer(id, "too late", true)).await;
    assert_eq!(late.disposition.kind, DispositionType::Queued);
    f.end(&lease, t1, TurnStatus::Cancelled, Some("user")).await;

    // The next turn runs the queued one; a steer it does not take before
    // its end runs in the turn after it.
    let t2 = f.view(id).await.turn_id.expect("the next turn");
    f.run(&lease, t2).await;
    let missed = f.post(f.steer(id, "missed", true)).await;
    assert_eq!(missed.disposition.turn_id, Some(t2));
    let ended = f.end(&lease, t2, TurnStatus::Completed, None).await;
    let t3 = ended.next.expect("the end hands the steered input on");
    expect_err!(
        f.store.take_input(&lease, t2, missed.entry.seq).await,
        StoreError::TurnNotActive { .. },
        "a turn that ended takes nothing"
    );
    let turns = f.turns(id).await;
    let third = turns.iter().find(|t| t.id == t3).expect("turn 3");
    assert_eq!(
        third.input,
        InputRange {
            from: missed.entry.seq,
            to: missed.entry.seq
        }
    );
    f.run(&lease, t3).await;
    f.end(&lease, t3, TurnStatus::Completed, None).await;
    f.log(id).await;
    f.cleanup().await;
}

/// The boundary under real concurrency: three nodes post `steer` messages
/// while the worker, for each turn, takes steered input in one task and ends
/// the turn in another, at random moments, so takes and ends race on the
/// session's lock. Every take either lands (the input is that turn's) or
/// finds the turn ended; in the end every message was consumed by exactly
/// one turn, FIFO, and every landed take is in its turn's record.
pub async fn steers_race_the_end_of_turns<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Arc::new(Fixture::open(open, super::base_config()).await);
    let id = f.session(Policy::Queue).await;
    let (_, mut turn, lease) = f.start(id, "first").await;
    let posters = (0..3).map(|n| {
        let p = f.on_node(&format!("poster-{n}"));
        tokio::spawn(async move {
            for i in 0..25 {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..4))).await;
                let posted = p
                    .store
                    .post_message(p.steer(id, &format!("n{n} m{i}"), true))
                    .await
                    .unwrap_or_else(|e| panic!("post: {e:?}"));
                assert!(matches!(
                    posted.disposition.kind,
                    DispositionType::Steered | DispositionType::Started | DispositionType::Queued
                ));
            }
        })
    });
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let posters = {
        let done = done.clone();
        async move {
            let r = futures_util::future::join_all(posters).await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        }
    };
    let worker = {
        let f = f.clone();
        async move {
            let mut landed: Vec<(TurnId, Seq)> = Vec::new();
            f.run(&lease, turn).await;
            loop {
                let taker = async {
                    let mut mine = Vec::new();
                    let mut after = 0;
                    for _ in 0..fastrand::usize(0..4) {
                        tokio::task::yield_now().await;
                        let batch = match f.store.steered_input(&lease, turn, after).await {
                            Ok(Some(b)) => b,
                            Ok(None) => continue,
                            Err(StoreError::TurnNotActive { .. }) => break,
                            Err(e) => panic!("steered_input: {e:?}"),
                        };
                        after = batch.upto;
                        match f.store.take_input(&lease, turn, batch.upto).await {
                            Ok(()) => mine.push((turn, batch.upto)),
                            Err(StoreError::TurnNotActive { .. }) => break,
                            Err(e) => panic!("take_input: {e:?}"),
                        }
                    }
                    mine
                };
                let ender = async {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..3))).await;
                    f.end(&lease, turn, TurnStatus::Completed, None).await
                };
                let (mine, ended) = tokio::join!(taker, ender);
                landed.extend(mine);
                turn = match ended.next {
                    Some(next) => {
                        f.run(&lease, next).await;
                        next
                    }
                    // Idle: while posts may still come, keep the lease and
                    // wait for one to start a turn; after, let it go.
                    None => loop {
                        if let Some(t) = f.view(id).await.turn_id {
                            assert_eq!(
                                f.store.begin_turn(&lease, t).await.expect("begin_turn"),
                                Begin::Run
                            );
                            break t;
                        }
                        if done.load(std::sync::atomic::Ordering::SeqCst) {
                            match f.store.take_turn(&lease).await.expect("take_turn") {
                                Take::Released => return landed,
                                Take::Run(todo, Begin::Run) => break todo.turn.id,
                                other => panic!("take_turn when idle: {other:?}"),
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    },
                };
            }
        }
    };
    let (posted, landed) = tokio::join!(posters, worker);
    for p in posted {
        p.expect("a poster task");
    }
    let log = f.log(id).await;
    let users = log
        .iter()
        .filter(|e| e.role == Some(baton_core::Role::User))
        .count();
    assert_eq!(users, 76, "every post was stored");
    let turns = f.turns(id).await;
    for (t, upto) in &landed {
        let rec = turns.iter().find(|x| x.id == *t).expect("the turn");
        assert!(
            rec.input.to >= *upto,
            "turn {t} took input up to {upto}, its record says {:?}",
            rec.input
        );
    }
    assert_eq!(f.view(id).await.queued, 0, "nothing is left waiting");
    f.cleanup().await;
}

/// A debounce window: each message to an idle session that debounces is
/// `pending`, and moves the start; nothing starts before it is due (a post
/// or a look for due windows that comes early starts nothing), never past 10
/// windows after the first message; once due, two nodes looking at once
/// start the one turn exactly once, with every message waiting. A create
/// with a first message opens a window too; a post that finds a window due
/// starts its turn first, then is decided against it.
pub async fn debounce_windows_hold_a_burst<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, super::base_config()).await;
    let window = Duration::from_millis(300);
    let created = f
        .store
        .create_session(baton_store::CreateSession {
            debounce_ms: window.as_millis() as u64,
            message: Some("one".into()),
            ..f.create_req(Policy::Queue)
        })
        .await
        .expect("create with a message");
    assert!(created.lease.is_none(), "no turn starts, so no lease");
    assert_eq!(created.committed.len(), 1, "only the message is stored");
    assert_eq!(created.session.debounce_ms, 300);
    let first_until = created.session.pending_until.expect("a window opened");
    let id = created.session.id;

    let two = f.post(f.msg_with(id, "two", Policy::Reject)).await;
    assert_eq!(
        two.disposition.kind,
        DispositionType::Pending,
        "no turn runs, so nothing is busy: even `reject` waits"
    );
    let until = two.pending_until.expect("pending until");
    assert_eq!(two.disposition.until.map(|t| t.micros()), Some(until));
    assert!(
        until > first_until.micros(),
        "a new message moves the start"
    );
    assert!(two.lease.is_none());
    let cap = created.session.created_at.micros() + 10 * window.as_micros() as i64;
    assert!(until <= cap, "never past 10 windows after the first");

    let other = f.on_node("other");
    let early = f.store.start_due(&f.node).await.expect("start_due");
    assert!(
        early
            .started
            .iter()
            .all(|s| s.committed[0].session_id != id),
        "nothing starts before the window closes"
    );
    assert!(early.next.is_some_and(|n| n <= until));
    let view = f.view(id).await;
    assert_eq!(view.status, baton_core::SessionStatus::Idle);
    assert_eq!(view.queued, 2);
    assert_eq!(view.pending_until.map(|t| t.micros()), Some(until));

    let now = f.store.start_due(&f.node).await.expect("start_due").now;
    tokio::time::sleep(Duration::from_micros((until - now).max(0) as u64 + 20_000)).await;
    let (a, b) = tokio::join!(
        f.store.start_due(&f.node),
        other.store.start_due(&other.node)
    );
    let started: Vec<_> = [a.expect("start_due"), b.expect("start_due")]
        .into_iter()
        .flat_map(|d| d.started)
        .filter(|s| s.committed[0].session_id == id)
        .collect();
    assert_eq!(started.len(), 1, "the turn starts once: {started:?}");
    let lease = started[0].lease.clone().expect("the starting node's lease");
    let turn = started[0].committed[0].turn_id.expect("turn_started");
    assert_eq!(
        started[0].committed[0].input,
        Some(InputRange { from: 1, to: 2 }),
        "one turn with every message waiting"
    );
    let view = f.view(id).await;
    assert_eq!(view.pending_until, None, "the window closed");
    assert_eq!(view.turn_id, Some(turn));

    // While the turn runs, messages queue as usual: no window.
    let q = f.post(f.msg(id, "three")).await;
    assert_eq!(q.disposition.kind, DispositionType::Queued);
    f.run(&lease, turn).await;
    let ended = f.end(&lease, turn, TurnStatus::Completed, None).await;
    let t2 = ended
        .next
        .expect("a queued message runs at once after a turn");
    f.run(&lease, t2).await;
    f.end(&lease, t2, TurnStatus::Completed, None).await;
    assert!(matches!(
        f.store.take_turn(&lease).await,
        Ok(Take::Released)
    ));

    // A window that is due when the next message comes: that message starts
    // the window's turn first, then queues behind it.
    let p = f.post(f.msg(id, "four")).await;
    assert_eq!(p.disposition.kind, DispositionType::Pending);
    let due = p.pending_until.expect("until");
    let now = f
        .store
        .start_due(&unique("idle"))
        .await
        .expect("start_due")
        .now;
    tokio::time::sleep(Duration::from_micros((due - now).max(0) as u64 + 20_000)).await;
    let late = f.post(f.msg(id, "five")).await;
    assert_eq!(late.disposition.kind, DispositionType::Queued);
    assert!(
        late.lease.is_some(),
        "the post started the turn and took the lease"
    );
    let turns = f.turns(id).await;
    let last = turns.last().expect("the window's turn");
    assert_eq!(last.input.from, p.entry.seq);
    assert_eq!(last.input.to, p.entry.seq);
    f.log(id).await;
    f.cleanup().await;
}

/// A turn that took steered input and then vanished: its output from before
/// the steered message lies before its last input, and the takeover still
/// closes the tool call it left open there, with the turn's status, in the
/// transaction that ends it `lost`.
pub async fn recovery_closes_calls_made_before_steered_input<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = super::exclusive().await;
    let f = Fixture::open(open, super::base_config()).await;
    let id = f.session(Policy::Queue).await;
    let idle = f.post(f.steer(id, "first", true)).await;
    let t = idle.disposition.turn_id.expect("a started turn");
    let lease = idle.lease.clone().expect("the lease");
    f.run(&lease, t).await;
    f.store
        .append_output(
            &lease,
            t,
            vec![NewEntry::tool_call(
                t,
                ToolInfo {
                    id: "open".to_owned(),
                    name: Some("grep".to_owned()),
                    arguments: None,
                },
            )],
        )
        .await
        .expect("append_output");
    let s = f.post(f.steer(id, "steered", true)).await;
    assert_eq!(s.disposition.kind, DispositionType::Steered);
    f.store
        .take_input(&lease, t, s.entry.seq)
        .await
        .expect("take_input");

    let all = f
        .store
        .recover(&super::unique("node-restarted"), true)
        .await
        .expect("recover");
    let rec = super::recovered(&all, id).expect("the foreign lease is taken over");
    let kinds: Vec<_> = rec
        .committed
        .iter()
        .map(|e| (e.kind, e.tool.as_ref().map(|t| t.id.clone()), e.status))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (
                EntryType::ToolResult,
                Some("open".to_owned()),
                Some(TurnStatus::Lost)
            ),
            (EntryType::TurnEnded, None, Some(TurnStatus::Lost)),
        ],
        "the call made before the steered input is closed, then the turn ends"
    );
    f.log(id).await;
    f.cleanup().await;
}
