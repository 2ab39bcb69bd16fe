//! [`Conn`]: the one connection type the store's statements run on, so every
//! transaction is written once for both databases.
//!
//! PostgreSQL (and the embedded store's readers) go through sqlx. The
//! embedded store's single writer is a synchronous `rusqlite` connection on
//! its own thread: a write is a handful of cached statements run in-process
//! with no hop to another thread per statement, which is what lets group
//! commit pay off on a disk where an fsync is cheap. Its futures never wait,
//! so the writer thread polls each job once.
//!
//! Statements use `$N` placeholders (PostgreSQL's; SQLite reads `$N` as a
//! named parameter, bound here by its number). Values are typed even when
//! null, because PostgreSQL types its parameters.

use std::sync::Arc;

use sqlx::any::{AnyRow, AnyTypeInfoKind};
use sqlx::{Row as _, ValueRef as _};

use baton_core::SessionId;

use crate::sql::SessionRow;
use crate::StoreError;

/// A bound parameter.
#[derive(Clone, Debug)]
pub(crate) enum Val {
    Int(Option<i64>),
    Text(Option<String>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Self::Int(Some(v))
    }
}

impl From<Option<i64>> for Val {
    fn from(v: Option<i64>) -> Self {
        Self::Int(v)
    }
}

impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Self::Text(Some(v.to_owned()))
    }
}

impl From<String> for Val {
    fn from(v: String) -> Self {
        Self::Text(Some(v))
    }
}

impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Self::Text(Some(v.clone()))
    }
}

impl From<Option<String>> for Val {
    fn from(v: Option<String>) -> Self {
        Self::Text(v)
    }
}

impl From<Option<&str>> for Val {
    fn from(v: Option<&str>) -> Self {
        Self::Text(v.map(str::to_owned))
    }
}

/// Parameters: `args![a, b, …]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => { [$($crate::db::Val::from($v)),*] };
}
pub(crate) use args;

/// A value read back.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Text(String),
    /// A type the store never stores (a float, a blob).
    Other(&'static str),
}

/// A result row, its columns found by name.
#[derive(Debug)]
pub(crate) struct Row {
    names: Arc<[String]>,
    cells: Vec<Cell>,
}

/// A failure inside an operation: a store outcome, or a database error that
/// the executor classifies (retry, unavailable, internal).
pub(crate) enum Fail {
    Store(StoreError),
    Db(sqlx::Error),
    Lite(rusqlite::Error),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<sqlx::Error> for Fail {
    fn from(e: sqlx::Error) -> Self {
        Self::Db(e)
    }
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Self::Lite(e)
    }
}

pub(crate) type R<T> = std::result::Result<T, Fail>;

fn decode_error(what: String) -> Fail {
    Fail::Store(StoreError::Internal(what))
}

/// A Rust type a column decodes into.
pub(crate) trait FromCell: Sized {
    fn from_cell(cell: &Cell, column: &str) -> R<Self>;
}

impl FromCell for Option<i64> {
    fn from_cell(cell: &Cell, column: &str) -> R<Self> {
        match cell {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(*v)),
            other => Err(decode_error(format!(
                "column {column}: expected an integer, found {other:?}"
            ))),
        }
    }
}

impl FromCell for Option<String> {
    fn from_cell(cell: &Cell, column: &str) -> R<Self> {
        match cell {
            Cell::Null => Ok(None),
            Cell::Text(v) => Ok(Some(v.clone())),
            other => Err(decode_error(format!(
                "column {column}: expected text, found {other:?}"
            ))),
        }
    }
}

impl FromCell for i64 {
    fn from_cell(cell: &Cell, column: &str) -> R<Self> {
        Option::<i64>::from_cell(cell, column)?
            .ok_or_else(|| decode_error(format!("column {column}: unexpected NULL")))
    }
}

impl FromCell for String {
    fn from_cell(cell: &Cell, column: &str) -> R<Self> {
        Option::<String>::from_cell(cell, column)?
            .ok_or_else(|| decode_error(format!("column {column}: unexpected NULL")))
    }
}

