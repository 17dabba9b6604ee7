//! `cargo xtask setup | build | test | run | lab`: everything from a fresh machine.
mod bench;
mod bpfstats;
mod control_plane;
mod demo;
mod demo_north_south;
mod lab;
mod setup;
mod synthetic;

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Ferry's developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, the eBPF toolchain, bpf-linker). Idempotent.
    Setup,
    /// setup, then build the agent (with the eBPF dataplane embedded).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// setup + build, then unit, packet (BPF_PROG_TEST_RUN) and netns integration tests.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// setup + build, start the lab and show Services balancing live traffic until Ctrl-C.
    Run {
        /// Exit after the demo (fails if a Service does not balance over every backend).
        #[arg(long)]
        once: bool,
    },
    /// setup + build, start the lab from lab/manifests on N nodes and keep it
    /// running until Ctrl-C (no demo traffic).
    Lab {
        /// Number of nodes: each runs its agent and shim; Pods without
        /// spec.nodeName are spread over them. 1: the single-node lab of `run`.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=188))]
        nodes: u8,
        /// Set up, print, check that every Service answers (ClusterIP from a Pod
        /// of each node, NodePort from the external client), then remove
        /// everything and exit (fails if a check fails).
        #[arg(long)]
        once: bool,
    },
    /// setup + release build, then Ferry against kube-proxy's iptables and nftables
    /// rules and against no NAT, side by side; tables under target/bench/.
    Bench(bench::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            build(release)
        }
        Cmd::Test { filter } => {
            setup::run()?;
            build(false)?;
            test(filter.as_deref())?;
            if filter.is_none() {
                println!("xtask: the README's demo, as `cargo xtask run --once` runs it");
                demo::run(true, true)?;
                println!("xtask: the benchmark harness, `cargo xtask bench --quick` with N=1 (debug build; no timing is checked)");
                bench::run(bench::Args::harness_check())?;
                println!("xtask: the control-plane benchmark's harness, `cargo xtask bench --control-plane --quick` at N=1000 (debug build; no timing is checked)");
                bench::run(bench::Args::control_plane_check())?;
            }
            println!("xtask: all tests passed");
            Ok(())
        }
        Cmd::Run { once } => {
            setup::run()?;
            build(false)?;
            demo::run(once, true)
        }
        Cmd::Lab { nodes, once } => {
            setup::run()?;
            build(false)?;
            match nodes {
                1 => demo::run(once, false),
                n => lab::run(usize::from(n), once),
            }
        }
        Cmd::Bench(args) => {
            setup::run()?;
            bench::run(args)
        }
    }
}

/// The workspace root (xtask lives in <root>/xtask).
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .into()
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs a command, echoing it first.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    println!("xtask: $ {}", describe(cmd));
    let status = cmd.status().with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn build(release: bool) -> Result<()> {
    println!("xtask: building the ferry agent (the eBPF dataplane is built and embedded by agent/build.rs)");
    let mut cmd = cargo();
    cmd.args(["build", "--package", "ferry"]);
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)
}

fn test(filter: Option<&str>) -> Result<()> {
    require_root()?;
    let style = if filter.is_none() { style() } else { Ok(()) };
    println!("xtask: unit tests (all crates but the lab's)");
    let mut unit = cargo();
    unit.args(["test", "--workspace", "--exclude", "ferry-tests", "--no-fail-fast"]);
    unit.args(filter);
    let unit_result = run_cmd(&mut unit);
    println!("xtask: packet (BPF_PROG_TEST_RUN) and network-namespace integration tests, one at a time");
    let mut lab = cargo();
    lab.args(["test", "--package", "ferry-tests", "--no-fail-fast", "--"]);
    lab.args(filter);
    lab.arg("--test-threads=1");
    let lab_result = run_cmd(&mut lab);
    style.and(unit_result).and(lab_result)
}

/// The tree stays formatted (rustfmt.toml) and free of clippy warnings: both
/// are part of the test run, so CI fails on either. The eBPF crate is built
/// for its own target by agent/build.rs and is formatted, not linted, here.
fn style() -> Result<()> {
    let has = |tool: &str| {
        cargo()
            .args([tool, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut result = Ok(());
    if has("fmt") {
        println!("xtask: formatting (cargo fmt --all --check)");
        result = run_cmd(cargo().args(["fmt", "--all", "--check"]));
    } else {
        println!("xtask: rustfmt is not installed (rustup component add rustfmt): formatting NOT checked");
    }
    if has("clippy") {
        println!("xtask: lints (cargo clippy --workspace --all-targets -- -D warnings)");
        let lints = run_cmd(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--exclude",
            "ferry-dataplane-ebpf",
            "--",
            "-D",
            "warnings",
        ]));
        result = result.and(lints);
    } else {
        println!("xtask: clippy is not installed (rustup component add clippy): lints NOT checked");
    }
    result
}

pub fn require_root() -> Result<()> {
    // SAFETY-free check: /proc/self/status Uid line.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("");
    if euid != "0" {
        bail!("this needs root (network namespaces, BPF, apt-get); run it as root");
    }
    Ok(())
}
