//! The local backend: every process is a real OS process on this machine, started from the
//! deployment's `command` in a process group of its own.
//!
//! - **Ports**: free ports are taken from a range; a port is handed out only if nothing
//!   listens on it (TCP and UDP are both tried) and no other process of ours holds it.
//! - **Ready**: the backend itself notices when a process of the group has bound the main port
//!   — a listening TCP socket or a bound UDP socket, IPv4 or IPv6 — by reading the kernel's
//!   socket tables (`/proc/net/{tcp,tcp6,udp,udp6}`) and matching the socket's inode against
//!   the file descriptors of the group's processes. The game server need not report anything.
//! - **Exit**: a task per process waits for it and reports its exit code or signal; whatever
//!   else is left in its group is killed.
//! - **Stop**: SIGTERM to the group, SIGKILL after the grace period.
//! - **Logs**: stdout and stderr go to `<log dir>/<process id>.log`.
//! - **Shutdown**: [`Backend::shutdown`] stops every process it started (SIGTERM, then SIGKILL
//!   after the grace), for hosts that want no game server to outlive them.
//! - **Adoption**: after roomsched restarts, a game server it started before is found again by
//!   the `HATHORA_PROCESS_ID` in its environment (the leader of its own process group), and
//!   watched by polling `/proc/<pid>` (same pid *and* same start time, so a reused pid is not
//!   mistaken for it). It is not our child any more, so its exit code cannot be known.

use super::{AdoptSpec, Backend, BackendError, ExitStatus, StartSpec};
use crate::core::types::{ExposedPort, ProcessId};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The host players connect to (exposed ports, `HATHORA_HOSTNAME`).
    pub host: String,
    /// Where each process's stdout and stderr go (`<process id>.log`).
    pub log_dir: PathBuf,
    /// Ports are taken from this range.
    pub ports: std::ops::RangeInclusive<u16>,
    /// How often a starting process's port is checked.
    pub bind_poll: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            host: "127.0.0.1".to_string(),
            log_dir: PathBuf::from("roomsched-data/logs"),
            ports: 30_000..=39_999,
            bind_poll: Duration::from_millis(25),
        }
    }
}

/// Real OS processes.
#[derive(Debug, Clone)]
pub struct Local {
    config: Arc<LocalConfig>,
    state: Arc<Mutex<LocalState>>,
}

#[derive(Debug, Default)]
struct LocalState {
    next_port: u16,
    ports_in_use: HashSet<u16>,
    processes: HashMap<ProcessId, Running>,
    /// Game servers of a previous run, by process id: found once, at the first adoption.
    orphans: Option<HashMap<ProcessId, Orphan>>,
}

/// A game server found in `/proc` that roomsched started before a restart.
#[derive(Debug, Clone)]
struct Orphan {
    pid: i32,
    start_time: u64,
    /// Its `PORT` (the main port) and `HATHORA_PORT_<NAME>` variables.
    main_port: Option<u16>,
    named_ports: Vec<(String, u16)>,
}

#[derive(Debug)]
struct Running {
    /// The process id of the game server, which is also its process group id.
    pgid: i32,
    ports: Vec<u16>,
    /// Flips to true once the process has exited and been reaped.
    exited: watch::Receiver<bool>,
    /// SIGTERM already sent by `stop` (shutdown must not send a second one).
    terminated: bool,
}

fn lock(state: &Mutex<LocalState>) -> std::sync::MutexGuard<'_, LocalState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl LocalState {
    /// A port in `range` that no process of ours holds and nothing on the machine uses.
    fn take_port(&mut self, range: &std::ops::RangeInclusive<u16>) -> Result<u16, BackendError> {
        let span = usize::from(range.end() - range.start()) + 1;
        for _ in 0..span {
            if self.next_port < *range.start() || self.next_port >= *range.end() {
                self.next_port = *range.start();
            } else {
                self.next_port += 1;
            }
            let port = self.next_port;
            if !self.ports_in_use.contains(&port) && port_is_free(port) {
                self.ports_in_use.insert(port);
                return Ok(port);
            }
        }
        Err(BackendError(format!(
            "no free port in {}-{}",
            range.start(),
            range.end()
        )))
    }
}

