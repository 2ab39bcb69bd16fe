//! What each route can answer, derived from its handler's signature: every
//! extractor a handler takes, and the type it returns, say which error
//! statuses they can produce ([`Answers`]); a handler can answer the union.
//! The router is built from the same table ([`crate::routes`]) that a test
//! checks against the API document, so a route cannot gain a way to fail
//! that the document leaves out.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use axum::extract::{Query, State};
use axum::response::{Response, Sse};
use axum::Json;

use crate::error::ApiError;
use crate::AppState;

/// The error statuses a handler argument or result can produce, each with
/// the codes of the error bodies it may carry.
pub trait Answers {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>>;
}

/// Builds an [`Answers`] map from `(status, code)` pairs.
pub fn map(pairs: &[(u16, &'static str)]) -> BTreeMap<u16, BTreeSet<&'static str>> {
    let mut out: BTreeMap<u16, BTreeSet<&'static str>> = BTreeMap::new();
    for (status, code) in pairs {
        out.entry(*status).or_default().insert(code);
    }
    out
}

fn merge(
    into: &mut BTreeMap<u16, BTreeSet<&'static str>>,
    from: BTreeMap<u16, BTreeSet<&'static str>>,
) {
    for (status, codes) in from {
        into.entry(status).or_default().extend(codes);
    }
}

/// A handler whose arguments and result all say what they can answer.
pub trait Handler<M> {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>>;
}

macro_rules! handler {
    ($($arg:ident),*) => {
        impl<F, Fut, R, $($arg,)*> Handler<(R, $($arg,)*)> for F
        where
            F: Fn($($arg),*) -> Fut,
            Fut: Future<Output = R>,
            R: Answers,
            $($arg: Answers,)*
        {
            fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
                #[allow(unused_mut)]
                let mut out = R::answers();
                $(merge(&mut out, $arg::answers());)*
                out
            }
        }
    };
}

handler!();
handler!(A);
handler!(A, B);
handler!(A, B, C);
handler!(A, B, C, D);
handler!(A, B, C, D, E);
handler!(A, B, C, D, E, G);

/// What the handler `h` can answer.
pub fn of<M, H: Handler<M>>(_h: &H) -> BTreeMap<u16, BTreeSet<&'static str>> {
    H::answers()
}

/// Reaching the store: it may be unavailable (`503`) or fail (`500`).
impl<T> Answers for Result<T, ApiError> {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        map(&[(500, "internal"), (503, "unavailable")])
    }
}

/// The state itself answers nothing.
impl Answers for State<AppState> {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        BTreeMap::new()
    }
}

/// Query parameters are validated by the handler: a bad one is a `400`.
impl<T> Answers for Query<T> {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        map(&[(400, "invalid_request")])
    }
}

impl<T> Answers for Json<T> {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        BTreeMap::new()
    }
}

impl Answers for Response {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        BTreeMap::new()
    }
}

impl<S> Answers for Sse<S> {
    fn answers() -> BTreeMap<u16, BTreeSet<&'static str>> {
        BTreeMap::new()
    }
}
