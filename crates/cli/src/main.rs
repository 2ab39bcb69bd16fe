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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(cfg) => {
            let app = baton_cli::App::build(&cfg).await?;
            // Printed once the server can take requests: scripts wait for it.
            println!("listening on http://{}", app.addr());
            // A second SIGTERM or Ctrl-C during the shutdown forces it.
            app.run_until_forced(baton_cli::shutdown_signal(), async {
                baton_cli::shutdown_signal().await
            })
            .await
        }
        Command::Chat(args) => baton_cli::chat::run(args).await,
        Command::Bench(args) => baton_cli::bench::run(args).await,
    }
}
