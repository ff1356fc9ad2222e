//! The `roomsched` binary: parses arguments, resolves the configuration of `serve`, sets up
//! logging, and hands over to the library (`roomsched::cli`).

use clap::Parser;
use roomsched::cli::{self, Cli, Command};
use roomsched::config::{LogFormat, Settings};
use std::process::ExitCode;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs go to stderr, filtered by `ROOMSCHED_LOG` (e.g. `info,roomsched=debug`); the
/// transport crates only speak up for warnings. Lines are written by a thread of their own
/// through a buffer, so a busy server makes one write per batch of lines rather than one per
/// line; when the buffer is full, callers wait (no line is dropped). The returned guard
/// flushes what is left when dropped.
fn init_logging(default_level: &str, format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_env("ROOMSCHED_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{default_level},h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,rustls=warn,axum=warn"
        ))
    });
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => logs.json().with_current_span(true).init(),
        LogFormat::Pretty => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    guard
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => match Settings::resolve(args) {
            Ok(settings) => {
                let _logs = init_logging("info", settings.log_format);
                runtime.block_on(cli::serve(settings))
            }
            Err(err) => Err(err.into()),
        },
        command => {
            let _logs = init_logging("warn", LogFormat::Pretty);
            runtime.block_on(cli::run(command))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
