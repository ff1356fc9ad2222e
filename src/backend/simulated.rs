//! The simulated backend: processes exist only in memory, for tests, demos and benchmarks.
//! A process "binds" after a configurable delay on a port taken from a range, unless fault
//! injection says it never becomes ready or crashes after a while. Simulated processes survive
//! a restart of the scheduler: adopting one keeps its ports (a STARTING one binds after the
//! start delay).

use super::{AdoptSpec, Backend, BackendError, ExitStatus, StartSpec};
use crate::core::types::{ExposedPort, ProcessId};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Settings of the simulated backend.
#[derive(Debug, Clone)]
pub struct SimulatedConfig {
    /// How long a process stays STARTING before it binds (0 = on the next tick).
    pub start_delay: Duration,
    /// The host reported in exposed ports.
    pub host: String,
    /// Ports are handed out from this range and returned when a process exits.
    pub ports: std::ops::RangeInclusive<u16>,
    /// Share of processes (0.0–1.0) that never bind their port.
    pub never_ready_ratio: f64,
    /// Share of processes (0.0–1.0) that crash with exit code 1 after `crash_after`.
    pub crash_ratio: f64,
    /// How long a crashing process runs (after it bound) before it crashes.
    pub crash_after: Duration,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        SimulatedConfig {
            start_delay: Duration::ZERO,
            host: "127.0.0.1".to_string(),
            ports: 20_000..=60_000,
            never_ready_ratio: 0.0,
            crash_ratio: 0.0,
            crash_after: Duration::from_secs(1),
        }
    }
}

/// In-memory processes.
#[derive(Debug, Default)]
pub struct Simulated {
    config: SimulatedConfig,
    state: Arc<Mutex<SimState>>,
}

#[derive(Debug, Default)]
struct SimState {
    next_port: u16,
    ports_in_use: HashSet<u16>,
    processes: HashMap<ProcessId, SimProcess>,
}

#[derive(Debug)]
struct SimProcess {
    ports: Vec<u16>,
    task: JoinHandle<()>,
    /// Where reports go: replaced when a new scheduler adopts the process.
    events: super::ProcessEvents,
    /// Its ports, once it has bound them.
    bound: Option<(ExposedPort, Vec<ExposedPort>)>,
}

impl SimState {
    fn take_port(&mut self, range: &std::ops::RangeInclusive<u16>) -> Result<u16, BackendError> {
        let span = usize::from(range.end() - range.start()) + 1;
        if self.ports_in_use.len() >= span {
            return Err(BackendError(format!(
                "no free port left in {}-{}",
                range.start(),
                range.end()
            )));
        }
        for _ in 0..span {
            if self.next_port < *range.start() || self.next_port > *range.end() {
                self.next_port = *range.start();
            }
            let port = self.next_port;
            self.next_port = self.next_port.wrapping_add(1);
            if self.ports_in_use.insert(port) {
                return Ok(port);
            }
        }
        Err(BackendError(format!(
            "no free port left in {}-{}",
            range.start(),
            range.end()
        )))
    }

    fn release(&mut self, process_id: ProcessId) -> Option<SimProcess> {
        let p = self.processes.remove(&process_id)?;
        for port in &p.ports {
            self.ports_in_use.remove(port);
        }
        Some(p)
    }
}

fn lock(state: &Mutex<SimState>) -> std::sync::MutexGuard<'_, SimState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Simulated {
    pub fn new(config: SimulatedConfig) -> Self {
        Simulated {
            config,
            state: Arc::default(),
        }
    }

    /// Processes the backend currently holds (started and not yet exited).
    pub fn running_processes(&self) -> usize {
        lock(&self.state).processes.len()
    }
}

impl Backend for Simulated {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn start(&self, spec: StartSpec) -> Result<(), BackendError> {
        let mut st = lock(&self.state);
        let mut ports = vec![st.take_port(&self.config.ports)?];
        for _ in &spec.deployment.additional_container_ports {
            match st.take_port(&self.config.ports) {
                Ok(p) => ports.push(p),
                Err(e) => {
                    for p in ports {
                        st.ports_in_use.remove(&p);
                    }
                    return Err(e);
                }
            }
        }
        let exposed_port = ExposedPort {
            host: self.config.host.clone(),
            name: "default".to_string(),
            port: ports[0],
            transport_type: spec.deployment.transport_type,
        };
        let additional: Vec<ExposedPort> = spec
            .deployment
            .additional_container_ports
            .iter()
            .zip(&ports[1..])
            .map(|(cp, port)| ExposedPort {
                host: self.config.host.clone(),
                name: cp.name.clone(),
                port: *port,
                transport_type: cp.transport_type,
            })
            .collect();
        let never_ready = rand::random::<f64>() < self.config.never_ready_ratio;
        let crashes = rand::random::<f64>() < self.config.crash_ratio;
        let (delay, crash_after) = (self.config.start_delay, self.config.crash_after);
        let pid = spec.process_id;
        let state = Arc::clone(&self.state);
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if never_ready {
                return;
            }
            let events = {
                let mut st = lock(&state);
                let Some(p) = st.processes.get_mut(&pid) else {
                    return;
                };
                p.bound = Some((exposed_port.clone(), additional.clone()));
                p.events.clone()
            };
            events.bound(pid, exposed_port, additional);
            if crashes {
                tokio::time::sleep(crash_after).await;
                if let Some(p) = lock(&state).release(pid) {
                    p.events.exited(pid, ExitStatus::Code(1));
                }
            }
        });
        st.processes.insert(
            pid,
            SimProcess {
                ports,
                task,
                events: spec.events,
                bound: None,
            },
        );
        Ok(())
    }

    fn adopt(&self, spec: AdoptSpec) {
        let p = &spec.process;
        {
            // Kept across the restart (an embedder reusing the backend): report to the new
            // scheduler from now on, and repeat a bind it may have missed.
            let mut st = lock(&self.state);
            if let Some(known) = st.processes.get_mut(&p.process_id) {
                known.events = spec.events.clone();
                if let (crate::core::types::ProcessStatus::Starting, Some((port, more))) =
                    (p.status, known.bound.clone())
                {
                    spec.events.bound(p.process_id, port, more);
                }
                return;
            }
        }
        if p.status == crate::core::types::ProcessStatus::Starting {
            // It had not bound yet: it starts over.
            let start = StartSpec {
                process_id: p.process_id,
                app_id: p.app_id.clone(),
                region: p.region.clone(),
                deployment: spec.deployment,
                initial_room: None,
                events: spec.events.clone(),
            };
            if let Err(e) = self.start(start) {
                tracing::warn!(process_id = %p.process_id, %e, "simulated process could not start again");
                spec.events.exited(p.process_id, ExitStatus::Code(1));
            }
            return;
        }
        let ports: Vec<u16> = p
            .exposed_port
            .iter()
            .chain(&p.additional_exposed_ports)
            .map(|e| e.port)
            .collect();
        let mut st = lock(&self.state);
        st.ports_in_use.extend(ports.iter().copied());
        let process = SimProcess {
            ports,
            task: tokio::spawn(async {}),
            events: spec.events,
            bound: p
                .exposed_port
                .clone()
                .map(|e| (e, p.additional_exposed_ports.clone())),
        };
        st.processes.insert(p.process_id, process);
    }

    fn stop(&self, process_id: ProcessId, _grace: Duration) {
        // A simulated process honours SIGTERM at once.
        let Some(p) = lock(&self.state).release(process_id) else {
            return;
        };
        p.task.abort();
        p.events.exited(process_id, ExitStatus::Signal(15));
    }
}
