//! Prints a generated ruleset, for looking at it or timing the tools by hand:
//! `cargo run -p ferry-bench --example rules -- iptables|nft|yaml N`.
use std::net::Ipv4Addr;

use anyhow::{bail, Context as _, Result};
use ferry_bench::{iptables, manifests, nftables, scenario::Scenario};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, n] = args.as_slice() else {
        bail!("usage: rules iptables|nft|yaml N")
    };
    let n: usize = n.parse().context("N")?;
    let real: Vec<Ipv4Addr> = (0..10).map(|i| Ipv4Addr::new(10, 244, 0, 10 + i)).collect();
    let s = Scenario::new(n, 10, &real)?;
    match kind.as_str() {
        "iptables" => print!("{}", iptables::ruleset(&s, iptables::Mode::Initial, &[])),
        "nft" => print!("{}", nftables::ruleset(&s, &[])),
        "yaml" => manifests::files(&s).into_iter().for_each(|(_, y)| print!("{y}")),
        other => bail!("unknown kind {other}"),
    }
    Ok(())
}
