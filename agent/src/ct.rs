//! Connection tracking from the agent's side: the flows' states, and the
//! garbage collector that deletes dead flows from the dataplane's tables.
//!
//! The dataplane (`dataplane-ebpf/src/ct.rs`) keeps two entries per flow and
//! pushes each entry's `expires` out on every packet by the lifetime of the
//! flow's state. A flow is dead when a closing entry has expired, or when both
//! of its entries have; the dataplane already treats a dead flow as absent,
//! and the collector here deletes both entries, on a period that shortens as
//! the tables fill (as Cilium's CT GC does). It counts the entries of each
//! table as it walks them, so `/metrics` never walks a table itself.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use ferry_common::{ct_flags, CtKey, CtValue, RevNat, CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_TCP};

use crate::maps::{
    defs::{CtAny, CtTcp},
    kernel::{self, OpenError},
    table::pinned,
};

/// CLOCK_MONOTONIC in nanoseconds: the dataplane's `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A flow's state as its entry records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// TCP, no answer from the backend yet.
    SynSent,
    Established,
    /// TCP after a FIN or RST in this entry's direction.
    Closing,
    /// UDP, no answer from the backend yet.
    Unreplied,
    /// UDP the backend answered.
    Replied,
}

impl State {
    pub fn of(k: &CtKey, v: &CtValue) -> Self {
        let replied = v.flags & ct_flags::REPLIED != 0;
        match (k.proto == PROTO_TCP, replied) {
            (true, _) if v.flags & ct_flags::CLOSING != 0 => State::Closing,
            (true, true) => State::Established,
            (true, false) => State::SynSent,
            (false, true) => State::Replied,
            (false, false) => State::Unreplied,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            State::SynSent => "syn-sent",
            State::Established => "established",
            State::Closing => "closing",
            State::Unreplied => "unreplied",
            State::Replied => "replied",
        }
    }
}

fn expired(v: &CtValue, now: u64) -> bool {
    now > v.expires
}

/// The other entry of the flow `(k, v)` belongs to: the reply key of a
/// forward entry, the forward key of a reply entry (through the frontend of
/// its reverse-NAT id). The same derivations as the dataplane's.
fn partner_key(k: &CtKey, v: &CtValue, revnat: &BTreeMap<u16, RevNat>) -> Option<CtKey> {
    if k.dir == CT_DIR_FORWARD {
        let snat = v.flags & ct_flags::SNAT != 0;
        return Some(CtKey {
            saddr: v.backend_addr,
            daddr: if snat { v.nat_addr } else { k.saddr },
            sport: v.backend_port,
            dport: v.nat_port,
            proto: k.proto,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        });
    }
    let frontend = revnat.get(&v.rev_nat_id)?;
    Some(CtKey {
        saddr: v.nat_addr,
        daddr: frontend.addr,
        sport: v.nat_port,
        dport: frontend.port,
        proto: k.proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    })
}

/// The keys of the dead flows in `entries` at `now` (both entries of each):
/// a flow is dead when one of its entries is closing and expired, or when
/// all of its entries have expired. An entry's partner counts only if it
/// points back (its tuple may have been taken by another flow since).
pub fn dead_keys(entries: &BTreeMap<CtKey, CtValue>, revnat: &BTreeMap<u16, RevNat>, now: u64) -> BTreeSet<CtKey> {
    let mut dead = BTreeSet::new();
    for (k, v) in entries.iter().filter(|(_, v)| expired(v, now)) {
        let partner = partner_key(k, v, revnat).and_then(|pk| {
            let pv = entries.get(&pk)?;
            (partner_key(&pk, pv, revnat) == Some(*k)).then_some((pk, pv))
        });
        let closing = v.flags & ct_flags::CLOSING != 0;
        if closing || partner.is_none_or(|(_, pv)| expired(pv, now)) {
            dead.insert(*k);
            if let Some((pk, _)) = partner {
                dead.insert(pk);
            }
        }
    }
    dead
}

