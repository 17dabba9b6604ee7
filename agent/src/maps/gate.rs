//! The frontend gate of from_pod: which destinations may be frontends, so
//! that every other packet a Pod sends (Pod to Pod, or a connection socket LB
//! already pointed at a backend) skips the forward conntrack and services
//! lookups and pays only the reply lookup (`ferry_common::config::FRONTEND_GATE`).
//!
//! A destination may be a frontend when it is inside the service CIDR
//! (`--service-cluster-ip-range`: every ClusterIP the API server allocates,
//! and every one it ever allocated, so flows to a deleted Service keep their
//! translation) or in the gate's map: the frontend addresses outside the
//! CIDR (ExternalIPs, LoadBalancer IPs, NodePort addresses, ClusterIPs out
//! of range), and those that stopped being frontends less than the longest
//! connection-tracking lifetime ago, because their flows run on after the
//! Service is gone, as with kube-proxy. The map is pinned: an address still
//! held there at a restart lingers from the restart on. When the gate was
//! never on (a fresh map, or pins of a version without it), the forward
//! flows already tracked name the addresses that must linger, and the gate
//! is turned on only after its first write.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::MapError;
use ferry_common::{addr_from_map, addr_to_map, config, CtKey, CT_DIR_FORWARD, DEFAULT_FRONTEND_ADDRS_MAX};
use ipnet::Ipv4Net;

use super::{
    defs::{Config, FrontendAddrs},
    table::{pinned, OpenError, Table},
};

/// What the gate's map should hold, and how the service CIDR reads in the
/// config array (wire order; mask 0: no CIDR).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub addrs: BTreeSet<Ipv4Addr>,
    pub cidr: (u32, u32),
    /// More addresses than the map holds: the gate must stay off (every
    /// destination is looked up, as without it).
    pub overflow: bool,
}

/// The gate's memory: the service CIDR and the addresses lingering after
/// they stopped being frontends.
#[derive(Debug)]
pub struct Gate {
    cidr: Option<Ipv4Net>,
    linger: Duration,
    capacity: usize,
    /// Address → when it stopped being a frontend (or was found lingering).
    leaving: BTreeMap<Ipv4Addr, Instant>,
}

impl Gate {
    /// `linger`: the longest connection-tracking lifetime.
    pub fn new(cidr: Option<Ipv4Net>, linger: Duration) -> Self {
        Self {
            cidr,
            linger,
            capacity: DEFAULT_FRONTEND_ADDRS_MAX as usize,
            leaving: BTreeMap::new(),
        }
    }

    fn in_cidr(&self, a: Ipv4Addr) -> bool {
        self.cidr.is_some_and(|c| c.contains(&a))
    }

    /// Addresses that must linger from `now` on (tracked flows' frontends
    /// when the gate was never on); those inside the CIDR need no entry.
    pub fn linger_from(&mut self, addrs: impl IntoIterator<Item = Ipv4Addr>, now: Instant) {
        for a in addrs {
            if !self.in_cidr(a) {
                self.leaving.entry(a).or_insert(now);
            }
        }
    }

    /// What the map should hold now, given what it `held` and the frontend
    /// addresses of this translation.
    pub fn plan(
        &mut self,
        held: &BTreeSet<Ipv4Addr>,
        frontends: impl IntoIterator<Item = IpAddr>,
        now: Instant,
    ) -> Plan {
        let current: BTreeSet<Ipv4Addr> = frontends
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) if !self.in_cidr(a) => Some(a),
                _ => None,
            })
            .collect();
        for a in held.difference(&current) {
            self.leaving.entry(*a).or_insert(now);
        }
        self.leaving.retain(|a, since| {
            !current.contains(a)
                && !self.cidr.is_some_and(|c| c.contains(a))
                && now.duration_since(*since) < self.linger
        });
        let addrs: BTreeSet<Ipv4Addr> = current.into_iter().chain(self.leaving.keys().copied()).collect();
        let cidr = self.cidr.map_or((0, 0), |c| {
            (addr_to_map(c.network().octets()), addr_to_map(c.netmask().octets()))
        });
        Plan {
            overflow: addrs.len() > self.capacity,
            addrs,
            cidr,
        }
    }
}

/// The gate's maps, opened from the pins.
pub struct GateMaps {
    addrs: Table<FrontendAddrs>,
    config: Table<Config>,
}

impl GateMaps {
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            addrs: pinned::<FrontendAddrs>(dir)?,
            config: pinned::<Config>(dir)?,
        })
    }

    pub fn held(&self) -> Result<BTreeSet<Ipv4Addr>, MapError> {
        Ok(self
            .addrs
            .read()?
            .into_keys()
            .map(|a| Ipv4Addr::from(addr_from_map(a)))
            .collect())
    }

    /// Whether the gate is on (the agent wrote it before).
    pub fn is_on(&self) -> Result<bool, MapError> {
        Ok(self.config.kernel()?.get(&config::FRONTEND_GATE, 0)? != 0)
    }

    /// Writes `plan` in an order that never lets a frontend's packet skip
    /// its lookups: new addresses first, then the CIDR, then removals; the
    /// gate goes on last (or off first, on overflow).
    pub fn write(&mut self, held: &BTreeSet<Ipv4Addr>, plan: &Plan) -> Result<(), MapError> {
        if plan.overflow {
            return self.config.put(&config::FRONTEND_GATE, &0);
        }
        for a in plan.addrs.difference(held) {
            self.addrs.put(&addr_to_map(a.octets()), &1)?;
        }
        self.config.put(&config::SERVICE_CIDR_ADDR, &plan.cidr.0)?;
        self.config.put(&config::SERVICE_CIDR_MASK, &plan.cidr.1)?;
        for a in held.difference(&plan.addrs) {
            self.addrs.del(&addr_to_map(a.octets()))?;
        }
        self.config.put(&config::FRONTEND_GATE, &1)
    }
}