impl Row {
    /// The column `name`.
    pub fn get<T: FromCell>(&self, name: &str) -> R<T> {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| decode_error(format!("no column {name} in the result")))?;
        T::from_cell(&self.cells[i], name)
    }

    /// The first column.
    pub fn first<T: FromCell>(&self) -> R<T> {
        let cell = self
            .cells
            .first()
            .ok_or_else(|| decode_error("an empty result row".into()))?;
        T::from_cell(cell, self.names.first().map_or("", String::as_str))
    }

    fn from_sqlx(r: &AnyRow, names: &Arc<[String]>) -> R<Self> {
        let mut cells = Vec::with_capacity(names.len());
        for i in 0..names.len() {
            let raw = r.try_get_raw(i)?;
            let cell = if raw.is_null() {
                Cell::Null
            } else {
                match raw.type_info().kind() {
                    AnyTypeInfoKind::BigInt => Cell::Int(r.try_get::<i64, _>(i)?),
                    AnyTypeInfoKind::Integer => Cell::Int(r.try_get::<i32, _>(i)?.into()),
                    AnyTypeInfoKind::SmallInt => Cell::Int(r.try_get::<i16, _>(i)?.into()),
                    AnyTypeInfoKind::Bool => Cell::Int(r.try_get::<bool, _>(i)?.into()),
                    AnyTypeInfoKind::Text => Cell::Text(r.try_get::<String, _>(i)?),
                    AnyTypeInfoKind::Null => Cell::Null,
                    AnyTypeInfoKind::Real | AnyTypeInfoKind::Double => Cell::Other("a float"),
                    AnyTypeInfoKind::Blob => Cell::Other("a blob"),
                }
            };
            cells.push(cell);
        }
        Ok(Self {
            names: names.clone(),
            cells,
        })
    }
}

/// Where a transaction's statements go.
pub(crate) enum Conn {
    /// A pooled sqlx connection: reads, on either database.
    Pool(sqlx::pool::PoolConnection<sqlx::Any>),
    /// A PostgreSQL write transaction.
    Tx(sqlx::Transaction<'static, sqlx::Any>),
    /// The embedded store's writer (its batch transaction is already open).
    Lite(Lite),
    /// A PostgreSQL lane's batch transaction ([`crate::pg_writer`]).
    Batch(Box<PgBatch>),
}

/// A PostgreSQL lane's batch transaction, and the rows of the sessions it
/// has locked.
///
/// The batch locks its sessions' rows `FOR UPDATE` before any write runs,
/// so until it ends nobody else can change them: a write reads such a row
/// from memory, and saving it only marks it to be written once, by
/// [`crate::sql::write_deferred_sessions`] right before the commit (a hot
/// session's row is written once per batch, not once per post). Rows of
/// sessions it did not lock are never remembered. While a write runs in
/// its savepoint, what it changes here is logged, so that rolling back to
/// the savepoint also rolls back the remembered rows
/// ([`PgBatch::undo_write`]).
pub(crate) struct PgBatch {
    pub tx: sqlx::Transaction<'static, sqlx::Any>,
    locked: std::collections::HashSet<SessionId>,
    sessions: std::collections::HashMap<SessionId, SessionRow>,
    /// Rows saved in memory and not yet written, in id order.
    dirty: std::collections::BTreeSet<SessionId>,
    /// For the write running now: each row it changed, as it was before
    /// (the row if remembered, and whether it was to be written).
    undo: std::collections::HashMap<SessionId, (Option<SessionRow>, bool)>,
    /// Entries' values left to insert with the session rows' statement,
    /// and how many of them there were when the running write began.
    entries: Vec<Val>,
    entries_before: usize,
}

impl PgBatch {
    pub fn new(tx: sqlx::Transaction<'static, sqlx::Any>) -> Self {
        Self {
            tx,
            locked: Default::default(),
            sessions: Default::default(),
            dirty: Default::default(),
            undo: Default::default(),
            entries: Vec::new(),
            entries_before: 0,
        }
    }

