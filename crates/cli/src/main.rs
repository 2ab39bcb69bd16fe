//! `baton`: serve, chat, bench.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "baton", version, about = "A session runtime for AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<baton_cli::ServeConfig>),
    /// Chat with an agent from the terminal.
    Chat(baton_cli::chat::ChatArgs),
    /// Measure the store and the API.
    Bench(baton_cli::bench::BenchArgs),
}

/// Sets up logging to stderr: `RUST_LOG` filters (default `info`), colour
/// only when stderr is a terminal.
fn init_logs(format: baton_cli::config::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        baton_cli::config::LogFormat::Text => builder.init(),
        baton_cli::config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    init_logs(match &command {
        Command::Serve(cfg) => cfg.log_format,
        _ => baton_cli::config::LogFormat::Text,
    });
    match command {
        Command::Serve(mut cfg) => {
            cfg.read_env_lists(|name| std::env::var(name).ok())
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            let app = baton_cli::App::build(&cfg).await?;
            // Printed once the server can take requests: scripts wait for it.
            println!("listening on http://{}", app.addr());
            // A second SIGTERM or Ctrl-C during the shutdown forces it.
            app.run_until_forced(baton_cli::shutdown_signal(), async {
                baton_cli::shutdown_signal().await
            })
            .await
        }
        // The chat's exit status says how its last turn ended.
        Command::Chat(args) => std::process::exit(baton_cli::chat::run(args).await.into()),
        Command::Bench(args) => baton_cli::bench::run(args).await,
    }
}
