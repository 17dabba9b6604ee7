//! `ferry svc list`, `ferry ct list` and `ferry counters list`: what the
//! dataplane uses and counted, read from the pinned maps (not from the agent's
//! memory), printed like `kubectl get`.
use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use ferry_common::{
    addr_from_map, backend_flags, ct_flags, port_from_map, svc_flags, Backend, ServiceKey, CT_DIR_FORWARD,
};
use serde::Serialize;

use crate::{
    ids::{self, FrontendId, FrontendKind},
    maps::{
        kernel::{self, OpenError},
        MapContents, MapStore as _,
    },
    translate::proto_name,
};

/// Errors of the inspection commands.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("reading {map}: {source}")]
    Read {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

/// One backend of a frontend, as the slots name it.
#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub slot: u16,
    /// None: the slot or the backend it names is missing (agent mid-update).
    pub id: Option<u32>,
    pub address: Option<String>,
    pub flags: Vec<&'static str>,
}

/// One frontend (Service port) in the maps.
#[derive(Debug, Serialize)]
pub struct ServiceRow {
    /// `namespace/name` (from the service-names map; empty if missing).
    pub service: String,
    /// Port name, or the port number for unnamed ports.
    pub port_name: String,
    /// ClusterIP, NodePort, ...
    #[serde(rename = "type")]
    pub type_: &'static str,
    pub frontend: String,
    pub protocol: &'static str,
    pub rev_nat_id: u16,
    pub flags: Vec<&'static str>,
    /// sessionAffinity: ClientIP timeout in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u32>,
    /// loadBalancerSourceRanges: the client prefixes this LoadBalancer frontend
    /// admits (from the source-ranges trie).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    pub backends: Vec<BackendRow>,
    /// Packets (and their bytes) sent to this frontend and translated, since the
    /// dataplane was loaded (per-CPU counters, summed).
    pub packets: u64,
    pub bytes: u64,
}

fn ip(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_from_map(a))
}

fn endpoint(b: &Backend) -> String {
    format!("{}:{}", ip(b.addr), port_from_map(b.port))
}

fn contents(dir: &Path) -> Result<MapContents, InspectError> {
    kernel::KernelMaps::from_pins(dir)?
        .read_all()
        .map_err(|source| InspectError::Read {
            map: "services/backends/revnat/names/config",
            source,
        })
}

/// The Services programmed in the maps under `dir`.
pub fn services(dir: &Path) -> Result<Vec<ServiceRow>, InspectError> {
    let c = contents(dir)?;
    // Pins from a version without per-Service counters: zeros.
    let stats = kernel::read_svc_stats_by_id(dir).unwrap_or_default();
    let mut rows = Vec::new();
    for (k, v) in c.services.iter().filter(|(k, _)| k.slot == 0) {
        let id = c.names.get(&v.rev_nat_id).and_then(|n| FrontendId::from_map(n).ok());
        let (service, port_name) = ids::service_and_port(id.as_ref());
        let backends = (1..=v.count)
            .map(|slot| {
                let id = c.services.get(&ServiceKey { slot, ..*k }).map(|s| s.backend_id);
                let b = id.and_then(|id| c.backends.get(&id));
                let mut flags = vec![];
                if b.is_some_and(|b| b.flags & backend_flags::TERMINATING != 0) {
                    flags.push("terminating");
                }
                if b.is_some_and(|b| b.flags & backend_flags::LOCAL != 0) {
                    flags.push("local");
                }
                BackendRow {
                    slot,
                    id,
                    address: b.map(endpoint),
                    flags,
                }
            })
            .collect();
        let mut flags = vec![];
        for (bit, name) in [
            (svc_flags::AFFINITY, "affinity"),
            (svc_flags::ETP_LOCAL, "etp-local"),
            (svc_flags::ITP_LOCAL, "itp-local"),
            (svc_flags::SOURCE_RANGES, "source-ranges"),
            (svc_flags::TERMINATING_FALLBACK, "terminating-fallback"),
            (svc_flags::MAGLEV, "maglev"),
            // The twin Pods and node processes use (externalTrafficPolicy: Local).
            (svc_flags::INTERNAL, "in-cluster"),
        ] {
            if v.flags & bit != 0 {
                flags.push(name);
            }
        }
        rows.push(ServiceRow {
            service,
            port_name,
            type_: FrontendKind::of_flags(v.flags).as_str(),
            frontend: format!("{}:{}", ip(k.addr), port_from_map(k.port)),
            protocol: proto_name(k.proto),
            rev_nat_id: v.rev_nat_id,
            flags,
            affinity_timeout_seconds: (v.flags & svc_flags::AFFINITY != 0).then_some(v.affinity_timeout),
            source_ranges: c
                .source_ranges
                .iter()
                .filter(|(id, _)| *id == v.rev_nat_id)
                .map(|(_, net)| net.to_string())
                .collect(),
            backends,
            packets: stats.get(&v.rev_nat_id).map_or(0, |s| s.packets),
            bytes: stats.get(&v.rev_nat_id).map_or(0, |s| s.bytes),
        });
    }
    rows.sort_by(|a, b| (&a.service, &a.port_name, &a.frontend).cmp(&(&b.service, &b.port_name, &b.frontend)));
    Ok(rows)
}

