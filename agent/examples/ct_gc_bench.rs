//! The conntrack garbage collector at scale: fills the dataplane's TCP table
//! with `--entries` entries (pinned in a scratch bpffs directory, as the
//! agent's maps are), half of them dead flows, then times one read-only walk
//! (the baseline: what any collector must pay) and one collection (walk +
//! deletes) side by side, with the CPU time of each. Run as root by
//! `cargo xtask bench --gc` (or `cargo run --release -p ferry --example
//! ct_gc_bench -- --entries 1000000`).
use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    EbpfLoader,
};
use ferry_agent::{ct, dataplane::DATAPLANE_OBJ};
use ferry_common::{ct_flags, CtKey, CtValue, RevNat, CT_DIR_FORWARD, CT_DIR_REPLY, CT_TCP_MAP, PROTO_TCP};

/// User plus system CPU time of this process, in seconds.
fn cpu_seconds() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let entries: u32 = match args.iter().position(|a| a == "--entries") {
        Some(i) => args.get(i + 1).context("--entries N")?.parse()?,
        None => 1_000_000,
    };
    let dir = PathBuf::from(format!("/sys/fs/bpf/ferry-gc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&dir, entries);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(dir: &std::path::Path, entries: u32) -> Result<()> {
    let _ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .map_max_entries(CT_TCP_MAP, entries)
        .load(DATAPLANE_OBJ)
        .context("loading the dataplane object (root and bpffs needed)")?;
    let mut table: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(dir.join(CT_TCP_MAP))?))?;
    let now = ct::monotonic_ns();
    let flows = entries / 2;
    let fill = Instant::now();
    for i in 0..flows {
        // Every other flow expired an hour ago; the rest live for a day.
        let expires = if i % 2 == 0 {
            now.saturating_sub(3_600_000_000_000)
        } else {
            now + 86_400_000_000_000
        };
        let client = 0x0a00_0000 | i;
        let v = CtValue {
            expires,
            rev_nat_id: 1,
            flags: ct_flags::REPLIED,
            backend_addr: 0x0a63_0001,
            backend_port: 80,
            nat_port: 1000,
            ..Default::default()
        };
        let fwd = CtKey {
            saddr: client,
            daddr: 0x0a60_000a,
            sport: 1000,
            dport: 80,
            proto: PROTO_TCP,
            dir: CT_DIR_FORWARD,
            _pad: [0; 2],
        };
        let rep = CtKey {
            saddr: 0x0a63_0001,
            daddr: client,
            sport: 80,
            dport: 1000,
            proto: PROTO_TCP,
            dir: CT_DIR_REPLY,
            _pad: [0; 2],
        };
        table.insert(
            fwd,
            CtValue {
                flags: v.flags | ct_flags::SERVICE,
                ..v
            },
            0,
        )?;
        table.insert(rep, CtValue { nat_addr: client, ..v }, 0)?;
    }
    eprintln!("filled {} entries in {:.1}s", flows * 2, fill.elapsed().as_secs_f64());
    let revnat: BTreeMap<u16, RevNat> = [(
        1,
        RevNat {
            addr: 0x0a60_000a,
            port: 80,
            _pad: 0,
        },
    )]
    .into();
    let mut tables = ct::Tables::open(dir)?;

    let (cpu, t) = (cpu_seconds(), Instant::now());
    let (all, _) = tables.read();
    let (walk_s, walk_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    let walked = all.len();
    drop(all);

    let (cpu, t) = (cpu_seconds(), Instant::now());
    let (left, deleted) = tables.collect(&revnat);
    let (gc_s, gc_cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    anyhow::ensure!(
        deleted == u64::from(flows),
        "deleted {deleted}, expected the {flows} dead entries"
    );
    anyhow::ensure!(left[0] == u64::from(flows), "{} left, expected {flows}", left[0]);

    println!("| conntrack GC, {walked} entries (half dead) | wall s | CPU s | entries walked/s | dead deleted/s | vs walk only |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| walk only (baseline) | {walk_s:.2} | {walk_cpu:.2} | {:.0} | - | 1.00x |",
        walked as f64 / walk_s
    );
    println!(
        "| collect (walk + delete) | {gc_s:.2} | {gc_cpu:.2} | {:.0} | {:.0} | {:.2}x |",
        walked as f64 / gc_s,
        deleted as f64 / gc_s,
        gc_s / walk_s
    );
    Ok(())
}