/// How long until the next collection: longer while little is collected
/// (up to 5 minutes), shorter when much is (down to 1 s), and never longer
/// than the tables' fill allows (`fill`: entries over size of the fuller).
pub fn next_interval(prev: Duration, fill: f64, deleted_ratio: f64) -> Duration {
    let next = if deleted_ratio > 0.25 {
        prev / 2
    } else if deleted_ratio < 0.05 {
        prev.mul_f64(1.5)
    } else {
        prev
    };
    let cap = match fill {
        f if f >= 0.9 => Duration::from_secs(1),
        f if f >= 0.75 => Duration::from_secs(5),
        f if f >= 0.5 => Duration::from_secs(15),
        _ => GC_MAX_INTERVAL,
    };
    next.clamp(GC_MIN_INTERVAL, cap)
}

const GC_MIN_INTERVAL: Duration = Duration::from_secs(1);
const GC_MAX_INTERVAL: Duration = Duration::from_secs(300);
const GC_FIRST_INTERVAL: Duration = Duration::from_secs(10);

/// The sizes of the two tables (`--ct-map-size`, `--ct-any-map-size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub tcp: u32,
    pub any: u32,
}

/// What the collector saw on its last run, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GcStats {
    /// Entries of the TCP and the any-table after the run.
    pub tcp_entries: u64,
    pub any_entries: u64,
    /// Entries deleted since the agent started.
    pub deleted: u64,
    pub runs: u64,
    /// How long the last run took.
    pub last_duration: Duration,
}

/// The collector's report, shared with the metrics.
pub type GcReport = Arc<Mutex<Option<GcStats>>>;

/// Both tables, opened from their pins.
pub struct Tables {
    tcp: HashMap<MapData, CtKey, CtValue>,
    any: HashMap<MapData, CtKey, CtValue>,
}

impl Tables {
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            tcp: pinned::<CtTcp>(dir)?.into_kernel()?,
            any: pinned::<CtAny>(dir)?.into_kernel()?,
        })
    }

    /// Every entry of both tables (entries that vanish mid-walk are skipped),
    /// with how many each table held.
    pub fn read(&self) -> (BTreeMap<CtKey, CtValue>, [u64; 2]) {
        let mut all = BTreeMap::new();
        let mut counts = [0; 2];
        for (i, t) in [&self.tcp, &self.any].into_iter().enumerate() {
            for (k, v) in t.iter().filter_map(Result::ok) {
                all.insert(k, v);
                counts[i] += 1;
            }
        }
        (all, counts)
    }

    /// Deletes `k` from whichever table holds it if its value is still `was`
    /// (the dataplane may have re-created the entry for a new flow of the
    /// same tuple since it was read): which table (0: TCP, 1: any).
    fn delete_if_unchanged(&mut self, k: &CtKey, was: &CtValue) -> Option<usize> {
        let tables = [&mut self.tcp, &mut self.any];
        for (i, t) in tables.into_iter().enumerate() {
            if t.get(k, 0).ok().as_ref() == Some(was) {
                return t.remove(k).is_ok().then_some(i);
            }
        }
        None
    }

    /// One collection: deletes the dead flows. Returns (entries per table
    /// after the run, entries deleted).
    pub fn collect(&mut self, revnat: &BTreeMap<u16, RevNat>) -> ([u64; 2], u64) {
        let (entries, mut counts) = self.read();
        let dead = dead_keys(&entries, revnat, monotonic_ns());
        let mut deleted = 0;
        for k in &dead {
            if let Some(table) = self.delete_if_unchanged(k, &entries[k]) {
                deleted += 1;
                counts[table] = counts[table].saturating_sub(1);
            }
        }
        (counts, deleted)
    }
}

