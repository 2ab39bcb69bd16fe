//! Test support for the workspace's PostgreSQL tests: finding the database,
//! and giving each test a schema of its own in it.

use sqlx::Connection;

/// `DATABASE_URL` for a PostgreSQL test, or `None` after saying on stderr
/// that `what` is skipped. With `BATON_REQUIRE_POSTGRES=1` (`.ci/run` sets
/// it) a missing `DATABASE_URL` fails the test instead: a skipped suite must
/// never count as a passed one.
pub fn database_url(what: &str) -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("BATON_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
            panic!("{what} needs PostgreSQL: DATABASE_URL is not set and BATON_REQUIRE_POSTGRES=1")
        }
        _ => {
            eprintln!("skipping PostgreSQL test {what}: DATABASE_URL is not set");
            None
        }
    }
}

/// A fresh schema in the `DATABASE_URL` database, for one test: [`url`]
/// points its connections there (`search_path`), so the test migrates and
/// works in tables no other test sees, including tests in other processes
/// (a test runner that runs each test in its own process, another test
/// binary's sweepers). Dropped with everything in it when the guard drops,
/// a panicking test included.
///
/// [`url`]: PgSchema::url
pub struct PgSchema {
    admin_url: String,
    url: String,
    name: String,
}

impl PgSchema {
    /// Creates the schema.
    pub async fn create(database_url: &str) -> Self {
        let name = format!("baton_test_{}", uuid::Uuid::new_v4().simple());
        let mut c = sqlx::PgConnection::connect(database_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to PostgreSQL at DATABASE_URL: {e}"));
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("creating schema {name}: {e}"));
        let _ = c.close().await;
        let sep = if database_url.contains('?') { '&' } else { '?' };
        Self {
            url: format!("{database_url}{sep}options%5Bsearch_path%5D={name}"),
            admin_url: database_url.to_owned(),
            name,
        }
    }

    /// The database URL with the schema as its search path.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // A thread of its own: the guard may drop inside an async runtime,
        // which must not block on one of its own.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut c = sqlx::PgConnection::connect(&url).await?;
                // A connection of the test still inside a transaction would
                // hold the drop up: give up rather than hang.
                sqlx::query("SET lock_timeout = '5s'")
                    .execute(&mut c)
                    .await?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&mut c)
                    .await?;
                c.close().await
            })
            .map_err(|e| e.to_string())
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test schema {}: {e}", self.name),
            Err(_) => eprintln!(
                "could not drop test schema {}: the thread panicked",
                self.name
            ),
        }
    }
}