/// A table; `wide` adds ids and flags.
pub fn print_services(rows: &[ServiceRow], wide: bool) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{:<30} {:<10} {:<10} {:<21} {:<5} ",
        "SERVICE", "PORT", "TYPE", "FRONTEND", "PROTO"
    );
    if wide {
        let _ = write!(out, "{:<6} {:<20} {:>10} ", "REVNAT", "FLAGS", "PACKETS");
    }
    out.push_str("BACKENDS\n");
    for r in rows {
        let _ = write!(
            out,
            "{:<30} {:<10} {:<10} {:<21} {:<5} ",
            r.service, r.port_name, r.type_, r.frontend, r.protocol
        );
        if wide {
            let flags = if r.flags.is_empty() {
                "-".to_string()
            } else {
                r.flags.join(",")
            };
            let _ = write!(out, "{:<6} {:<20} {:>10} ", r.rev_nat_id, flags, r.packets);
        }
        let backends: Vec<String> = r
            .backends
            .iter()
            .map(|b| {
                let mut s = b
                    .address
                    .clone()
                    .unwrap_or_else(|| format!("<slot {} missing>", b.slot));
                if wide {
                    if let Some(id) = b.id {
                        let _ = write!(s, "#{id}");
                    }
                }
                if !b.flags.is_empty() {
                    let _ = write!(s, " ({})", b.flags.join(","));
                }
                s
            })
            .collect();
        let backends = if backends.is_empty() {
            "<none>".to_string()
        } else {
            backends.join(", ")
        };
        let _ = writeln!(out, "{backends}");
    }
    out
}

/// One connection-tracking entry, resolved through the other maps.
#[derive(Debug, Serialize)]
pub struct CtRow {
    pub protocol: &'static str,
    /// The client as it sent the packet.
    pub client: String,
    /// The frontend it dialled (reverse-NAT entry), or `#id (gone)`.
    pub frontend: String,
    /// The backend it was given (address:port, with ` (gone)` once the
    /// backend left every Service; established flows keep it).
    pub backend: String,
    /// `forward` (client → frontend) or `reply` (backend → client).
    pub direction: &'static str,
    /// syn-sent, established, closing (TCP); unreplied, replied (UDP).
    pub state: &'static str,
    pub flags: Vec<&'static str>,
    /// Seconds since the flow was created.
    pub age_seconds: f64,
    /// Seconds until the entry expires without traffic (0: expired, the
    /// garbage collector's to delete).
    pub expires_in_seconds: f64,
}

