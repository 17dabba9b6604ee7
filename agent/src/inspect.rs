//! `ferry svc list` and `ferry ct list`: what the dataplane uses, read from the
//! pinned maps (not from the agent's memory).
use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::Result;
use ferry_common::{
    addr_from_map, backend_flags, ct_flags, port_from_map, svc_flags, ServiceKey, CT_DIR_FORWARD,
};
use serde::Serialize;

use crate::{
    maps::{kernel, MapStore as _},
    translate::proto_name,
};

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub name: String,
    pub frontend: String,
    pub protocol: &'static str,
    pub flags: Vec<&'static str>,
    pub backends: Vec<String>,
}

fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_from_map(a))
}

/// The Services programmed in the maps under `dir`.
pub fn services(dir: &Path) -> Result<Vec<ServiceRow>> {
    let c = kernel::KernelMaps::from_pins(dir)?.read_all()?;
    let mut rows = Vec::new();
    for (k, v) in c.services.iter().filter(|(k, _)| k.slot == 0) {
        let name = c.names.get(&v.rev_nat_id).map(|n| n.as_str().to_string()).unwrap_or_default();
        let mut backends = Vec::new();
        for slot in 1..=v.count {
            let sk = ServiceKey { slot, ..*k };
            let b = c.services.get(&sk).and_then(|s| c.backends.get(&s.backend_id));
            backends.push(match b {
                Some(b) => {
                    let term = if b.flags & backend_flags::TERMINATING != 0 { " (terminating)" } else { "" };
                    format!("{}:{}{term}", ip(b.addr), port_from_map(b.port))
                }
                None => format!("<slot {slot} missing>"),
            });
        }
        let mut flags = vec![];
        for (bit, name) in [
            (svc_flags::CLUSTER_IP, "ClusterIP"),
            (svc_flags::NODE_PORT, "NodePort"),
            (svc_flags::EXTERNAL_IP, "ExternalIP"),
            (svc_flags::LOAD_BALANCER, "LoadBalancer"),
            (svc_flags::TERMINATING_FALLBACK, "terminating-fallback"),
        ] {
            if v.flags & bit != 0 {
                flags.push(name);
            }
        }
        rows.push(ServiceRow {
            name,
            frontend: format!("{}:{}", ip(k.addr), port_from_map(k.port)),
            protocol: proto_name(k.proto),
            flags,
            backends,
        });
    }
    rows.sort_by(|a, b| (&a.name, &a.frontend).cmp(&(&b.name, &b.frontend)));
    Ok(rows)
}

pub fn print_services(rows: &[ServiceRow]) -> String {
    let mut out = format!("{:<32} {:<22} {:<5} {:<10} BACKENDS\n", "SERVICE", "FRONTEND", "PROTO", "TYPE");
    for r in rows {
        let backends = if r.backends.is_empty() { "<none>".to_string() } else { r.backends.join(", ") };
        let _ = writeln!(out, "{:<32} {:<22} {:<5} {:<10} {}", r.name, r.frontend, r.protocol, r.flags.join(","), backends);
    }
    out
}

#[derive(Debug, Serialize)]
pub struct CtRow {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub source: String,
    pub destination: String,
    /// Forward: the backend chosen; reply: the frontend restored.
    pub nat: String,
    pub backend_id: u32,
    pub flags: Vec<&'static str>,
    pub idle_seconds: f64,
}

/// Connection-tracking entries under `dir`.
pub fn connections(dir: &Path) -> Result<Vec<CtRow>> {
    let entries = kernel::read_ct(dir)?;
    let c = kernel::KernelMaps::from_pins(dir)?.read_all()?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0);
    let mut rows = Vec::new();
    for (k, v) in entries {
        let forward = k.dir == CT_DIR_FORWARD;
        let nat = if forward {
            c.backends
                .get(&v.backend_id)
                .map(|b| format!("{}:{}", ip(b.addr), port_from_map(b.port)))
                .unwrap_or_else(|| format!("backend {} (gone)", v.backend_id))
        } else {
            c.revnat
                .get(&v.rev_nat_id)
                .map(|r| format!("{}:{}", ip(r.addr), port_from_map(r.port)))
                .unwrap_or_else(|| format!("frontend {} (gone)", v.rev_nat_id))
        };
        let mut flags = vec![];
        for (bit, name) in [(ct_flags::SNAT, "hairpin-snat"), (ct_flags::CLOSING, "closing")] {
            if v.flags & bit != 0 {
                flags.push(name);
            }
        }
        rows.push(CtRow {
            direction: if forward { "forward" } else { "reply" },
            protocol: proto_name(k.proto),
            source: format!("{}:{}", ip(k.saddr), port_from_map(k.sport)),
            destination: format!("{}:{}", ip(k.daddr), port_from_map(k.dport)),
            nat,
            backend_id: v.backend_id,
            flags,
            idle_seconds: now.saturating_sub(v.last_seen) as f64 / 1e9,
        });
    }
    rows.sort_by(|a, b| (a.direction, &a.source, &a.destination).cmp(&(b.direction, &b.source, &b.destination)));
    Ok(rows)
}

pub fn print_connections(rows: &[CtRow]) -> String {
    let mut out = format!(
        "{:<8} {:<5} {:<22} {:<22} {:<24} {:>7} FLAGS\n",
        "DIR", "PROTO", "SOURCE", "DESTINATION", "NAT (BACKEND/FRONTEND)", "IDLE"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<8} {:<5} {:<22} {:<22} {:<24} {:>6.1}s {}",
            r.direction, r.protocol, r.source, r.destination, r.nat, r.idle_seconds, r.flags.join(",")
        );
    }
    out
}