/// Runs the collector until the agent stops: the first run at once (a
/// restarted agent finds what expired while it was away), then on the
/// adaptive period. Runs on a blocking thread: a walk of a million entries
/// takes seconds of syscalls.
pub async fn run_gc(dir: PathBuf, sizes: Sizes, report: GcReport) {
    let mut interval = GC_FIRST_INTERVAL;
    let mut total = 0u64;
    let mut runs = 0u64;
    loop {
        let d = dir.clone();
        let outcome = tokio::task::spawn_blocking(move || -> Result<_, OpenError> {
            let started = Instant::now();
            let revnat = kernel::read_revnat(&d)?;
            let (counts, deleted) = Tables::open(&d)?.collect(&revnat);
            Ok((counts, deleted, started.elapsed()))
        })
        .await;
        match outcome {
            Ok(Ok((counts, deleted, took))) => {
                total += deleted;
                runs += 1;
                let fill = (counts[0] as f64 / f64::from(sizes.tcp.max(1)))
                    .max(counts[1] as f64 / f64::from(sizes.any.max(1)));
                let before = counts[0] + counts[1] + deleted;
                // A walk of a million entries costs seconds of CPU: at most a
                // fifth of a core goes to collecting, however full the tables.
                interval = next_interval(interval, fill, deleted as f64 / before.max(1) as f64).max(took * 4);
                tracing::debug!(
                    tcp = counts[0],
                    any = counts[1],
                    deleted,
                    took_ms = took.as_millis() as u64,
                    next_s = interval.as_secs_f64(),
                    "conntrack GC"
                );
                *report.lock().unwrap_or_else(|e| e.into_inner()) = Some(GcStats {
                    tcp_entries: counts[0],
                    any_entries: counts[1],
                    deleted: total,
                    runs,
                    last_duration: took,
                });
            }
            Ok(Err(e)) => tracing::warn!("conntrack GC: {e}"),
            Err(e) => tracing::warn!("conntrack GC task: {e}"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::{addr_to_map, port_to_map, PROTO_UDP};

    const S: u64 = 1_000_000_000;
    const CLIENT: [u8; 4] = [10, 244, 0, 2];
    const BACKEND: [u8; 4] = [10, 244, 1, 5];
    const VIP: [u8; 4] = [10, 96, 0, 10];

    fn revnat() -> BTreeMap<u16, RevNat> {
        [(
            7,
            RevNat {
                addr: addr_to_map(VIP),
                port: port_to_map(80),
                _pad: 0,
            },
        )]
        .into()
    }

    /// Both entries of a flow from CLIENT:`sport` to VIP:80 balanced to
    /// BACKEND:8080, the forward one expiring at `fwd_exp`, the reply one at
    /// `rep_exp`, with `flags` on both.
    fn flow(proto: u8, sport: u16, fwd_exp: u64, rep_exp: u64, flags: u16) -> [(CtKey, CtValue); 2] {
        let v = |dir_flags, nat_addr, nat_port, expires| CtValue {
            expires,
            backend_id: 3,
            rev_nat_id: 7,
            flags: flags | dir_flags,
            nat_addr,
            nat_port,
            backend_addr: addr_to_map(BACKEND),
            backend_port: port_to_map(8080),
            ..Default::default()
        };
        let fwd = CtKey {
            saddr: addr_to_map(CLIENT),
            daddr: addr_to_map(VIP),
            sport: port_to_map(sport),
            dport: port_to_map(80),
            proto,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        let rep = CtKey {
            saddr: addr_to_map(BACKEND),
            daddr: addr_to_map(CLIENT),
            sport: port_to_map(8080),
            dport: port_to_map(sport),
            proto,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        [
            (fwd, v(ct_flags::SERVICE, 0, port_to_map(sport), fwd_exp)),
            (rep, v(0, addr_to_map(CLIENT), port_to_map(sport), rep_exp)),
        ]
    }

    fn table(flows: &[[(CtKey, CtValue); 2]]) -> BTreeMap<CtKey, CtValue> {
        flows.iter().flatten().copied().collect()
    }

    #[test]
    fn a_flow_lives_while_either_entry_does_unless_it_is_closing() {
        let now = 1000 * S;
        let live = flow(PROTO_TCP, 40001, now + S, now + S, ct_flags::REPLIED);
        // A UDP flow only the client still sends on: its reply entry expired.
        let one_way = flow(PROTO_UDP, 40002, now + S, now - S, ct_flags::REPLIED);
        let both_expired = flow(PROTO_TCP, 40003, now - S, now - S, ct_flags::REPLIED);
        // A RST from the backend: its closing entry expired, the other not.
        let mut reset = flow(PROTO_TCP, 40004, now + 100 * S, now - S, ct_flags::REPLIED);
        reset[1].1.flags |= ct_flags::CLOSING;
        let dead = dead_keys(&table(&[live, one_way, both_expired, reset]), &revnat(), now);
        let want: BTreeSet<_> = [both_expired[0].0, both_expired[1].0, reset[0].0, reset[1].0].into();
        assert_eq!(dead, want);
    }

    #[test]
    fn an_orphan_or_a_reply_whose_tuple_moved_on_is_judged_alone() {
        let now = 1000 * S;
        let [_, orphan] = flow(PROTO_TCP, 40001, 0, now - S, 0);
        // The client reused its port: the forward entry is a new, live flow
        // to another backend port, whose reply key is not the old one.
        let [mut fwd, old_reply] = flow(PROTO_TCP, 40002, now + S, now - S, 0);
        fwd.1.backend_port = port_to_map(9090);
        let entries: BTreeMap<_, _> = [orphan, fwd, old_reply].into();
        assert_eq!(dead_keys(&entries, &revnat(), now), [orphan.0, old_reply.0].into());
        // Without the frontend (Service deleted) a reply entry has no partner.
        let [f, r] = flow(PROTO_TCP, 40003, now + S, now - S, 0);
        assert_eq!(dead_keys(&[f, r].into(), &BTreeMap::new(), now), [r.0].into());
    }

    #[test]
    fn a_dsr_flow_recorded_on_the_backends_node_lives_until_its_reply_entry_expires() {
        let now = 1000 * S;
        // Only a reply entry, without reverse-NAT id: the frontend is in it.
        let entry = |sport, expires| {
            let [_, (k, v)] = flow(PROTO_TCP, sport, 0, expires, ct_flags::DSR | ct_flags::EXTERNAL);
            (
                k,
                CtValue {
                    rev_nat_id: 0,
                    backend_id: 0,
                    nat_addr: addr_to_map([192, 168, 77, 11]),
                    nat_port: port_to_map(30080),
                    ..v
                },
            )
        };
        let (live, gone) = (entry(40001, now + S), entry(40002, now - S));
        let dead = dead_keys(&[live, gone].into(), &revnat(), now);
        assert_eq!(dead, [gone.0].into());
    }

    #[test]
    fn states_follow_the_flags() {
        let [(k, v), (rk, _)] = flow(PROTO_TCP, 1, 0, 0, 0);
        assert_eq!(State::of(&k, &v), State::SynSent);
        let replied = CtValue {
            flags: ct_flags::REPLIED,
            ..v
        };
        assert_eq!(State::of(&k, &replied), State::Established);
        assert_eq!(
            State::of(
                &rk,
                &CtValue {
                    flags: ct_flags::REPLIED | ct_flags::CLOSING,
                    ..v
                }
            ),
            State::Closing
        );
        let [(u, uv), _] = flow(PROTO_UDP, 1, 0, 0, 0);
        assert_eq!(State::of(&u, &uv), State::Unreplied);
        assert_eq!(State::of(&u, &replied), State::Replied);
    }

    #[test]
    fn the_period_shortens_as_tables_fill_or_much_is_collected() {
        let d = Duration::from_secs;
        assert_eq!(next_interval(d(10), 0.0, 0.0), d(15), "idle: back off");
        assert_eq!(next_interval(d(280), 0.1, 0.0), d(300), "at most 5 minutes");
        assert_eq!(next_interval(d(10), 0.1, 0.5), d(5), "much collected: sooner");
        assert_eq!(next_interval(d(2), 0.1, 0.9), d(1), "at least a second");
        assert_eq!(next_interval(d(300), 0.6, 0.1), d(15));
        assert_eq!(next_interval(d(300), 0.8, 0.1), d(5));
        assert_eq!(next_interval(d(300), 0.95, 0.1), d(1), "nearly full: every second");
    }
}