/// Connection-tracking entries under `dir`.
pub fn connections(dir: &Path) -> Result<Vec<CtRow>, InspectError> {
    let entries = kernel::read_ct(dir)?;
    let c = contents(dir)?;
    let now = crate::ct::monotonic_ns();
    let mut rows = Vec::new();
    for (k, v) in entries {
        let forward = k.dir == CT_DIR_FORWARD;
        // A DSR flow another node balanced to a backend here: a reply entry
        // whose value names the frontend (the client is the key's destination).
        let dsr_recorded = !forward && v.flags & ct_flags::DSR != 0 && v.rev_nat_id == 0;
        // Forward keys are the client's packet; reply values keep the client.
        let client = if forward {
            format!("{}:{}", ip(k.saddr), port_from_map(k.sport))
        } else if dsr_recorded {
            format!("{}:{}", ip(k.daddr), port_from_map(k.dport))
        } else {
            format!("{}:{}", ip(v.nat_addr), port_from_map(v.nat_port))
        };
        let frontend = if dsr_recorded {
            format!("{}:{}", ip(v.nat_addr), port_from_map(v.nat_port))
        } else {
            c.revnat
                .get(&v.rev_nat_id)
                .map(|r| format!("{}:{}", ip(r.addr), port_from_map(r.port)))
                .unwrap_or_else(|| format!("#{} (gone)", v.rev_nat_id))
        };
        let mut backend = format!("{}:{}", ip(v.backend_addr), port_from_map(v.backend_port));
        if !dsr_recorded && !c.backends.contains_key(&v.backend_id) {
            backend.push_str(" (gone)");
        }
        let mut flags = vec![];
        for (bit, name) in [
            // SNAT alone: hairpin; with north-south: to a backend on another node.
            (ct_flags::SNAT, "snat"),
            (ct_flags::EXTERNAL, "north-south"),
            (ct_flags::DSR, "dsr"),
            (ct_flags::CLOSING, "closing"),
        ] {
            if v.flags & bit != 0 {
                flags.push(name);
            }
        }
        rows.push(CtRow {
            protocol: proto_name(k.proto),
            client,
            frontend,
            backend,
            direction: if forward { "forward" } else { "reply" },
            state: crate::ct::State::of(&k, &v).name(),
            flags,
            age_seconds: now.saturating_sub(v.created) as f64 / 1e9,
            expires_in_seconds: v.expires.saturating_sub(now) as f64 / 1e9,
        });
    }
    rows.sort_by(|a, b| (&a.frontend, &a.client, a.direction).cmp(&(&b.frontend, &b.client, b.direction)));
    Ok(rows)
}

pub fn print_connections(rows: &[CtRow]) -> String {
    let mut out = format!(
        "{:<5} {:<21} {:<21} {:<28} {:<8} {:<12} {:<20} {:>9} EXPIRES-IN\n",
        "PROTO", "CLIENT", "FRONTEND", "BACKEND", "DIR", "STATE", "FLAGS", "AGE"
    );
    for r in rows {
        let flags = if r.flags.is_empty() {
            "-".to_string()
        } else {
            r.flags.join(",")
        };
        let _ = writeln!(
            out,
            "{:<5} {:<21} {:<21} {:<28} {:<8} {:<12} {:<20} {:>8.1}s {:.1}s",
            r.protocol,
            r.client,
            r.frontend,
            r.backend,
            r.direction,
            r.state,
            flags,
            r.age_seconds,
            r.expires_in_seconds
        );
    }
    out
}

/// One dataplane counter (summed over CPUs), named as in `/metrics`.
#[derive(Debug, Serialize)]
pub struct CounterRow {
    /// `drop` (ferry_dataplane_drops_total) or `packet`
    /// (ferry_dataplane_packets_total).
    pub kind: &'static str,
    pub name: &'static str,
    pub value: u64,
}

/// The dataplane's counters under `dir`.
pub fn counters(dir: &Path) -> Result<Vec<CounterRow>, InspectError> {
    let values = kernel::read_counters(dir)?;
    // Drops first, then packets.
    let mut named: Vec<ferry_common::Counter> = ferry_common::Counter::ALL.to_vec();
    named.sort_by_key(|c| c.kind() != ferry_common::CounterKind::Drop);
    Ok(named
        .into_iter()
        .map(|c| CounterRow {
            kind: c.kind().as_str(),
            name: c.name(),
            value: values.get(c as usize).copied().unwrap_or(0),
        })
        .collect())
}

pub fn print_counters(rows: &[CounterRow]) -> String {
    let mut out = format!("{:<7} {:<24} VALUE\n", "KIND", "COUNTER");
    for r in rows {
        let _ = writeln!(out, "{:<7} {:<24} {}", r.kind, r.name, r.value);
    }
    out
}
