//! `ferry-loadgen`: the benchmark's load generator and server.
//!
//! ```text
//! ferry-loadgen serve --tcp 8080 --udp 8080 --sink 5201 [--name NAME]
//! ferry-loadgen crr|rr|udp|stream --target IP:PORT[,IP:PORT...] [--duration S] [--workers N] [--size B]
//! ```
//! Clients print one JSON object (see `ferry_bench::loadgen::Report`).
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use ferry_bench::loadgen::{self, server, ClientOpts, Mode};

#[derive(Parser)]
#[command(name = "ferry-loadgen", about = "Ferry's benchmark load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve: TCP echo, UDP echo ("?" answers the name) and a TCP sink.
    Serve {
        #[arg(long)]
        tcp: Option<u16>,
        #[arg(long)]
        udp: Option<u16>,
        #[arg(long)]
        sink: Option<u16>,
        /// Name to answer "?" with (default: $POD_NAME, then the hostname).
        #[arg(long, env = "POD_NAME", default_value = "server")]
        name: String,
    },
    /// Measure one mode against one target and print JSON.
    #[command(flatten)]
    Client(ClientCmd),
}

#[derive(Subcommand)]
enum ClientCmd {
    /// New TCP connection per request/response.
    Crr(ClientArgs),
    /// Request/response on persistent TCP connections.
    Rr(ClientArgs),
    /// UDP request/response.
    Udp(ClientArgs),
    /// Single-stream TCP throughput into a sink.
    Stream(ClientArgs),
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Where to send (comma-separated for several: CRR rotates over them per
    /// connection, RR and UDP give each worker one, stream uses the first).
    #[arg(long, value_delimiter = ',', required = true)]
    target: Vec<SocketAddr>,
    /// Seconds (fractions allowed).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Request and response size in bytes.
    #[arg(long, default_value_t = 32)]
    size: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { tcp, udp, sink, name } => server::serve(server::ServeOpts { tcp, udp, sink, name }),
        Cmd::Client(c) => {
            let (mode, a) = match c {
                ClientCmd::Crr(a) => (Mode::Crr, a),
                ClientCmd::Rr(a) => (Mode::Rr, a),
                ClientCmd::Udp(a) => (Mode::Udp, a),
                ClientCmd::Stream(a) => (Mode::Stream, a),
            };
            let duration = Duration::try_from_secs_f64(a.duration).context("--duration")?;
            let opts = ClientOpts {
                mode,
                targets: a.target,
                duration,
                workers: a.workers,
                size: a.size,
            };
            let report = loadgen::run(&opts)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}
