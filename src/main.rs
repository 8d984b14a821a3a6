//! `cascade`: one binary, four roles (INTERFACE.md). Loads the config, sets
//! up logging and metrics, runs the node until SIGINT or a drained SIGTERM.

// A binary: `pub` marks what a module offers its siblings.
#![allow(unreachable_pub)]

mod api;
mod config;
mod events;
mod http_limits;
mod node;
mod placement;
mod tls;

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    if let Some(secret) = config::secret_command() {
        println!("{secret}");
        return ExitCode::SUCCESS;
    }
    let cfg = match config::Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cascade: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_new(&cfg.log).unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match node::run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("cascade: {e:#}");
            ExitCode::FAILURE
        }
    }
}