/// Nothing may hold the port: a bind must succeed (TCP and UDP), and no socket of any state
/// may use it — a TCP bind test passes despite TIME_WAIT connections (SO_REUSEADDR), which a
/// game server binding without that option would trip over.
fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
        && std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok()
        && !["tcp", "tcp6", "udp", "udp6"]
            .iter()
            .any(|t| socket_table(t).iter().any(|s| s.port == port))
}

impl Local {
    pub fn new(config: LocalConfig) -> Self {
        Local {
            config: Arc::new(config),
            state: Arc::default(),
        }
    }

    /// The log file of a process.
    pub fn log_file(&self, process_id: ProcessId) -> PathBuf {
        self.config.log_dir.join(format!("{process_id}.log"))
    }

    fn signal(pgid: i32, signal: Signal) {
        // ESRCH (the group is gone) is the expected outcome of a late signal.
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// `{port}` → the main port; `{port:NAME}` → the additional port NAME.
fn expand(arg: &str, main: u16, named: &[(String, u16)]) -> String {
    let mut out = arg.replace("{port}", &main.to_string());
    for (name, port) in named {
        out = out.replace(&format!("{{port:{name}}}"), &port.to_string());
    }
    out
}

impl Backend for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn start(&self, spec: StartSpec) -> Result<(), BackendError> {
        let dep = &spec.deployment;
        let Some(program) = dep.command.first() else {
            return Err(BackendError(format!(
                "deployment {} has no command to run",
                dep.deployment_id
            )));
        };
        let (main, named) = {
            let mut st = lock(&self.state);
            let mut taken = Vec::new();
            let mut take = |st: &mut LocalState| -> Result<u16, BackendError> {
                let port = st.take_port(&self.config.ports)?;
                taken.push(port);
                Ok(port)
            };
            let ports: Result<(u16, Vec<(String, u16)>), BackendError> = (|| {
                let main = take(&mut st)?;
                let mut named = Vec::new();
                for p in &dep.additional_container_ports {
                    named.push((p.name.clone(), take(&mut st)?));
                }
                Ok((main, named))
            })();
            match ports {
                Ok(p) => p,
                Err(e) => {
                    for p in taken {
                        st.ports_in_use.remove(&p);
                    }
                    return Err(e);
                }
            }
        };
        let release = |state: &Mutex<LocalState>| {
            let mut st = lock(state);
            st.ports_in_use.remove(&main);
            for (_, p) in &named {
                st.ports_in_use.remove(p);
            }
        };
        let log_path = self.log_file(spec.process_id);
        let log = std::fs::create_dir_all(&self.config.log_dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
            })
            .and_then(|f| Ok((f.try_clone()?, f)));
        let (stdout, stderr) = match log {
            Ok(files) => files,
            Err(e) => {
                release(&self.state);
                return Err(BackendError(format!(
                    "cannot open log {}: {e}",
                    log_path.display()
                )));
            }
        };
        let (initial_room, initial_config) = spec.initial_room.clone().unwrap_or_default();
        let mut cmd = tokio::process::Command::new(expand(program, main, &named));
        cmd.args(dep.command[1..].iter().map(|a| expand(a, main, &named)))
            .envs(dep.env.iter().map(|e| (e.name.as_str(), e.value.as_str())))
            .env("HATHORA_PROCESS_ID", spec.process_id.to_string())
            .env("HATHORA_APP_ID", &spec.app_id)
            .env("HATHORA_DEPLOYMENT_ID", dep.deployment_id.to_string())
            .env("HATHORA_REGION", &spec.region)
            .env(
                "HATHORA_ROOMS_PER_PROCESS",
                dep.rooms_per_process.to_string(),
            )
            .env("HATHORA_INITIAL_ROOM_ID", initial_room)
            .env("HATHORA_INITIAL_ROOM_CONFIG", initial_config)
            .env("HATHORA_HOSTNAME", &self.config.host)
            .env("HATHORA_DEFAULT_PORT", main.to_string())
            .env("PORT", main.to_string())
            .envs(named.iter().map(|(name, port)| {
                (
                    format!("HATHORA_PORT_{}", name.to_uppercase().replace('-', "_")),
                    port.to_string(),
                )
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                release(&self.state);
                return Err(BackendError(format!("cannot run {program:?}: {e}")));
            }
        };
        let Some(pgid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
            release(&self.state);
            return Err(BackendError(
                "the process exited before it could be watched".into(),
            ));
        };
        tracing::info!(process_id = %spec.process_id, pid = pgid, port = main, log = %log_path.display(), "game server launched");

        let (exited_tx, exited_rx) = watch::channel(false);
        let mut ports = vec![main];
        ports.extend(named.iter().map(|(_, p)| *p));
        lock(&self.state).processes.insert(
            spec.process_id,
            Running {
                pgid,
                ports: ports.clone(),
                exited: exited_rx,
                terminated: false,
            },
        );

        let exposed = ExposedPort {
            host: self.config.host.clone(),
            name: "default".to_string(),
            port: main,
            transport_type: dep.transport_type,
        };
        let additional: Vec<ExposedPort> = dep
            .additional_container_ports
            .iter()
            .zip(&named)
            .map(|(cp, (_, port))| ExposedPort {
                host: self.config.host.clone(),
                name: cp.name.clone(),
                port: *port,
                transport_type: cp.transport_type,
            })
            .collect();
        let udp = matches!(dep.transport_type, crate::core::types::TransportType::Udp);
        let (events, pid, state, poll) = (
            spec.events,
            spec.process_id,
            Arc::clone(&self.state),
            self.config.bind_poll,
        );
        tokio::spawn(async move {
            let mut bound = false;
            let mut tick = tokio::time::interval(poll);
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    _ = tick.tick(), if !bound => {
                        if port_bound_by_group(main, udp, pgid) {
                            bound = true;
                            tracing::info!(process_id = %pid, port = main, "game server bound its port");
                            events.bound(pid, exposed.clone(), additional.clone());
                        }
                    }
                }
            };
            // Nothing of the group may outlive its leader.
            Local::signal(pgid, Signal::SIGKILL);
            let status = match status {
                Ok(s) => exit_status(s),
                Err(e) => {
                    tracing::warn!(process_id = %pid, %e, "could not wait for the game server");
                    ExitStatus::Signal(9)
                }
            };
            {
                let mut st = lock(&state);
                if let Some(p) = st.processes.remove(&pid) {
                    for port in p.ports {
                        st.ports_in_use.remove(&port);
                    }
                }
            }
            tracing::info!(process_id = %pid, %status, "game server exited");
            // Report the exit before waking whoever waits for it (Backend::shutdown), so that a
            // barrier sent after the wait is ordered after the exit event.
            events.exited(pid, status);
            let _ = exited_tx.send(true);
        });
        Ok(())
    }

    fn stop(&self, process_id: ProcessId, grace: Duration) {
        let Some((pgid, mut exited)) = lock(&self.state).processes.get_mut(&process_id).map(|p| {
            p.terminated = true;
            (p.pgid, p.exited.clone())
        }) else {
            return;
        };
        if grace.is_zero() {
            Local::signal(pgid, Signal::SIGKILL);
            return;
        }
        Local::signal(pgid, Signal::SIGTERM);
        tokio::spawn(async move {
            let done = tokio::time::timeout(grace, exited.wait_for(|e| *e)).await;
            if done.is_err() {
                tracing::info!(process_id = %process_id, "game server ignored SIGTERM; killing it");
                Local::signal(pgid, Signal::SIGKILL);
            }
        });
    }

    fn adopt(&self, spec: AdoptSpec) {
        let pid = spec.process.process_id;
        let orphan = {
            let mut st = lock(&self.state);
            if st.processes.contains_key(&pid) {
                return; // still ours (started by this run)
            }
            st.orphans.get_or_insert_with(find_orphans).remove(&pid)
        };
        match orphan {
            Some(orphan) => self.watch_orphan(spec, orphan),
            None => {
                tracing::info!(process_id = %pid, "game server from before the restart is gone");
                spec.events.exited(pid, ExitStatus::GoneWhileDown);
            }
        }
    }

    fn runs_commands(&self) -> bool {
        true
    }

    fn log_path(&self, process_id: ProcessId) -> Option<PathBuf> {
        Some(self.log_file(process_id))
    }

    fn shutdown(&self, grace: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let all: Vec<(i32, watch::Receiver<bool>, bool)> = lock(&self.state)
            .processes
            .values()
            .map(|p| (p.pgid, p.exited.clone(), p.terminated))
            .collect();
        Box::pin(async move {
            if all.is_empty() {
                return;
            }
            tracing::info!(processes = all.len(), "stopping every game server");
            for (pgid, _, terminated) in &all {
                if !terminated {
                    Local::signal(*pgid, Signal::SIGTERM);
                }
            }
            for (pgid, mut exited, _) in all {
                if tokio::time::timeout(grace, exited.wait_for(|e| *e))
                    .await
                    .is_err()
                {
                    Local::signal(pgid, Signal::SIGKILL);
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e)).await;
                }
            }
        })
    }
}