    /// Leaves entries' values to insert with the session rows' statement.
    pub fn defer_entries(&mut self, values: Vec<Val>) {
        self.entries.extend(values);
    }

    /// The entries' values left to insert.
    pub fn take_entries(&mut self) -> Vec<Val> {
        self.entries_before = 0;
        std::mem::take(&mut self.entries)
    }

    /// A row this transaction has just locked `FOR UPDATE`.
    pub fn locked(&mut self, row: SessionRow) {
        self.locked.insert(row.id);
        self.sessions.insert(row.id, row);
    }

    /// The rows saved in memory and not yet written.
    pub fn deferred(&self) -> impl Iterator<Item = &SessionRow> {
        self.dirty.iter().filter_map(|id| self.sessions.get(id))
    }

    /// Marks every deferred row as written.
    pub fn written(&mut self) {
        self.dirty.clear();
    }

    /// Starts a write: nothing to undo yet.
    pub fn begin_write(&mut self) {
        self.undo.clear();
        self.entries_before = self.entries.len();
    }

    /// The write was rolled back to its savepoint: so are its rows.
    pub fn undo_write(&mut self) {
        self.entries.truncate(self.entries_before);
        for (id, (row, dirty)) in self.undo.drain() {
            match row {
                Some(r) => self.sessions.insert(id, r),
                None => self.sessions.remove(&id),
            };
            if dirty {
                self.dirty.insert(id);
            } else {
                self.dirty.remove(&id);
            }
        }
    }

    fn keep_undo(&mut self, id: SessionId) {
        if !self.undo.contains_key(&id) {
            let before = (self.sessions.get(&id).cloned(), self.dirty.contains(&id));
            self.undo.insert(id, before);
        }
    }
}

/// Past this many remembered session rows the writer forgets them all.
const REMEMBERED_SESSIONS: usize = 16_384;

/// The embedded store's writer connection, and the session rows it has
/// read or written.
///
/// A session row it remembers is the row on disk as long as every path that
/// changes a row here updates it or forgets it, every rollback forgets them
/// all ([`Lite::forget_sessions`]), and each transaction starts by checking
/// that no other connection committed to the file since the last
/// ([`Lite::begin`]): the store's lock keeps other Baton processes out, but
/// not, say, an operator's `sqlite3` shell. A post then reads its session
/// from memory: reading the row was a third of the writer's time.
pub(crate) struct Lite {
    pub conn: rusqlite::Connection,
    sessions: std::collections::HashMap<SessionId, SessionRow>,
    /// `PRAGMA data_version` when last checked: it changes when another
    /// connection commits.
    data_version: Option<i64>,
}

impl Lite {
    pub fn new(conn: rusqlite::Connection) -> Self {
        Self {
            conn,
            sessions: Default::default(),
            data_version: None,
        }
    }

    /// Opens the batch transaction, forgetting every remembered row if
    /// another connection has committed since the last one. Once `BEGIN
    /// IMMEDIATE` holds the write lock, no one else can commit until this
    /// transaction ends.
    pub fn begin(&mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.raw_execute()?;
        let version = self
            .conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get::<_, i64>(0));
        match version {
            Ok(v) if self.data_version == Some(v) => Ok(()),
            other => {
                self.sessions.clear();
                self.data_version = other.as_ref().ok().copied();
                other.map(|_| ())
            }
        }
    }

    /// Forgets every remembered row: after any rollback.
    pub fn forget_sessions(&mut self) {
        self.sessions.clear();
    }
}

fn sqlx_query<'q>(
    sql: &'q str,
    args: &[Val],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let mut q = sqlx::query(sql);
    for a in args {
        q = match a {
            Val::Int(v) => q.bind(*v),
            Val::Text(v) => q.bind(v.clone()),
        };
    }
    q
}

