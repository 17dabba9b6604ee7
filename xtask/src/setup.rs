//! `cargo xtask setup`: installs what is missing, says what it does, and does nothing
//! (in seconds) when everything is there. The recipe is shared/notes/toolchain.md.
use std::process::Command;

use anyhow::{bail, Result};

use crate::run_cmd;

/// Debian packages: the eBPF toolchain (Debian's rustc with library sources, LLVM 22
/// for bpf-linker) and the tools the lab and the tests use.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc with -Z build-std support for the eBPF crate"),
    ("cargo-web", "cargo matching rustc-web"),
    ("rust-web-src", "library sources for -Z build-std=core"),
    ("llvm-22-dev", "LLVM for bpf-linker"),
    ("libpolly-22-dev", "needed to link bpf-linker against LLVM 22"),
    ("libzstd-dev", "needed to link bpf-linker"),
    ("zlib1g-dev", "needed to link bpf-linker"),
    ("libxml2-dev", "needed to link bpf-linker"),
    ("iproute2", "ip: network namespaces and veths for the lab"),
    ("procps", "sysctl inside the lab's namespaces"),
    ("iputils-ping", "ping in the lab"),
    ("bpftool", "inspecting maps and programs"),
    ("curl", "HTTP client for the lab"),
    ("socat", "TCP/UDP client for the lab"),
    ("iptables", "kube-proxy's iptables rules, the benchmark's baseline"),
    ("nftables", "kube-proxy's nftables rules, the benchmark's baseline"),
    ("conntrack", "inspecting netfilter connection tracking in the benchmark"),
    (
        "ethtool",
        "the multi-node lab's underlay sends full checksums, like a wire",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const EBPF_TOOLCHAIN: &str = "bpf-web";

pub fn run() -> Result<()> {
    crate::require_root()?;
    println!("xtask setup: checking what is installed");
    apt_packages()?;
    ebpf_toolchain()?;
    bpf_linker()?;
    println!("xtask setup: everything is in place");
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!("  ok   Debian packages ({} present)", PACKAGES.len());
        return Ok(());
    }
    for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        println!("  +    installing {p}: {why}");
    }
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q"])
        .args(&missing);
    run_cmd(&mut install)
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

/// Debian's rustc, linked into rustup so aya-build can `rustup run bpf-web cargo`.
fn ebpf_toolchain() -> Result<()> {
    let list = Command::new("rustup").args(["toolchain", "list"]).output();
    let Ok(list) = list else {
        bail!("rustup not found: the machine's Rust toolchain is expected to come with rustup");
    };
    if String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.starts_with(EBPF_TOOLCHAIN))
    {
        println!("  ok   rustup toolchain {EBPF_TOOLCHAIN} (Debian's rustc at /usr/bin)");
        return Ok(());
    }
    println!("  +    linking Debian's rustc (/usr) into rustup as {EBPF_TOOLCHAIN}");
    run_cmd(Command::new("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"]))
}

fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = version {
        if out.status.success() {
            println!("  ok   {}", String::from_utf8_lossy(&out.stdout).trim());
            return Ok(());
        }
    }
    println!("  +    building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    run_cmd(&mut cmd)
}
