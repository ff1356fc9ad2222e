//! Conversions between protobuf messages and domain types, in one place. Incoming enums that
//! are unknown are refused with INVALID_ARGUMENT; UNSPECIFIED means "the default" where the
//! proto says so.

use super::pb;
use crate::core::types::*;
use crate::{Error, Result};
use chrono::{DateTime, Utc};

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn from_timestamp(field: &'static str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(u32::MAX)).ok_or_else(
        || Error::InvalidArgument {
            field,
            reason: "timestamp out of range".into(),
        },
    )
}

/// A process id from the wire. A malformed id names no process: NOT_FOUND, after the app id
/// has been checked (so a bad app id is still INVALID_ARGUMENT).
pub fn process_id(app_id: &str, s: &str) -> Result<ProcessId> {
    crate::core::validate_app_id(app_id)?;
    ProcessId::parse_str(s).map_err(|_| Error::NotFound(format!("process {s:?} not found")))
}

pub fn process_status(s: ProcessStatus) -> pb::ProcessStatus {
    match s {
        ProcessStatus::Starting => pb::ProcessStatus::Starting,
        ProcessStatus::Running => pb::ProcessStatus::Running,
        ProcessStatus::Draining => pb::ProcessStatus::Draining,
        ProcessStatus::Stopping => pb::ProcessStatus::Stopping,
        ProcessStatus::Stopped => pb::ProcessStatus::Stopped,
        ProcessStatus::Failed => pb::ProcessStatus::Failed,
    }
}

pub fn from_process_status(v: i32) -> Result<ProcessStatus> {
    match pb::ProcessStatus::try_from(v) {
        Ok(pb::ProcessStatus::Starting) => Ok(ProcessStatus::Starting),
        Ok(pb::ProcessStatus::Running) => Ok(ProcessStatus::Running),
        Ok(pb::ProcessStatus::Draining) => Ok(ProcessStatus::Draining),
        Ok(pb::ProcessStatus::Stopping) => Ok(ProcessStatus::Stopping),
        Ok(pb::ProcessStatus::Stopped) => Ok(ProcessStatus::Stopped),
        Ok(pb::ProcessStatus::Failed) => Ok(ProcessStatus::Failed),
        Ok(pb::ProcessStatus::Unspecified) | Err(_) => Err(Error::InvalidArgument {
            field: "statuses",
            reason: format!("{v} is not a process status"),
        }),
    }
}

pub fn transport(t: TransportType) -> pb::TransportType {
    match t {
        TransportType::Tcp => pb::TransportType::Tcp,
        TransportType::Udp => pb::TransportType::Udp,
        TransportType::Tls => pb::TransportType::Tls,
    }
}

/// UNSPECIFIED means TCP.
pub fn from_transport(field: &'static str, v: i32) -> Result<TransportType> {
    match pb::TransportType::try_from(v) {
        Ok(pb::TransportType::Unspecified | pb::TransportType::Tcp) => Ok(TransportType::Tcp),
        Ok(pb::TransportType::Udp) => Ok(TransportType::Udp),
        Ok(pb::TransportType::Tls) => Ok(TransportType::Tls),
        Err(_) => Err(Error::InvalidArgument {
            field,
            reason: format!("{v} is not a transport type"),
        }),
    }
}

pub fn strategy(s: PlacementStrategy) -> pb::PlacementStrategy {
    match s {
        PlacementStrategy::MostFree => pb::PlacementStrategy::MostFree,
        PlacementStrategy::FewestFree => pb::PlacementStrategy::FewestFree,
    }
}

/// UNSPECIFIED means MOST_FREE.
pub fn from_strategy(v: i32) -> Result<PlacementStrategy> {
    match pb::PlacementStrategy::try_from(v) {
        Ok(pb::PlacementStrategy::Unspecified | pb::PlacementStrategy::MostFree) => {
            Ok(PlacementStrategy::MostFree)
        }
        Ok(pb::PlacementStrategy::FewestFree) => Ok(PlacementStrategy::FewestFree),
        Err(_) => Err(Error::InvalidArgument {
            field: "placement_strategy",
            reason: format!("{v} is not a placement strategy"),
        }),
    }
}

