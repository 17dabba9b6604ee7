//! The kernel's run-time statistics of Ferry's BPF programs under the
//! benchmark's load: nanoseconds spent in the programs, summed over every
//! hook a packet passes, per connection (CRR) and per program run (RR). A
//! figure of the data path's own cost that the machine's noise (other
//! processes, frequency, the loopback's scheduling) hardly moves, unlike
//! rates and latencies.
//!
//! Enabled with BPF_ENABLE_STATS for as long as the returned descriptor is
//! held (the kernel counts while any such descriptor is open), not with the
//! `kernel.bpf_stats_enabled` sysctl, which would change the machine for
//! everyone.
use std::{collections::BTreeMap, os::fd::OwnedFd};

use anyhow::{Context as _, Result};

/// Statistics on while this lives.
pub struct Enabled(#[allow(dead_code)] OwnedFd);

/// Turns the run-time statistics on (kernel 5.8+).
pub fn enable() -> Result<Enabled> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map(Enabled)
        .context("BPF_ENABLE_STATS (run time)")
}

/// Run time and run count of one program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Runs {
    pub ns: u64,
    pub count: u64,
}

/// The programs the process `pid` holds (the agent's).
pub fn programs_of(pid: u32) -> Result<Vec<aya::programs::ProgramInfo>> {
    let ids = ferry_tests::sys::prog_ids_of(pid)?;
    Ok(aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .collect())
}

/// The programs the process `pid` holds (the agent's), by id: name, runs.
pub fn of_process(pid: u32) -> Result<BTreeMap<u32, (String, Runs)>> {
    Ok(programs_of(pid)?
        .into_iter()
        .map(|p| {
            let runs = Runs {
                ns: p.run_time().as_nanos() as u64,
                count: p.run_count(),
            };
            (p.id(), (p.name_as_str().unwrap_or("?").to_string(), runs))
        })
        .collect())
}

/// What ran between two snapshots, per program name (one program on
/// several interfaces is one program; a program loaded in between counts
/// from zero).
pub fn delta_by_name(
    before: &BTreeMap<u32, (String, Runs)>,
    after: &BTreeMap<u32, (String, Runs)>,
) -> BTreeMap<String, Runs> {
    let mut out: BTreeMap<String, Runs> = BTreeMap::new();
    for (id, (name, a)) in after {
        let b = before.get(id).map(|(_, r)| *r).unwrap_or_default();
        let sum = out.entry(name.clone()).or_default();
        sum.ns += a.ns.saturating_sub(b.ns);
        sum.count += a.count.saturating_sub(b.count);
    }
    out
}

/// [`delta_by_name`] summed over the programs.
pub fn delta(before: &BTreeMap<u32, (String, Runs)>, after: &BTreeMap<u32, (String, Runs)>) -> Runs {
    delta_by_name(before, after)
        .into_values()
        .fold(Runs::default(), |s, r| Runs {
            ns: s.ns + r.ns,
            count: s.count + r.count,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_sums_what_ran_in_between_and_counts_new_programs_from_zero() {
        let r = |ns, count| Runs { ns, count };
        let before = BTreeMap::from([(1, ("from_pod".into(), r(100, 10))), (2, ("to_pod".into(), r(50, 5)))]);
        let after = BTreeMap::from([
            (1, ("from_pod".into(), r(400, 13))),
            (2, ("to_pod".into(), r(50, 5))),
            (3, ("from_netdev".into(), r(70, 2))),
        ]);
        assert_eq!(delta(&before, &after), r(370, 5));
        let by_name = delta_by_name(&before, &after);
        assert_eq!(by_name["from_pod"], r(300, 3));
        assert_eq!(by_name["to_pod"], r(0, 0));
        assert_eq!(by_name["from_netdev"], r(70, 2));
    }
}
