//! Map fill in /metrics, read at scrape time like `ferry status` reads it:
//! `ferry_map_entries{map}` and `ferry_map_max_entries{map}` for every pinned
//! map whose entries come and go (arrays are always full and left out), but
//! the connection-tracking tables.
use std::path::PathBuf;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{gauge::ConstGauge, MetricType},
};

use super::kernel_view::{maps, MapRow};

#[derive(Debug)]
pub struct MapFillCollector {
    pub dir: PathBuf,
}

impl Collector for MapFillCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The connection-tracking tables are left out: they can hold
        // millions of entries, and the garbage collector counts them as it
        // walks (ferry_conntrack_entries{table}).
        let rows: Vec<MapRow> = maps(&self.dir)
            .into_iter()
            .filter(|m| m.entries.is_some() && !ferry_common::CT_MAPS.contains(&m.name.as_str()))
            .collect();
        for (name, help, pick) in [
            (
                "ferry_map_entries",
                "Entries in a pinned BPF map, by map",
                (|m: &MapRow| i64::from(m.entries.unwrap_or(0))) as fn(&MapRow) -> i64,
            ),
            (
                "ferry_map_max_entries",
                "Size (max_entries) of a pinned BPF map, by map",
                |m: &MapRow| i64::from(m.max),
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for m in &rows {
                let labels = [("map", m.name.as_str())];
                ConstGauge::new(pick(m)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