pub fn room_status(s: RoomStatus) -> pb::RoomStatus {
    match s {
        RoomStatus::Scheduling => pb::RoomStatus::Scheduling,
        RoomStatus::Active => pb::RoomStatus::Active,
        RoomStatus::Destroyed => pb::RoomStatus::Destroyed,
    }
}

pub fn exposed_port(p: ExposedPort) -> pb::ExposedPort {
    pb::ExposedPort {
        host: p.host,
        name: p.name,
        port: u32::from(p.port),
        transport_type: transport(p.transport_type).into(),
    }
}

fn exposed_ports(ps: Vec<ExposedPort>) -> Vec<pb::ExposedPort> {
    ps.into_iter().map(exposed_port).collect()
}

pub fn process(p: Process) -> pb::Process {
    pb::Process {
        process_id: p.process_id.to_string(),
        app_id: p.app_id,
        deployment_id: p.deployment_id,
        region: p.region,
        status: process_status(p.status).into(),
        rooms_per_process: p.rooms_per_process,
        rooms_allocated: p.rooms_allocated,
        exposed_port: p.exposed_port.map(exposed_port),
        additional_exposed_ports: exposed_ports(p.additional_exposed_ports),
        created_at: Some(timestamp(p.created_at)),
        started_at: p.started_at.map(timestamp),
        stopping_at: p.stopping_at.map(timestamp),
        terminated_at: p.terminated_at.map(timestamp),
        summary_exit_reason: p.summary_exit_reason,
        log_path: p.log_path.unwrap_or_default(),
    }
}

pub fn allocation(a: RoomAllocation) -> pb::RoomAllocation {
    pb::RoomAllocation {
        room_allocation_id: a.room_allocation_id.to_string(),
        process_id: a.process_id.to_string(),
        scheduled_at: Some(timestamp(a.scheduled_at)),
        unscheduled_at: a.unscheduled_at.map(timestamp),
    }
}

pub fn room(r: Room) -> pb::Room {
    pb::Room {
        app_id: r.app_id,
        room_id: r.room_id,
        room_config: r.room_config,
        status: room_status(r.status).into(),
        current_allocation: r.current_allocation.map(allocation),
        allocations: r.allocations.into_iter().map(allocation).collect(),
    }
}

/// One page of a process's rooms: `page_size` 0 = all of them; the token is an offset.
pub fn rooms_page(
    rs: Vec<Room>,
    page_size: u32,
    page_token: &str,
) -> Result<pb::ListRoomsResponse> {
    let start = match page_token {
        "" => 0,
        t => t.parse::<usize>().map_err(|_| Error::InvalidArgument {
            field: "page_token",
            reason: "not a token returned by this list".into(),
        })?,
    };
    let size = match page_size {
        0 => usize::MAX,
        n => (n as usize).min(crate::core::MAX_PAGE_SIZE),
    };
    let end = start.saturating_add(size).min(rs.len());
    let next_page_token = if end < rs.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok(pb::ListRoomsResponse {
        rooms: rs
            .into_iter()
            .skip(start)
            .take(end.saturating_sub(start))
            .map(room)
            .collect(),
        next_page_token,
    })
}

pub fn placement(p: RoomPlacement) -> pb::CreateRoomResponse {
    pb::CreateRoomResponse {
        room_id: p.room_id,
        process_id: p.process_id.to_string(),
        status: room_status(p.status).into(),
        exposed_port: p.exposed_port.map(exposed_port),
        additional_exposed_ports: exposed_ports(p.additional_exposed_ports),
    }
}

