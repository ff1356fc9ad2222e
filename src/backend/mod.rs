//! What actually starts and stops game-server processes. The core calls a [`Backend`] to start
//! and stop processes and hears back through [`ProcessEvents`]: a process bound its port, or it
//! exited. Backends own no scheduling state and never call into the scheduler directly.

#[cfg(unix)]
pub mod local;
pub mod simulated;

use crate::core::types::{Deployment, ExposedPort, Process, ProcessId};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

#[cfg(unix)]
pub use local::{Local, LocalConfig};
pub use simulated::{Simulated, SimulatedConfig};

/// Everything a backend needs to start one process.
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub process_id: ProcessId,
    pub app_id: String,
    pub region: String,
    pub deployment: Arc<Deployment>,
    /// The room that made this process start (`HATHORA_INITIAL_ROOM_ID`), with its config.
    pub initial_room: Option<(String, String)>,
    /// Where to report that the process bound its port or exited.
    pub events: ProcessEvents,
}

/// A process started before the scheduler restarted, to be taken back (see
/// [`Backend::adopt`]).
#[derive(Debug, Clone)]
pub struct AdoptSpec {
    /// The process as stored: its status says what to watch for (a STARTING one may still
    /// bind; a STOPPING one is stopped again by the scheduler).
    pub process: Process,
    pub deployment: Arc<Deployment>,
    pub events: ProcessEvents,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
    /// It ended while roomsched was down (found gone when adopting it after a restart).
    GoneWhileDown,
    /// An adopted process (not a child of this roomsched) ended: its status cannot be read.
    Unknown,
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
            ExitStatus::GoneWhileDown => {
                write!(f, "exited while roomsched was down (status unknown)")
            }
            ExitStatus::Unknown => write!(f, "exited (status unknown: adopted after a restart)"),
        }
    }
}

/// A report from a backend about one process.
#[derive(Debug)]
pub(crate) struct ProcessEvent {
    pub(crate) process_id: ProcessId,
    pub(crate) kind: ProcessEventKind,
}

#[derive(Debug)]
pub(crate) enum ProcessEventKind {
    Bound {
        exposed_port: ExposedPort,
        additional_exposed_ports: Vec<ExposedPort>,
    },
    Exited(ExitStatus),
    /// The backend could not launch the process at all.
    LaunchFailed(String),
    /// The scheduler's own timers, sent through the same channel so that every change to a
    /// process is applied by one task, in order.
    StartTimeout,
    IdleCheck,
    /// Reconcile the warm pool of the process's region.
    PoolCheck,
    /// Not about a process: answered once every event sent before it has been applied.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The channel a backend reports on. Reports may arrive late or twice; the scheduler ignores
/// any that would move a process backwards.
#[derive(Debug, Clone)]
pub struct ProcessEvents(pub(crate) mpsc::UnboundedSender<ProcessEvent>);

impl ProcessEvents {
    /// The process has bound its main port and takes players.
    pub fn bound(
        &self,
        process_id: ProcessId,
        exposed_port: ExposedPort,
        additional_exposed_ports: Vec<ExposedPort>,
    ) {
        let kind = ProcessEventKind::Bound {
            exposed_port,
            additional_exposed_ports,
        };
        // A closed channel means the scheduler is gone; nothing is left to tell.
        let _ = self.0.send(ProcessEvent { process_id, kind });
    }

    /// The process has exited.
    pub fn exited(&self, process_id: ProcessId, status: ExitStatus) {
        let _ = self.0.send(ProcessEvent {
            process_id,
            kind: ProcessEventKind::Exited(status),
        });
    }
}

/// A backend could not start a process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// Starts and stops processes. Both calls return quickly; outcomes arrive as events.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs (`simulated`, `local`).
    fn name(&self) -> &'static str;

    /// Begins starting a process. An `Err` means it could not even be launched.
    fn start(&self, spec: StartSpec) -> Result<(), BackendError>;

    /// Asks a process to stop: a polite signal, then a kill after `grace` (zero = kill now).
    /// Reports the exit through the process's events. Stopping an unknown or already exited
    /// process does nothing.
    fn stop(&self, process_id: ProcessId, grace: Duration);

    /// Takes back a process started before the scheduler restarted: if it is still alive, the
    /// backend watches it again (bind, exit) and can stop it; if it is gone, it reports an
    /// exit ([`ExitStatus::GoneWhileDown`]). The default, for backends whose processes
    /// cannot outlive the scheduler, reports every process gone.
    fn adopt(&self, spec: AdoptSpec) {
        spec.events
            .exited(spec.process.process_id, ExitStatus::GoneWhileDown);
    }

    /// Whether processes are started from the deployment's `command` (deployments without
    /// one are then refused).
    fn runs_commands(&self) -> bool {
        false
    }

    /// Where the process's output is written, if the backend keeps it.
    fn log_path(&self, _process_id: ProcessId) -> Option<PathBuf> {
        None
    }

    /// Stops every process the backend started (polite signal, then a kill after `grace`);
    /// completes when they have exited. Called when roomsched itself shuts down.
    fn shutdown(&self, _grace: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(std::future::ready(()))
    }
}
