//! Machine-wide CPU accounting from /proc/stat: busy time (everything but idle
//! and iowait, so softirq packet processing counts) between two readings.
//! Hardware counters (`perf stat -e instructions`) are not available on every
//! machine, this is.
use std::fs;

/// Cumulative busy and total CPU time, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

impl CpuTimes {
    pub fn now() -> Option<Self> {
        parse(&fs::read_to_string("/proc/stat").ok()?)
    }

    /// Busy seconds from `self` to `later`.
    pub fn busy_secs_until(&self, later: &CpuTimes) -> f64 {
        later.busy.saturating_sub(self.busy) as f64 / ticks_per_sec()
    }
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Parses the aggregate "cpu" line: user nice system idle iowait irq softirq steal.
pub fn parse(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_aggregate_line() {
        let s = "cpu  10 1 5 100 4 2 3 0 0 0\ncpu0 5 0 2 50 2 1 1 0 0 0\n";
        assert_eq!(parse(s), Some(CpuTimes { busy: 21, total: 125 }));
        assert_eq!(parse("intr 1 2 3"), None);
        assert_eq!(parse("cpu  x y"), None);
    }

    #[test]
    fn reads_this_machine() {
        let a = CpuTimes::now().expect("/proc/stat");
        assert!(a.total >= a.busy);
    }
}