/// The frontend addresses of tracked flows (their forward entries'
/// destinations), for a gate that was never on.
pub fn tracked_frontends(flows: &[(CtKey, ferry_common::CtValue)]) -> BTreeSet<Ipv4Addr> {
    flows
        .iter()
        .filter(|(k, _)| k.dir == CT_DIR_FORWARD)
        .map(|(k, _)| Ipv4Addr::from(addr_from_map(k.daddr)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn gate() -> Gate {
        Gate::new(Some("10.96.0.0/12".parse().unwrap()), Duration::from_secs(100))
    }

    #[test]
    fn only_frontends_outside_the_service_cidr_take_an_entry() {
        let mut g = gate();
        let t0 = Instant::now();
        let p = g.plan(
            &BTreeSet::new(),
            [ip("10.96.0.10"), ip("192.0.2.7"), ip("10.0.0.1"), ip("fd00::1")],
            t0,
        );
        assert_eq!(p.addrs, [v4("10.0.0.1"), v4("192.0.2.7")].into());
        assert_eq!(p.cidr, (addr_to_map([10, 96, 0, 0]), addr_to_map([255, 240, 0, 0])));
        assert!(!p.overflow);
    }

    #[test]
    fn an_address_that_stops_being_a_frontend_lingers_for_the_longest_flow_lifetime() {
        let mut g = gate();
        let t0 = Instant::now();
        let p = g.plan(&BTreeSet::new(), [ip("192.0.2.7")], t0);
        let held = p.addrs;
        // The ExternalIP goes: its flows may live on, so it stays.
        let p = g.plan(&held, [], t0 + Duration::from_secs(10));
        assert_eq!(p.addrs, [v4("192.0.2.7")].into());
        let p = g.plan(&held, [], t0 + Duration::from_secs(109));
        assert_eq!(p.addrs, [v4("192.0.2.7")].into());
        let p = g.plan(&held, [], t0 + Duration::from_secs(111));
        assert!(p.addrs.is_empty(), "{p:?}");
        // Back as a frontend before it expired: no longer leaving.
        let mut g = gate();
        g.plan(&held, [], t0);
        let p = g.plan(&held, [ip("192.0.2.7")], t0 + Duration::from_secs(50));
        let p = g.plan(&p.addrs, [ip("192.0.2.7")], t0 + Duration::from_secs(500));
        assert_eq!(p.addrs, [v4("192.0.2.7")].into());
    }

    #[test]
    fn what_the_map_held_at_a_restart_lingers_from_the_restart_on() {
        let mut g = gate();
        let t0 = Instant::now();
        let held: BTreeSet<Ipv4Addr> = [v4("192.0.2.7"), v4("192.0.2.8")].into();
        let p = g.plan(&held, [ip("192.0.2.8")], t0);
        assert_eq!(p.addrs, held);
        assert!(g.plan(&held, [ip("192.0.2.8")], t0 + Duration::from_secs(101)).addrs == [v4("192.0.2.8")].into());
    }

    #[test]
    fn a_gate_never_on_keeps_the_frontends_of_tracked_flows() {
        let mut g = gate();
        let t0 = Instant::now();
        let fwd = |daddr: [u8; 4], dir| {
            (
                CtKey {
                    daddr: addr_to_map(daddr),
                    dir,
                    ..CtKey::default()
                },
                ferry_common::CtValue::default(),
            )
        };
        let flows = [
            fwd([192, 0, 2, 9], CT_DIR_FORWARD),
            fwd([10, 96, 0, 3], CT_DIR_FORWARD),
            fwd([10, 244, 0, 5], ferry_common::CT_DIR_REPLY),
        ];
        g.linger_from(tracked_frontends(&flows), t0);
        let p = g.plan(&BTreeSet::new(), [], t0);
        assert_eq!(
            p.addrs,
            [v4("192.0.2.9")].into(),
            "a reply's destination is a client, not a frontend"
        );
    }

    #[test]
    fn more_addresses_than_the_map_holds_keep_the_gate_off() {
        let mut g = gate();
        g.capacity = 2;
        let p = g.plan(
            &BTreeSet::new(),
            [ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3")],
            Instant::now(),
        );
        assert!(p.overflow);
    }

    #[test]
    fn without_a_service_cidr_every_frontend_takes_an_entry() {
        let mut g = Gate::new(None, Duration::from_secs(1));
        let p = g.plan(&BTreeSet::new(), [ip("10.96.0.10")], Instant::now());
        assert_eq!(p.addrs, [v4("10.96.0.10")].into());
        assert_eq!(p.cidr, (0, 0));
    }
}
