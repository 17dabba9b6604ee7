//! `ferry status` as a human reads it.
use std::fmt::Write as _;

use super::Status;

fn or_dash(s: Option<&str>) -> &str {
    s.filter(|s| !s.is_empty()).unwrap_or("-")
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

/// The status as sections of `KEY: value` lines and small tables.
pub fn print(s: &Status) -> String {
    let mut out = String::new();
    let verdict = if s.healthy { "OK" } else { "UNHEALTHY" };
    let _ = writeln!(out, "Health:      {verdict}");
    agent(&mut out, s);
    sync(&mut out, s);
    let _ = writeln!(out, "Pin dir:     {}", s.bpffs_dir.display());
    if let Some(c) = &s.services {
        let _ = writeln!(
            out,
            "Services:    {} services, {} frontends, {} backends",
            c.services, c.frontends, c.backends
        );
    }
    programs(&mut out, s);
    maps(&mut out, s);
    if !s.drops.is_empty() {
        let drops: Vec<String> = s.drops.iter().map(|d| format!("{}={}", d.name, d.value)).collect();
        let _ = writeln!(out, "Drops:       {}", drops.join(" "));
    }
    if !s.features.is_empty() {
        let f: Vec<String> = s
            .features
            .iter()
            .map(|f| match (f.available, f.detail.is_empty()) {
                (true, true) => f.name.clone(),
                (true, false) => format!("{} {}", f.name, f.detail),
                (false, _) => format!("{} MISSING", f.name),
            })
            .collect();
        let _ = writeln!(out, "Kernel:      {}", f.join(", "));
    }
    for p in &s.problems {
        let _ = writeln!(out, "PROBLEM:     {p}");
    }
    for w in &s.warnings {
        let _ = writeln!(out, "WARNING:     {w}");
    }
    out
}

fn agent(out: &mut String, s: &Status) {
    let a = &s.agent;
    let state = match (a.running, a.reporting) {
        (false, _) => "not running".to_string(),
        (true, false) => format!(
            "running (PID {}), not reporting",
            or_dash(a.pid.map(|p| p.to_string()).as_deref())
        ),
        (true, true) => format!(
            "running (PID {}), version {}, up {}",
            or_dash(a.pid.map(|p| p.to_string()).as_deref()),
            or_dash(a.version.as_deref()),
            duration(a.uptime_seconds.unwrap_or(0.0))
        ),
    };
    let _ = writeln!(out, "Agent:       {state}");
    if let Some(mode) = &a.mode {
        let api = if a.api.is_empty() {
            String::new()
        } else if a.api.iter().all(|w| w.listed && w.error.is_none()) {
            ", API connected (every watch listed)".to_string()
        } else {
            ", API: some watches failing or not listed (see below)".to_string()
        };
        let _ = writeln!(out, "Mode:        {mode}{api}");
    }
    if let Some(lb) = &a.socket_lb {
        let _ = writeln!(out, "Socket LB:   {lb}");
    }
}

fn sync(out: &mut String, s: &Status) {
    let Some(y) = &s.sync else { return };
    let last = match (&y.last_success, y.age_seconds) {
        (Some(t), Some(age)) => format!("{t} ({} ago)", duration(age)),
        _ => "never".to_string(),
    };
    let _ = writeln!(out, "Last sync:   {last}, generation {}", y.generation);
    if let Some(e) = &y.last_error {
        let _ = writeln!(out, "Sync error:  {e}");
    }
}

fn programs(out: &mut String, s: &Status) {
    let _ = writeln!(out, "Programs:");
    if s.programs.is_empty() {
        let _ = writeln!(out, "  <none attached>");
        return;
    }
    let _ = writeln!(out, "  {:<24} {:<12} {:<16} STATE", "INTERFACE", "HOOK", "PROGRAM");
    for p in &s.programs {
        let state = match &p.error {
            None => "attached".to_string(),
            Some(e) => format!("ERROR: {e}"),
        };
        let _ = writeln!(out, "  {:<24} {:<12} {:<16} {state}", p.interface, p.hook, p.program);
    }
}

fn maps(out: &mut String, s: &Status) {
    if s.maps.is_empty() {
        return;
    }
    let _ = writeln!(out, "Maps:");
    let _ = writeln!(
        out,
        "  {:<20} {:<14} {:>9} {:>9} {:>6}",
        "NAME", "TYPE", "ENTRIES", "MAX", "FILL"
    );
    for m in &s.maps {
        let entries = m.entries.map_or("-".to_string(), |n| n.to_string());
        let fill = m.percent.map_or("-".to_string(), |p| format!("{p:.0}%"));
        let flag = match (&m.error, m.warning) {
            (Some(e), _) => format!("  ERROR: {e}"),
            (None, true) => "  WARNING".to_string(),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<20} {:<14} {entries:>9} {:>9} {fill:>6}{flag}",
            m.name, m.type_, m.max
        );
    }
}