/// The statement as the writer's SQLite prepares it: `$N` becomes `?N`,
/// which SQLite binds at index N directly (a `$N` is a named parameter,
/// found by name at every bind). The store's statements have no `$` of
/// their own outside placeholders.
fn lite_sql(sql: &str) -> std::borrow::Cow<'_, str> {
    let digit_after = |i: usize| sql.as_bytes().get(i + 1).is_some_and(u8::is_ascii_digit);
    let mut out = String::new();
    let mut copied = 0;
    for (i, _) in sql.match_indices('$').filter(|&(i, _)| digit_after(i)) {
        if out.is_empty() {
            out.reserve(sql.len());
        }
        out.push_str(&sql[copied..i]);
        out.push('?');
        copied = i + 1;
    }
    if copied == 0 {
        return sql.into();
    }
    out.push_str(&sql[copied..]);
    out.into()
}

/// Binds `args` at indexes 1..=N of a statement prepared from [`lite_sql`].
fn lite_bind(st: &mut rusqlite::CachedStatement<'_>, args: &[Val]) -> R<()> {
    let n = st.parameter_count();
    if n > args.len() {
        return Err(decode_error(format!(
            "the statement has {n} parameters, {} given",
            args.len()
        )));
    }
    for (i, a) in args.iter().enumerate().take(n) {
        match a {
            Val::Int(Some(v)) => st.raw_bind_parameter(i + 1, v)?,
            Val::Text(Some(v)) => st.raw_bind_parameter(i + 1, v.as_str())?,
            Val::Int(None) | Val::Text(None) => {
                st.raw_bind_parameter(i + 1, rusqlite::types::Null)?
            }
        }
    }
    Ok(())
}

fn lite_rows(c: &rusqlite::Connection, sql: &str, args: &[Val], limit: usize) -> R<Vec<Row>> {
    let mut st = c.prepare_cached(&lite_sql(sql))?;
    lite_bind(&mut st, args)?;
    let names: Arc<[String]> = st.column_names().iter().map(|n| (*n).to_owned()).collect();
    let mut rows = st.raw_query();
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(r) = rows.next()? else { break };
        let mut cells = Vec::with_capacity(names.len());
        for i in 0..names.len() {
            use rusqlite::types::ValueRef;
            cells.push(match r.get_ref(i)? {
                ValueRef::Null => Cell::Null,
                ValueRef::Integer(v) => Cell::Int(v),
                ValueRef::Text(t) => Cell::Text(
                    std::str::from_utf8(t)
                        .map_err(|e| decode_error(format!("column {}: {e}", names[i])))?
                        .to_owned(),
                ),
                ValueRef::Real(_) => Cell::Other("a float"),
                ValueRef::Blob(_) => Cell::Other("a blob"),
            });
        }
        out.push(Row {
            names: names.clone(),
            cells,
        });
    }
    Ok(out)
}

impl Conn {
    /// The session row as the writer last read or wrote it, if remembered.
    pub fn remembered(&self, id: SessionId) -> Option<&SessionRow> {
        match self {
            Self::Lite(l) => l.sessions.get(&id),
            Self::Batch(b) => b.sessions.get(&id),
            _ => None,
        }
    }

    /// Saves `row` in memory only, to be written before the commit, when
    /// this is a batch that holds its lock; false if it must be written now.
    pub fn defer_save(&mut self, row: &SessionRow) -> bool {
        match self {
            Self::Batch(b) if b.locked.contains(&row.id) => {
                b.keep_undo(row.id);
                b.sessions.insert(row.id, row.clone());
                b.dirty.insert(row.id);
                true
            }
            _ => false,
        }
    }

    /// Remembers `row` as the row on disk (inside the open transaction).
    pub fn remember(&mut self, row: &SessionRow) {
        match self {
            Self::Lite(l) => {
                if l.sessions.len() >= REMEMBERED_SESSIONS {
                    l.sessions.clear();
                }
                l.sessions.insert(row.id, row.clone());
            }
            Self::Batch(b) if b.locked.contains(&row.id) => {
                b.keep_undo(row.id);
                b.sessions.insert(row.id, row.clone());
            }
            _ => {}
        }
    }