impl Local {
    /// Watches an adopted game server until it exits: its bind if it was STARTING, its exit by
    /// polling `/proc` (it is not our child).
    fn watch_orphan(&self, spec: AdoptSpec, orphan: Orphan) {
        let (pid, dep) = (spec.process.process_id, &spec.deployment);
        let main = orphan.main_port.unwrap_or(0);
        let mut ports: Vec<u16> = orphan.main_port.into_iter().collect();
        ports.extend(orphan.named_ports.iter().map(|(_, p)| *p));
        let (exited_tx, exited_rx) = watch::channel(false);
        {
            let mut st = lock(&self.state);
            st.ports_in_use.extend(ports.iter().copied());
            st.processes.insert(
                pid,
                Running {
                    pgid: orphan.pid,
                    ports,
                    exited: exited_rx,
                    terminated: false,
                },
            );
        }
        tracing::info!(process_id = %pid, pid = orphan.pid, "game server adopted again");
        let exposed = ExposedPort {
            host: self.config.host.clone(),
            name: "default".to_string(),
            port: main,
            transport_type: dep.transport_type,
        };
        let additional: Vec<ExposedPort> = dep
            .additional_container_ports
            .iter()
            .filter_map(|cp| {
                let key = cp.name.to_uppercase().replace('-', "_");
                let port = orphan.named_ports.iter().find(|(n, _)| *n == key)?.1;
                Some(ExposedPort {
                    host: self.config.host.clone(),
                    name: cp.name.clone(),
                    port,
                    transport_type: cp.transport_type,
                })
            })
            .collect();
        let udp = matches!(dep.transport_type, crate::core::types::TransportType::Udp);
        let starting = spec.process.status == crate::core::types::ProcessStatus::Starting;
        let (events, state, poll) = (
            spec.events,
            Arc::clone(&self.state),
            self.config.bind_poll.max(Duration::from_millis(100)),
        );
        tokio::spawn(async move {
            let mut bound = !starting || main == 0;
            let mut tick = tokio::time::interval(poll);
            loop {
                tick.tick().await;
                if start_time_of(orphan.pid) != Some(orphan.start_time) {
                    break;
                }
                if !bound && port_bound_by_group(main, udp, orphan.pid) {
                    bound = true;
                    events.bound(pid, exposed.clone(), additional.clone());
                }
            }
            Local::signal(orphan.pid, Signal::SIGKILL);
            {
                let mut st = lock(&state);
                if let Some(p) = st.processes.remove(&pid) {
                    for port in p.ports {
                        st.ports_in_use.remove(&port);
                    }
                }
            }
            tracing::info!(process_id = %pid, "adopted game server exited");
            events.exited(pid, ExitStatus::Unknown);
            let _ = exited_tx.send(true);
        });
    }
}

