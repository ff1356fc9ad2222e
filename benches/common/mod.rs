//! Shared by the benches.

use roomsched::backend::{Backend, BackendError, ProcessEvents, StartSpec};
use roomsched::{ExposedPort, ProcessId, TransportType};
use std::time::Duration;

/// Processes bind the moment they start; nothing else. Keeps the backend out of the numbers.
pub(crate) struct InstantBackend;

impl Backend for InstantBackend {
    fn name(&self) -> &'static str {
        "instant"
    }

    fn start(&self, spec: StartSpec) -> Result<(), BackendError> {
        let port = ExposedPort {
            host: "127.0.0.1".into(),
            name: "default".into(),
            port: 7777,
            transport_type: TransportType::Tcp,
        };
        ProcessEvents::bound(&spec.events, spec.process_id, port, vec![]);
        Ok(())
    }

    fn stop(&self, _process_id: ProcessId, _grace: Duration) {}
}