pub fn connection_info(c: ConnectionInfo) -> pb::ConnectionInfo {
    pb::ConnectionInfo {
        room_id: c.room_id,
        process_id: c.process_id.to_string(),
        status: match c.status {
            ConnectionStatus::Starting => pb::ConnectionStatus::Starting,
            ConnectionStatus::Active => pb::ConnectionStatus::Active,
        }
        .into(),
        exposed_port: c.exposed_port.map(exposed_port),
        additional_exposed_ports: exposed_ports(c.additional_exposed_ports),
    }
}

pub fn deployment(d: Deployment) -> pb::Deployment {
    pb::Deployment {
        app_id: d.app_id,
        deployment_id: d.deployment_id,
        rooms_per_process: d.rooms_per_process,
        transport_type: transport(d.transport_type).into(),
        container_port: u32::from(d.container_port),
        additional_container_ports: d
            .additional_container_ports
            .into_iter()
            .map(|p| pb::ContainerPort {
                name: p.name,
                port: u32::from(p.port),
                transport_type: transport(p.transport_type).into(),
            })
            .collect(),
        idle_timeout_enabled: d.idle_timeout_enabled,
        env: d
            .env
            .into_iter()
            .map(|e| pb::EnvVar {
                name: e.name,
                value: e.value,
            })
            .collect(),
        command: d.command,
        placement_strategy: strategy(d.placement_strategy).into(),
        created_at: Some(timestamp(d.created_at)),
    }
}

impl TryFrom<pb::CreateDeploymentRequest> for DeploymentSpec {
    type Error = Error;

    fn try_from(r: pb::CreateDeploymentRequest) -> Result<Self> {
        let additional_container_ports = r
            .additional_container_ports
            .into_iter()
            .map(|p| {
                Ok(ContainerPort {
                    name: p.name,
                    port: u16::try_from(p.port)
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| Error::InvalidArgument {
                            field: "additional_container_ports",
                            reason: format!("port {} is outside 1-65535", p.port),
                        })?,
                    transport_type: from_transport("additional_container_ports", p.transport_type)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(DeploymentSpec {
            rooms_per_process: r.rooms_per_process,
            transport_type: from_transport("transport_type", r.transport_type)?,
            container_port: r.container_port,
            additional_container_ports,
            idle_timeout_enabled: r.idle_timeout_enabled,
            env: r
                .env
                .into_iter()
                .map(|e| EnvVar {
                    name: e.name,
                    value: e.value,
                })
                .collect(),
            command: r.command,
            placement_strategy: from_strategy(r.placement_strategy)?,
        })
    }
}

impl From<pb::CreateRoomRequest> for CreateRoom {
    fn from(r: pb::CreateRoomRequest) -> Self {
        CreateRoom {
            app_id: r.app_id,
            region: r.region,
            room_config: r.room_config,
            room_id: Some(r.room_id).filter(|id| !id.is_empty()),
            deployment_id: Some(r.deployment_id).filter(|d| *d != 0),
        }
    }
}

pub fn process_filter(
    app_id: String,
    statuses: &[i32],
    regions: Vec<String>,
) -> Result<ProcessFilter> {
    Ok(ProcessFilter {
        app_id,
        statuses: statuses
            .iter()
            .map(|s| from_process_status(*s))
            .collect::<Result<_>>()?,
        regions,
    })
}

pub fn region_policy(app_id: String, region: String, p: RegionPolicy) -> pb::RegionPolicy {
    pb::RegionPolicy {
        app_id,
        region,
        min_processes: p.min_processes,
        buffer_rooms: p.buffer_rooms,
        max_processes: p.max_processes,
    }
}

pub fn region_usage(u: RegionUsage) -> pb::RegionUsage {
    pb::RegionUsage {
        region: u.region,
        billed_process_seconds: u.billed_process_seconds,
        rooms_created: u.rooms_created,
        peak_processes: u.peak_processes,
    }
}