/// Every process on the machine started by roomsched (it carries `HATHORA_PROCESS_ID`) that
/// leads its own process group, by process id.
fn find_orphans() -> HashMap<ProcessId, Orphan> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    let mut found = HashMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if process_group_of(&entry.path()) != Some(pid) {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let mut id = None;
        let mut orphan = Orphan {
            pid,
            start_time: 0,
            main_port: None,
            named_ports: vec![],
        };
        for var in environ.split(|b| *b == 0) {
            let Some((k, v)) = std::str::from_utf8(var)
                .ok()
                .and_then(|v| v.split_once('='))
            else {
                continue;
            };
            match k {
                "HATHORA_PROCESS_ID" => id = ProcessId::parse_str(v).ok(),
                "PORT" => orphan.main_port = v.parse().ok(),
                k => {
                    if let (Some(name), Ok(port)) = (k.strip_prefix("HATHORA_PORT_"), v.parse()) {
                        orphan.named_ports.push((name.to_string(), port));
                    }
                }
            }
        }
        let (Some(id), Some(start_time)) = (id, start_time_of(pid)) else {
            continue;
        };
        orphan.start_time = start_time;
        found.insert(id, orphan);
    }
    found
}

/// When a live (not zombie) process started, in clock ticks since boot (`/proc/<pid>/stat`
/// field 22); `None` once it is gone.
fn start_time_of(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the comm: state is field 3, starttime field 22.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn exit_status(s: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(code), _) => ExitStatus::Code(code),
        (None, Some(signal)) => ExitStatus::Signal(signal),
        (None, None) => ExitStatus::Code(-1),
    }
}

