//! The `elastio` command-line tool. `main` parses arguments, calls `run`, prints the error chain
//! and maps it to a documented exit code (see `elastio --help`).

mod cli;
mod commands;
mod context;
mod output;

use std::sync::OnceLock;

use clap::Parser;

static CANCEL: OnceLock<agent::Cancel> = OnceLock::new();

/// The process-wide cancellation flag, set by SIGINT/SIGTERM: long operations stop at the next
/// block, clean up (no RP, no partial restore target) and exit with 130.
pub fn cancel_token() -> agent::Cancel {
    CANCEL.get_or_init(agent::Cancel::new).clone()
}

#[allow(unsafe_code)]
extern "C" fn on_signal(_: libc::c_int) {
    match CANCEL.get() {
        // A second signal, or one before any operation started: stop now.
        Some(c) if !c.is_cancelled() => c.cancel(),
        // SAFETY: _exit is async-signal-safe.
        _ => unsafe { libc::_exit(130) },
    }
}

#[allow(unsafe_code)]
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only does an atomic load/store or _exit, both async-signal-safe.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ELASTIO_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,fuser=off,rustls=error")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    // The thaw watchdog of `--freeze` (agent::freeze): not a user command, no clap.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw
        .get(1)
        .is_some_and(|a| a == agent::freeze::WATCHDOG_COMMAND)
    {
        std::process::exit(agent::freeze::watchdog_main(&raw[2..]));
    }
    let args = cli::Cli::parse();
    install_signal_handlers();
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
        // A vault error may also travel inside an io::Error (the mount views, readers).
        let inner = cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|e| e as &(dyn std::error::Error + 'static));
        let scalez = match cause.downcast_ref::<agent::AgentError>() {
            Some(agent::AgentError::Cancelled) => return 130,
            Some(agent::AgentError::Vault(v)) => Some(v),
            _ => cause
                .downcast_ref::<scalez::Error>()
                .or_else(|| inner.and_then(|e| e.downcast_ref::<scalez::Error>())),
        };
        match scalez {
            Some(
                scalez::Error::Corrupt { .. }
                | scalez::Error::MissingChunk { .. }
                | scalez::Error::MissingBody { .. },
            ) => return 3,
            Some(scalez::Error::WrongPassword { .. }) => return 4,
            Some(scalez::Error::RunAgain { .. }) => return 75,
            _ => {}
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_is_exit_3_even_inside_an_io_error() {
        let corrupt = || scalez::Error::Corrupt {
            location: "v".into(),
            key: "packs/x".into(),
            detail: "bad".into(),
        };
        assert_eq!(exit_code(&anyhow::Error::from(corrupt())), 3);
        let wrapped = anyhow::Error::from(std::io::Error::from(corrupt())).context("mounting");
        assert_eq!(exit_code(&wrapped), 3);
        let plain = anyhow::Error::from(std::io::Error::other("no such file"));
        assert_eq!(exit_code(&plain), 1);
    }
}
