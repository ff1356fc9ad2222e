//! Input rules of SPEC §7. Pure functions; the scheduler calls them before it touches any
//! state, so a refused request changes nothing.

use super::error::{Error, Result};
use super::types::{ContainerPort, DeploymentSpec, RegionPolicy};
use std::collections::HashSet;

pub(crate) const MAX_ROOM_CONFIG_BYTES: usize = 10_000;
pub(crate) const MAX_ROOMS_PER_PROCESS: u32 = 10_000;
pub(crate) const MAX_ADDITIONAL_PORTS: usize = 2;
pub(crate) const MAX_ENV_VARS: usize = 100;
pub(crate) const MAX_ENV_VALUE_BYTES: usize = 5_000;
pub(crate) const MAX_COMMAND_ARGS: usize = 1_000;
pub(crate) const MAX_COMMAND_ARG_BYTES: usize = 10_000;
pub(crate) const MAX_PROCESSES_PER_REGION: u32 = 100_000;
pub(crate) const MAX_BUFFER_ROOMS: u32 = 10_000_000;

/// `^[A-Za-z0-9_-]{1,100}$`
fn is_id(s: &str) -> bool {
    (1..=100).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Shows a bad value in an error message without echoing something huge.
fn shown(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}… ({} bytes)", s.len())
    }
}

pub(crate) fn app_id(s: &str) -> Result<()> {
    if is_id(s) {
        Ok(())
    } else {
        Err(Error::invalid(
            "app_id",
            format!("{} must match ^[A-Za-z0-9_-]{{1,100}}$", shown(s)),
        ))
    }
}

pub(crate) fn room_id(s: &str) -> Result<()> {
    if is_id(s) {
        Ok(())
    } else {
        Err(Error::invalid(
            "room_id",
            format!("{} must match ^[A-Za-z0-9_-]{{1,100}}$", shown(s)),
        ))
    }
}

pub(crate) fn room_config(s: &str) -> Result<()> {
    if s.len() <= MAX_ROOM_CONFIG_BYTES {
        Ok(())
    } else {
        Err(Error::invalid(
            "room_config",
            format!(
                "{} bytes is over the limit of {MAX_ROOM_CONFIG_BYTES} bytes",
                s.len()
            ),
        ))
    }
}

/// Resolves a region name to its index in the configured set (exact, case-sensitive match).
pub(crate) fn region(regions: &[String], s: &str) -> Result<usize> {
    regions.iter().position(|r| r == s).ok_or_else(|| {
        Error::invalid(
            "region",
            format!(
                "{} is not a configured region (configured: {})",
                shown(s),
                regions.join(", ")
            ),
        )
    })
}

fn port(field: &'static str, p: u32) -> Result<u16> {
    match u16::try_from(p) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(Error::invalid(field, format!("{p} is outside 1-65535"))),
    }
}

/// `^[a-z][a-z0-9-]{0,99}$`
fn is_port_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=100).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// `^[A-Za-z_][A-Za-z0-9_]{0,99}$`
fn is_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=100).contains(&b.len())
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Checks a deployment spec; returns the main port as `u16`.
pub(crate) fn deployment(spec: &DeploymentSpec) -> Result<u16> {
    if !(1..=MAX_ROOMS_PER_PROCESS).contains(&spec.rooms_per_process) {
        return Err(Error::invalid(
            "rooms_per_process",
            format!(
                "{} is outside 1-{MAX_ROOMS_PER_PROCESS}",
                spec.rooms_per_process
            ),
        ));
    }
    let main_port = port("container_port", spec.container_port)?;
    additional_ports(&spec.additional_container_ports)?;
    if spec.env.len() > MAX_ENV_VARS {
        return Err(Error::invalid(
            "env",
            format!(
                "{} variables is over the limit of {MAX_ENV_VARS}",
                spec.env.len()
            ),
        ));
    }
    let mut env_names = HashSet::new();
    for var in &spec.env {
        if !is_env_name(&var.name) {
            return Err(Error::invalid(
                "env",
                format!(
                    "name {} must match ^[A-Za-z_][A-Za-z0-9_]{{0,99}}$",
                    shown(&var.name)
                ),
            ));
        }
        if !env_names.insert(var.name.as_str()) {
            return Err(Error::invalid(
                "env",
                format!("name {} appears twice", shown(&var.name)),
            ));
        }
        if var.value.len() > MAX_ENV_VALUE_BYTES {
            return Err(Error::invalid(
                "env",
                format!(
                    "value of {} is {} bytes, over the limit of {MAX_ENV_VALUE_BYTES}",
                    var.name,
                    var.value.len()
                ),
            ));
        }
    }
    if spec.command.len() > MAX_COMMAND_ARGS
        || spec.command.iter().any(|a| a.len() > MAX_COMMAND_ARG_BYTES)
    {
        return Err(Error::invalid(
            "command",
            format!(
                "at most {MAX_COMMAND_ARGS} arguments of at most {MAX_COMMAND_ARG_BYTES} bytes each"
            ),
        ));
    }
    Ok(main_port)
}