/// Whether a process of group `pgid` has a socket bound on `port`: a listening TCP socket
/// (or any bound UDP socket when `udp`), IPv4 or IPv6.
fn port_bound_by_group(port: u16, udp: bool, pgid: i32) -> bool {
    let tables: &[&str] = if udp {
        &["udp", "udp6", "tcp", "tcp6"]
    } else {
        &["tcp", "tcp6", "udp", "udp6"]
    };
    let inodes: HashSet<u64> = tables.iter().flat_map(|t| socket_inodes(t, port)).collect();
    !inodes.is_empty() && group_holds_any(pgid, &inodes)
}

/// One socket of a `/proc/net` table.
struct SocketEntry {
    port: u16,
    /// Kernel state, hex (`0A` is TCP LISTEN).
    state: String,
    inode: u64,
}

/// The sockets of `/proc/net/<table>` (`tcp`, `tcp6`, `udp`, `udp6`).
fn socket_table(table: &str) -> Vec<SocketEntry> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/net/{table}")) else {
        return vec![];
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(SocketEntry {
                port: u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?,
                state: f.get(3)?.to_string(),
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Inodes of the sockets of a table bound to `port` (TCP: only listening ones).
fn socket_inodes(table: &str, port: u16) -> Vec<u64> {
    let tcp = table.starts_with("tcp");
    socket_table(table)
        .into_iter()
        .filter(|s| s.port == port && (!tcp || s.state == "0A"))
        .map(|s| s.inode)
        .collect()
}

/// Whether any process of group `pgid` has one of `inodes` open.
fn group_holds_any(pgid: i32, inodes: &HashSet<u64>) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| process_group_of(&e.path()) == Some(pgid))
        .any(|e| holds_any(&e.path(), inodes))
}

fn process_group_of(proc_dir: &Path) -> Option<i32> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    // pid (comm) state ppid pgrp ...: comm may contain spaces, so split after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

fn holds_any(proc_dir: &Path, inodes: &HashSet<u64>) -> bool {
    let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|link| {
            link.to_str()
                .and_then(|l| {
                    l.strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|inode| inodes.contains(&inode))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced() {
        let named = vec![("voice".to_string(), 4000)];
        assert_eq!(expand("--port={port}", 3000, &named), "--port=3000");
        assert_eq!(expand("{port:voice}", 3000, &named), "4000");
        assert_eq!(expand("plain", 3000, &named), "plain");
    }

    #[test]
    fn a_listening_socket_of_our_own_group_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let own_group = process_group_of(Path::new("/proc/self")).expect("pgrp");
        assert!(port_bound_by_group(port, false, own_group));
        assert!(
            !port_bound_by_group(port, false, own_group + 1_000_000),
            "another group"
        );
        drop(listener);
        assert!(!port_bound_by_group(port, false, own_group), "closed");
    }

    #[test]
    fn a_bound_udp_socket_is_seen() {
        let socket = std::net::UdpSocket::bind("[::1]:0").expect("bind");
        let port = socket.local_addr().expect("addr").port();
        let own_group = process_group_of(Path::new("/proc/self")).expect("pgrp");
        assert!(port_bound_by_group(port, true, own_group));
    }
}
