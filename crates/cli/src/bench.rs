//! `baton bench` (being written).
use clap::Args;

/// `baton bench` flags.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {}

/// Runs the benchmarks.
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
