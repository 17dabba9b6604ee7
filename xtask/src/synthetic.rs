//! A per-packet figure that the machine's noise hardly moves: the running
//! agent's own programs, on its own maps (N Services programmed), run by the
//! kernel on crafted frames with BPF_PROG_TEST_RUN, which reports the
//! nanoseconds per run itself. Three figures per frontend kind:
//! - a new flow's first packet (service lookup, backend choice, two
//!   connection-tracking entries, NAT): the mean over [`NEW_FLOWS`] flows,
//!   each from its own source port;
//! - a packet of that flow once tracked (the established path);
//! - a packet no Service matches (Pod to Pod, or to a node port nobody
//!   serves): what every other packet pays for passing through Ferry.
//!
//! Each run is one BPF_PROG_TEST_RUN with repeat 1: the kernel runs a
//! repeated test on the same buffer, which the first run rewrites, so the
//! later runs would measure the translated packet instead. The figures are
//! means over [`RUNS`] runs (new flows: [`NEW_FLOWS`], one per source port).
//!
//! Every translated run is checked: its frame must come out addressed to one
//! of the Service's backends, or the figure is refused.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd as _,
};

use anyhow::{bail, Context as _, Result};
use ferry_common::{PROG_XDP_FROM_NETDEV, PROTO_TCP};
use ferry_tests::testrun::{self, ACK, SYN};

/// New flows measured per round.
pub const NEW_FLOWS: u16 = 256;
/// Runs of one frame averaged.
pub const RUNS: u32 = 2_000;
/// TC_ACT_SHOT: a dropped packet is no measure of a forwarded one.
const TC_ACT_SHOT: u32 = 2;
/// XDP_PASS: XDP left the packet to TC (see dataplane-ebpf/src/xdp.rs).
const XDP_PASS: u32 = 2;

/// What to run and on what.
pub struct Probe<'a> {
    /// The agent's process (its programs are found by id).
    pub agent_pid: u32,
    /// The network namespace the agent's node is (routes and neighbours for
    /// the programs' FIB lookups).
    pub netns: &'a str,
    /// The program's name: from_pod, from_netdev or xdp_from_netdev.
    pub program: &'a str,
    /// Where clients come from (source ports are chosen here).
    pub client: Ipv4Addr,
    /// The frontend dialed.
    pub frontend: SocketAddrV4,
    /// The Service's backends: a translated frame must go to one of them.
    pub backends: Vec<SocketAddrV4>,
    /// A destination no Service matches, for the untranslated figure.
    pub untranslated: SocketAddrV4,
}

/// Nanoseconds per packet.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    pub new_flow_ns: f64,
    pub established_ns: f64,
    pub untranslated_ns: f64,
}

/// Runs the probe's frames on the agent's program (in the node's namespace).
pub fn measure(p: &Probe) -> Result<Figures> {
    let info = crate::bpfstats::programs_of(p.agent_pid)?
        .into_iter()
        .find(|i| i.name_as_str() == Some(p.program))
        .with_context(|| format!("the agent (pid {}) has no program {}", p.agent_pid, p.program))?;
    let fd = info.fd().with_context(|| format!("opening program {}", p.program))?;
    let xdp = p.program == PROG_XDP_FROM_NETDEV;
    let (client, frontend, backends, untranslated, program) = (
        p.client,
        p.frontend,
        p.backends.clone(),
        p.untranslated,
        p.program.to_string(),
    );
    ferry_tests::in_netns(p.netns, move || -> Result<Figures> {
        let run = |frame: &[u8]| {
            testrun::run(fd.as_fd(), frame, 1).with_context(|| format!("BPF_PROG_TEST_RUN on {program}"))
        };
        let translated = |r: &testrun::Run, what: &str| -> Result<()> {
            let to = destination(&r.frame);
            if xdp && r.verdict == XDP_PASS {
                bail!(
                    "{program} passed the {what} to TC (verdict {}): no XDP figure",
                    r.verdict
                );
            }
            if r.verdict == TC_ACT_SHOT && !xdp || !to.is_some_and(|t| backends.contains(&t)) {
                bail!(
                    "{program}: the {what} to {frontend} came out with verdict {} to {to:?}, not to a backend ({backends:?})",
                    r.verdict
                );
            }
            Ok(())
        };
        let port = |k: u16| SocketAddrV4::new(client, 40_000 + k);
        let mut new_ns = 0u64;
        for k in 0..NEW_FLOWS {
            let r = run(&tcp(port(k), frontend, SYN))?;
            translated(&r, "first packet of a new flow")?;
            new_ns += u64::from(r.ns_per_run);
        }
        let tracked = tcp(port(0), frontend, ACK);
        let other = tcp(port(0), untranslated, ACK);
        let (mut tracked_ns, mut other_ns) = (0u64, 0u64);
        for _ in 0..RUNS {
            let r = run(&tracked)?;
            translated(&r, "packet of a tracked flow")?;
            tracked_ns += u64::from(r.ns_per_run);
            let r = run(&other)?;
            if destination(&r.frame) != Some(untranslated) {
                bail!("{program}: the packet to {untranslated} came out changed");
            }
            other_ns += u64::from(r.ns_per_run);
        }
        Ok(Figures {
            new_flow_ns: new_ns as f64 / f64::from(NEW_FLOWS),
            established_ns: tracked_ns as f64 / f64::from(RUNS),
            untranslated_ns: other_ns as f64 / f64::from(RUNS),
        })
    })?
}

/// A TCP segment `src` → `dst` with `flags` (the test frames' builder).
fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    let f = testrun::frame(
        PROTO_TCP,
        src.ip().octets(),
        dst.ip().octets(),
        src.port(),
        dst.port(),
        false,
    );
    testrun::with_flags(f, flags)
}

/// Where a frame made by [`tcp`] (and rewritten by a program) is addressed.
fn destination(frame: &[u8]) -> Option<SocketAddrV4> {
    let l4 = 14 + usize::from(*frame.get(14)? & 0x0f) * 4;
    let p = (frame.len() >= l4.max(34) + 4).then(|| testrun::parse(frame))?;
    Some(SocketAddrV4::new(p.dst.into(), p.dport))
}
