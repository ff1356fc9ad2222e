//! The `roomsched` binary: parses arguments, resolves the configuration of `serve`, sets up
//! logging, and hands over to the library (`roomsched::cli`).

use clap::error::{ContextKind, ContextValue};
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

/// When clap refuses the value of a flag that was not on the command line, the value came from
/// its `ROOMSCHED_…` variable: name the variable, which clap's message does not.
fn env_source(err: &clap::Error) -> Option<String> {
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let flag = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    let var = format!("ROOMSCHED_{}", flag.to_uppercase().replace('-', "_"));
    let on_command_line =
        std::env::args().any(|a| a == format!("--{flag}") || a.starts_with(&format!("--{flag}=")));
    (!on_command_line && std::env::var_os(&var).is_some()).then_some(var)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            if let Some(var) = env_source(&err) {
                eprintln!("note: the value comes from the environment variable {var}");
            }
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2));
        }
    };
    // A worker that runs out of work tells the store's writer not to wait for more changes.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(roomsched::store::durable::worker_parked)
        .build()
    {
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
