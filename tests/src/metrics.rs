//! The agent's metrics as tests and the benchmark read them: one sample's
//! value, and the sync counters they wait on (instead of the agent's log).
use anyhow::{Context as _, Result};

/// A sample's value by its full name (with labels, as exposed), if present.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A histogram's exact sum and count (`NAME_sum`, `NAME_count`), if present:
/// the difference of two readings around one event is that event's value.
pub fn histogram(text: &str, name: &str) -> Option<(f64, u64)> {
    let sum = sample(text, &format!("{name}_sum"))?;
    let count = sample(text, &format!("{name}_count"))?;
    Some((sum, count as u64))
}

/// The agent's sync counters (`/metrics/agent`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Syncs {
    /// Syncs after a change of the input (a file, an API object, a relist,
    /// the node's addresses), the first one included.
    pub after_change: u64,
    /// Periodic resyncs.
    pub periodic: u64,
    /// Syncs that wrote to the maps (the "maps synced" log line).
    pub writes: u64,
    /// Frontends the last sync programmed.
    pub frontends: u64,
    /// When the last sync completed, by the agent's clock (Unix seconds; 0
    /// before the first): lets a waiter time a sync to the agent's own
    /// moment of completion, whatever its polling interval.
    pub last_sync_s: f64,
}

impl Syncs {
    pub const AFTER_CHANGE: &str = "ferry_sync_proxy_rules_total{trigger=\"change\"}";
    pub const PERIODIC: &str = "ferry_sync_proxy_rules_total{trigger=\"periodic\"}";
    pub const WRITES: &str = "ferry_sync_proxy_rules_writes_total";
    pub const FRONTENDS: &str = "ferry_frontends";
    pub const LAST_SYNC: &str = "ferry_sync_proxy_rules_last_timestamp_seconds";

    /// From a metrics exposition; an error names the sample it lacks.
    pub fn parse(text: &str) -> Result<Self> {
        let get = |name: &str| {
            sample(text, name)
                .map(|v| v as u64)
                .with_context(|| format!("no sample {name} in the agent's metrics:\n{text}"))
        };
        Ok(Self {
            after_change: get(Self::AFTER_CHANGE)?,
            periodic: get(Self::PERIODIC)?,
            writes: get(Self::WRITES)?,
            frontends: get(Self::FRONTENDS)?,
            last_sync_s: sample(text, Self::LAST_SYNC).unwrap_or(0.0),
        })
    }

    /// The sync generation: every completed sync (`ferry status` counts the
    /// same).
    pub fn generation(&self) -> u64 {
        self.after_change + self.periodic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP ferry_sync_proxy_rules_total Completed syncs\n\
        # TYPE ferry_sync_proxy_rules_total counter\n\
        ferry_sync_proxy_rules_total{trigger=\"change\"} 3\n\
        ferry_sync_proxy_rules_total{trigger=\"periodic\"} 1\n\
        ferry_sync_proxy_rules_writes_total 2\n\
        ferry_frontends 30003\n\
        ferry_frontends_other 7\n\
        ferry_sync_proxy_rules_last_timestamp_seconds 1796327794.123456\n";

    #[test]
    fn a_histogram_reads_as_its_exact_sum_and_count() {
        let text = "h_bucket{le=\"0.001\"} 2\nh_sum 0.0035\nh_count 3\nother_sum 9\n";
        assert_eq!(histogram(text, "h"), Some((0.0035, 3)));
        assert_eq!(histogram(text, "other"), None, "a sum without a count is no histogram");
    }

    #[test]
    fn sync_counters_parse_and_sum() {
        let s = Syncs::parse(TEXT).unwrap();
        assert_eq!(
            s,
            Syncs {
                after_change: 3,
                periodic: 1,
                writes: 2,
                frontends: 30003,
                last_sync_s: 1_796_327_794.123_456,
            }
        );
        assert_eq!(s.generation(), 4);
        assert_eq!(sample(TEXT, "ferry_frontends_other"), Some(7.0));
        let e = Syncs::parse("ferry_frontends 1\n").unwrap_err().to_string();
        assert!(e.contains(Syncs::AFTER_CHANGE), "{e}");
    }
}
