//! `loadtest`: many real WHEP viewers against one stream, progress each second, a JSON summary.
//!
//! The run itself lives in the library ([`loadtest::load`]) so tests drive the same code.

use clap::Parser;
use loadtest::load::{run, Args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let summary = run(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    if summary.viewers_connected == 0 && args.viewers > 0 {
        // The summary is printed either way; the status tells scripts nothing worked.
        std::process::exit(2);
    }
    Ok(())
}
