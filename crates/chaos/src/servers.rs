//! The servers a run drives when it starts them itself: `baton serve`
//! processes on fixed loopback ports (so a restarted node keeps its URL),
//! killed with `SIGKILL`, stopped with `SIGTERM` and restarted; and, on
//! PostgreSQL, one TCP proxy per node between it and the database, which
//! can cut the node off (every open connection dropped, new ones held
//! unanswered) and let it back.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::AbortHandle;

/// A free loopback port (bound and released; the server binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("reading the bound port")?.port())
}

/// One `baton serve` node.
pub struct Node {
    pub name: String,
    pub url: String,
    port: u16,
    bin: PathBuf,
    /// Everything after `serve --listen ADDR`.
    args: Vec<String>,
    /// The database URL it gets, if any (through its proxy).
    database_url: Option<String>,
    child: Option<Child>,
}

impl Node {
    pub fn new(
        name: String,
        bin: PathBuf,
        args: Vec<String>,
        database_url: Option<String>,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        Ok(Self {
            name,
            url: format!("http://127.0.0.1:{port}"),
            port,
            bin,
            args,
            database_url,
            child: None,
        })
    }

    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process and waits for its `listening on` line.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        match &self.database_url {
            Some(url) => cmd.env("DATABASE_URL", url),
            None => cmd.env_remove("DATABASE_URL"),
        };
        // The port may linger briefly after a kill; a start that fails to
        // bind is tried again.
        let mut last_err = None;
        for _ in 0..50 {
            let mut child = cmd
                .spawn()
                .with_context(|| format!("spawning {}", self.bin.display()))?;
            let stdout = child.stdout.take().context("the server's stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
                Ok(Ok(Some(line))) if line.starts_with("listening on ") => {
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    self.child = Some(child);
                    return Ok(());
                }
                other => {
                    last_err = Some(format!("{other:?}"));
                    let _ = child.kill().await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        anyhow::bail!(
            "node {} did not start: {}",
            self.name,
            last_err.unwrap_or_default()
        )
    }

    /// `SIGKILL`: no shutdown code runs.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill().context("SIGKILL")?;
            child
                .wait()
                .await
                .context("waiting for the killed server")?;
        }
        Ok(())
    }

    /// `SIGTERM`, then waits for the graceful exit (a second signal after
    /// `patience` forces it).
    pub async fn terminate(&mut self, patience: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let Some(pid) = child.id() else {
            return Ok(());
        };
        let term = || {
            std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
        };
        term().context("sending SIGTERM")?;
        if tokio::time::timeout(patience, child.wait()).await.is_err() {
            term().context("sending the second SIGTERM")?;
            if tokio::time::timeout(patience, child.wait()).await.is_err() {
                child.start_kill().context("SIGKILL after SIGTERM")?;
                child.wait().await.context("waiting for the server")?;
            }
        }
        Ok(())
    }
}

/// A TCP proxy on loopback in front of the database, for one node.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// Connections accepted while cut off and held unanswered.
    held: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (host:port).
    pub async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let port = listener.local_addr().context("proxy address")?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let held: Arc<AtomicUsize> = Arc::default();
        let (cut2, conns2, held2) = (cut.clone(), conns.clone(), held.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let cut = cut2.clone();
                let held = held2.clone();
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    // Cut off: the connection is held unanswered, as
                    // behind a partition, until the cut ends; then dropped.
                    if cut.load(Ordering::SeqCst) {
                        held.fetch_add(1, Ordering::SeqCst);
                        while cut.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        return;
                    }
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut live = conns2.lock().unwrap_or_else(PoisonError::into_inner);
                live.retain(|h| !h.is_finished());
                live.push(task.abort_handle());
            }
        })
        .abort_handle();
        Ok(Self {
            port,
            cut,
            held,
            conns,
            accept,
        })
    }

    /// Cuts the node off: drops every open connection; new ones hang.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let live = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        for h in live.iter() {
            h.abort();
        }
    }

    /// How many connections were held while cut off, so far.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Lets the node reach the database again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        let live = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        for h in live.iter() {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn echo_server() -> anyhow::Result<String> {
        let up = TcpListener::bind("127.0.0.1:0").await?;
        let addr = up.local_addr()?.to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = up.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok(addr)
    }

    async fn ping(s: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn a_cut_drops_open_connections_and_holds_new_ones_until_healed() -> anyhow::Result<()> {
        let proxy = Proxy::start(echo_server().await?).await?;
        let mut open = TcpStream::connect(("127.0.0.1", proxy.port)).await?;
        assert_eq!(ping(&mut open).await?, b"ping");

        proxy.cut();
        let mut buf = [0u8; 4];
        let after_cut = open.read(&mut buf).await;
        assert!(
            matches!(after_cut, Ok(0) | Err(_)),
            "an open connection is dropped: {after_cut:?}"
        );

        // A new connection is accepted but goes nowhere while cut off.
        let mut held = TcpStream::connect(("127.0.0.1", proxy.port)).await?;
        held.write_all(b"ping").await?;
        while proxy.held() == 0 {
            tokio::task::yield_now().await;
        }
        proxy.heal();
        let n = held.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "a held connection never reached the database");

        let mut again = TcpStream::connect(("127.0.0.1", proxy.port)).await?;
        assert_eq!(ping(&mut again).await?, b"ping", "healed");
        Ok(())
    }
}