pub(crate) fn region_policy(p: &RegionPolicy) -> Result<()> {
    if p.max_processes > MAX_PROCESSES_PER_REGION {
        return Err(Error::invalid(
            "max_processes",
            format!(
                "{} is over the limit of {MAX_PROCESSES_PER_REGION}",
                p.max_processes
            ),
        ));
    }
    if p.min_processes > p.max_processes {
        return Err(Error::invalid(
            "min_processes",
            format!(
                "{} is more than max_processes ({})",
                p.min_processes, p.max_processes
            ),
        ));
    }
    if p.buffer_rooms > MAX_BUFFER_ROOMS {
        return Err(Error::invalid(
            "buffer_rooms",
            format!("{} is over the limit of {MAX_BUFFER_ROOMS}", p.buffer_rooms),
        ));
    }
    Ok(())
}

fn additional_ports(ports: &[ContainerPort]) -> Result<()> {
    if ports.len() > MAX_ADDITIONAL_PORTS {
        return Err(Error::invalid(
            "additional_container_ports",
            format!(
                "{} ports is over the limit of {MAX_ADDITIONAL_PORTS}",
                ports.len()
            ),
        ));
    }
    let mut names = HashSet::new();
    for p in ports {
        if !is_port_name(&p.name) || p.name == "default" {
            return Err(Error::invalid(
                "additional_container_ports",
                format!(
                    "name {} must match ^[a-z][a-z0-9-]{{0,99}}$ and not be \"default\"",
                    shown(&p.name)
                ),
            ));
        }
        if !names.insert(p.name.as_str()) {
            return Err(Error::invalid(
                "additional_container_ports",
                format!("name {} appears twice", shown(&p.name)),
            ));
        }
        port("additional_container_ports", u32::from(p.port))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::{EnvVar, TransportType};

    fn field(r: Result<impl std::fmt::Debug>) -> &'static str {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn ids_follow_the_pattern() {
        for good in ["a", "A-b_9", &"x".repeat(100)] {
            assert!(app_id(good).is_ok(), "{good}");
            assert!(room_id(good).is_ok(), "{good}");
        }
        for bad in ["", " a", "a b", "é", "a/b", "a.b", &"x".repeat(101)] {
            assert_eq!(field(app_id(bad)), "app_id", "{bad:?}");
            assert_eq!(field(room_id(bad)), "room_id", "{bad:?}");
        }
    }

    #[test]
    fn regions_match_exactly() {
        let regions = vec!["Frankfurt".to_string(), "Tokyo".to_string()];
        assert_eq!(region(&regions, "Tokyo").ok(), Some(1));
        for bad in [
            "Atlantis",
            "",
            "frankfurt",
            " Frankfurt ",
            "Frankfurt ",
            &"F".repeat(300),
        ] {
            assert_eq!(field(region(&regions, bad)), "region", "{bad:?}");
        }
    }

    #[test]
    fn region_policy_rules() {
        let ok = RegionPolicy {
            min_processes: 2,
            buffer_rooms: 6,
            max_processes: 3,
        };
        assert!(region_policy(&ok).is_ok());
        assert!(region_policy(&RegionPolicy {
            max_processes: 0,
            ..Default::default()
        })
        .is_ok());
        let bad = [
            (
                RegionPolicy {
                    min_processes: 4,
                    ..ok
                },
                "min_processes",
            ),
            (
                RegionPolicy {
                    max_processes: 100_001,
                    ..ok
                },
                "max_processes",
            ),
            (
                RegionPolicy {
                    buffer_rooms: 10_000_001,
                    ..ok
                },
                "buffer_rooms",
            ),
        ];
        for (p, expected) in bad {
            assert_eq!(field(region_policy(&p)), expected, "{p:?}");
        }
    }

    #[test]
    fn room_config_is_bounded() {
        assert!(room_config(&"x".repeat(10_000)).is_ok());
        assert_eq!(field(room_config(&"x".repeat(10_001))), "room_config");
    }

    fn spec() -> DeploymentSpec {
        DeploymentSpec {
            rooms_per_process: 4,
            container_port: 7777,
            ..Default::default()
        }
    }

    #[test]
    fn deployment_rules() {
        assert_eq!(deployment(&spec()).ok(), Some(7777));
        let cases: Vec<(DeploymentSpec, &str)> = vec![
            (
                DeploymentSpec {
                    rooms_per_process: 0,
                    ..spec()
                },
                "rooms_per_process",
            ),
            (
                DeploymentSpec {
                    rooms_per_process: 10_001,
                    ..spec()
                },
                "rooms_per_process",
            ),
            (
                DeploymentSpec {
                    container_port: 0,
                    ..spec()
                },
                "container_port",
            ),
            (
                DeploymentSpec {
                    container_port: 65_536,
                    ..spec()
                },
                "container_port",
            ),
            (
                DeploymentSpec {
                    additional_container_ports: (0..3)
                        .map(|i| ContainerPort {
                            name: format!("p{i}"),
                            port: 8000 + i,
                            transport_type: TransportType::Udp,
                        })
                        .collect(),
                    ..spec()
                },
                "additional_container_ports",
            ),
            (
                DeploymentSpec {
                    additional_container_ports: vec![ContainerPort {
                        name: "default".into(),
                        port: 8000,
                        transport_type: TransportType::Tcp,
                    }],
                    ..spec()
                },
                "additional_container_ports",
            ),
            (
                DeploymentSpec {
                    additional_container_ports: vec![ContainerPort {
                        name: "Voice".into(),
                        port: 8000,
                        transport_type: TransportType::Tcp,
                    }],
                    ..spec()
                },
                "additional_container_ports",
            ),
            (
                DeploymentSpec {
                    additional_container_ports: vec![
                        ContainerPort {
                            name: "voice".into(),
                            port: 8000,
                            transport_type: TransportType::Tcp,
                        },
                        ContainerPort {
                            name: "voice".into(),
                            port: 8001,
                            transport_type: TransportType::Tcp,
                        },
                    ],
                    ..spec()
                },
                "additional_container_ports",
            ),
            (
                DeploymentSpec {
                    additional_container_ports: vec![ContainerPort {
                        name: "voice".into(),
                        port: 0,
                        transport_type: TransportType::Tcp,
                    }],
                    ..spec()
                },
                "additional_container_ports",
            ),
            (
                DeploymentSpec {
                    env: vec![EnvVar {
                        name: "1BAD".into(),
                        value: String::new(),
                    }],
                    ..spec()
                },
                "env",
            ),
            (
                DeploymentSpec {
                    env: vec![EnvVar {
                        name: "OK".into(),
                        value: "v".repeat(5_001),
                    }],
                    ..spec()
                },
                "env",
            ),
            (
                DeploymentSpec {
                    env: (0..101)
                        .map(|i| EnvVar {
                            name: format!("V{i}"),
                            value: String::new(),
                        })
                        .collect(),
                    ..spec()
                },
                "env",
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(field(deployment(&spec)), expected, "{spec:?}");
        }
    }
}
