//! The `elastio` command-line tool. `main` parses arguments, calls `run`, prints the error chain
//! and maps it to a documented exit code (see `elastio --help`).

mod cli;
mod commands;
mod context;
mod output;

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ELASTIO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = cli::Cli::parse();
    if let Err(e) = commands::run(args) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(exit_code(&e));
    }
}

fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        let scalez = cause.downcast_ref::<scalez::Error>().or_else(|| {
            match cause.downcast_ref::<agent::AgentError>() {
                Some(agent::AgentError::Vault(v)) => Some(v),
                _ => None,
            }
        });
        match scalez {
            Some(scalez::Error::Corrupt { .. }) | Some(scalez::Error::MissingChunk { .. }) => {
                return 3
            }
            Some(scalez::Error::WrongPassword { .. }) => return 4,
            _ => {}
        }
    }
    1
}