    /// Forgets session `id`'s row (changed by a statement that does not
    /// give the new row).
    pub fn forget(&mut self, id: SessionId) {
        match self {
            Self::Lite(l) => {
                l.sessions.remove(&id);
            }
            Self::Batch(b) => {
                b.keep_undo(id);
                b.sessions.remove(&id);
                b.dirty.remove(&id);
            }
            _ => {}
        }
    }

    fn sqlx(&mut self) -> Option<&mut sqlx::AnyConnection> {
        match self {
            Self::Pool(c) => Some(&mut **c),
            Self::Tx(t) => Some(&mut **t),
            Self::Batch(b) => Some(&mut *b.tx),
            Self::Lite(_) => None,
        }
    }

    /// Runs a statement; the number of rows it changed.
    pub async fn execute(&mut self, sql: &str, args: &[Val]) -> R<u64> {
        match self {
            Self::Lite(c) => {
                let mut st = c.conn.prepare_cached(&lite_sql(sql))?;
                lite_bind(&mut st, args)?;
                Ok(st.raw_execute()? as u64)
            }
            other => {
                let c = other
                    .sqlx()
                    .ok_or_else(|| decode_error("no connection".into()))?;
                Ok(sqlx_query(sql, args).execute(c).await?.rows_affected())
            }
        }
    }

    /// Every row of a query.
    pub async fn fetch_all(&mut self, sql: &str, args: &[Val]) -> R<Vec<Row>> {
        self.fetch(sql, args, usize::MAX).await
    }

    /// The query's first row, if any.
    pub async fn fetch_optional(&mut self, sql: &str, args: &[Val]) -> R<Option<Row>> {
        Ok(self.fetch(sql, args, 1).await?.pop())
    }

    /// The query's first row; an error if there is none.
    pub async fn fetch_one(&mut self, sql: &str, args: &[Val]) -> R<Row> {
        self.fetch_optional(sql, args)
            .await?
            .ok_or_else(|| decode_error(format!("no row for {sql}")))
    }

    /// The first column of the query's first row.
    pub async fn scalar<T: FromCell>(&mut self, sql: &str, args: &[Val]) -> R<T> {
        self.fetch_one(sql, args).await?.first()
    }

    async fn fetch(&mut self, sql: &str, args: &[Val], limit: usize) -> R<Vec<Row>> {
        match self {
            Self::Lite(c) => lite_rows(&c.conn, sql, args, limit),
            other => {
                let c = other
                    .sqlx()
                    .ok_or_else(|| decode_error("no connection".into()))?;
                let rows = if limit == 1 {
                    sqlx_query(sql, args)
                        .fetch_optional(c)
                        .await?
                        .into_iter()
                        .collect()
                } else {
                    sqlx_query(sql, args).fetch_all(c).await?
                };
                let Some(first) = rows.first() else {
                    return Ok(Vec::new());
                };
                let names: Arc<[String]> = first
                    .columns()
                    .iter()
                    .map(|col| sqlx::Column::name(col).to_owned())
                    .collect();
                rows.iter().map(|r| Row::from_sqlx(r, &names)).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lite_sql;

    #[test]
    fn placeholders_become_numbered_sqlite_parameters() {
        assert_eq!(
            lite_sql("UPDATE t SET a = $2, b = $10 WHERE id = $1 AND c = $2"),
            "UPDATE t SET a = ?2, b = ?10 WHERE id = ?1 AND c = ?2"
        );
        assert_eq!(lite_sql("SELECT 1"), "SELECT 1");
        // A `$` that is not a placeholder is left alone.
        assert_eq!(lite_sql("SELECT '$', $1, 'é$x'"), "SELECT '$', ?1, 'é$x'");
    }
}
