//! Loading the eBPF dataplane, pinning its maps, and attaching its programs as
//! interfaces come and go: `from_pod` to the Pod veths of this network
//! namespace, `from_netdev` to the node devices (`--devices`), and with
//! `--xdp` also `xdp_from_netdev` to the node devices.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::{
    programs::{
        links::{FdLink, Link as _, LinkError, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        xdp::XdpLink,
        CgroupAttachMode, CgroupSockAddr, Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    sys::SyscallError,
    Ebpf, EbpfError, EbpfLoader,
};
use ferry_common::{
    addr_to_map, config, nodeport_mode, BACKENDS_MAP, CONFIG_MAP, CT_ANY_MAP, CT_TCP_MAP, DEFAULT_MAGLEV_TABLES,
    DEFAULT_MAGLEV_TABLE_SIZE, MAGLEV_MAP, NODE_ADDRS_MAP, NODE_ADDRS_MAX, PROG_FROM_NETDEV, PROG_FROM_NETDEV_L3,
    PROG_FROM_POD, PROG_SOCK_ALL, PROG_TO_NETDEV, PROG_TO_NETDEV_L3, PROG_TO_POD, PROG_XDP_FROM_NETDEV, SERVICES_MAP,
    SOCK_LB_SKIP_MAP, SOCK_SET_RETVAL, SRC_RANGES_MAP,
};
use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage},
};
use tokio::io::{unix::AsyncFd, Interest};

use crate::{
    maps::kernel::{KernelMaps, OpenError},
    migrate::{self, MigrateError},
};

/// The eBPF object agent/build.rs built (the dataplane's programs and maps).
pub static DATAPLANE_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-dataplane"));

/// What can go wrong loading and attaching the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("mounting bpffs at {BPFFS}: {0}")]
    Mount(nix::Error),
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("loading the eBPF dataplane: {0}")]
    Load(#[from] EbpfError),
    #[error(transparent)]
    Maps(#[from] OpenError),
    #[error("checking the pinned maps against this build: {0}")]
    Migrate(#[from] MigrateError),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("{what}: {source}")]
    Program { what: String, source: ProgramError },
    #[error("{what}: {source}")]
    Link { what: String, source: LinkError },
    #[error("pinning the link at {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("listing links: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("opening the cgroup {path} (--cgroup-path): {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("writing the node settings map: {source}")]
    ConfigMap { source: aya::maps::MapError },
    #[error("writing {SOCK_LB_SKIP_MAP} (--socket-lb-skip-netns): {source}")]
    SkipMap { source: aya::maps::MapError },
    #[error("writing the node addresses map: {source}")]
    NodeAddrsMap { source: aya::maps::MapError },
}

/// An error with its causes ("attaching …: `bpf_link_create` failed:
/// Numerical result out of range"): aya's syscall errors keep the errno in
/// their source. A cause already at the end of the text is not repeated.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
        cause = c.source();
    }
    out
}

fn program(what: impl Into<String>) -> impl FnOnce(ProgramError) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Program { what, source }
}

fn link(what: impl Into<String>) -> impl FnOnce(LinkError) -> DataplaneError {
    let what = what.into();
    move |source| DataplaneError::Link { what, source }
}

/// Where and how big.
#[derive(Clone, Debug)]
pub struct Config {
    pub bpffs_dir: PathBuf,
    /// How the TC programs attach (`--tc-attach`).
    pub tc_attach: TcAttach,
    pub services_max: u32,
    pub backends_max: u32,
    pub ct: crate::ct::Sizes,
    pub src_ranges_max: u32,
    /// Maglev tables (`--maglev-table-size`, `--maglev-tables`).
    pub maglev: MaglevConfig,
}

/// The Maglev map's shape: `tables` tables of `table_size` entries (a prime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevConfig {
    pub table_size: u32,
    pub tables: u32,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        Self {
            table_size: DEFAULT_MAGLEV_TABLE_SIZE,
            tables: DEFAULT_MAGLEV_TABLES,
        }
    }
}

impl Config {
    /// The maps whose max_entries the agent sets (flags), as the loader and
    /// the migration of pinned maps both need them.
    pub fn max_entries(&self) -> [(&'static str, u32); 6] {
        [
            (SERVICES_MAP, self.services_max),
            (BACKENDS_MAP, self.backends_max),
            (CT_TCP_MAP, self.ct.tcp),
            (CT_ANY_MAP, self.ct.any),
            (SRC_RANGES_MAP, self.src_ranges_max),
            (MAGLEV_MAP, self.maglev.table_size.saturating_mul(self.maglev.tables)),
        ]
    }
}

/// Connection-tracking lifetimes, the SNAT port range and the NodePort
/// mode, as the programs read them from the node settings map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtConfig {
    pub timeout_tcp_syn: std::time::Duration,
    pub timeout_tcp: std::time::Duration,
    pub timeout_tcp_close: std::time::Duration,
    pub timeout_udp: std::time::Duration,
    pub timeout_udp_stream: std::time::Duration,
    /// Inclusive, host order.
    pub snat_ports: (u16, u16),
    pub nodeport_mode: NodePortMode,
}

/// How north-south flows reach a backend on another node (`--nodeport-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NodePortMode {
    /// SNAT to this node's address: replies come back through it
    /// (kube-proxy's behaviour).
    #[default]
    Snat,
    /// Direct server return: the backend sees the client's address and its
    /// node replies straight to the client (the frontend travels in an IPv4
    /// option). Every node must run in dsr or hybrid mode.
    Dsr,
    /// DSR for TCP, SNAT for UDP (Cilium's hybrid mode).
    Hybrid,
}

impl NodePortMode {
    /// The value of `config::NODEPORT_MODE`.
    pub fn to_map(self) -> u32 {
        match self {
            NodePortMode::Snat => nodeport_mode::SNAT,
            NodePortMode::Dsr => nodeport_mode::DSR,
            NodePortMode::Hybrid => nodeport_mode::HYBRID,
        }
    }
}

/// How `--xdp` attaches to the devices (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// Native (driver) XDP where the driver has it, generic XDP elsewhere.
    Auto,
    /// Native (driver) XDP only; TC only where the driver lacks it.
    Native,
    /// Generic (skb) XDP: works on every device, runs after the skb is built.
    Generic,
}

impl XdpAttach {
    /// The modes to try on a device, in order. Auto takes generic XDP on a
    /// veth: native XDP there can only send a frame back out (XDP_TX) when
    /// the veth's peer runs XDP or GRO itself, which the peer's namespace
    /// decides, and frames it cannot send are dropped.
    pub fn modes(self, veth: bool) -> &'static [XdpMode] {
        match self {
            XdpAttach::Auto if veth => &[XdpMode::Skb],
            XdpAttach::Auto => &[XdpMode::Driver, XdpMode::Skb],
            XdpAttach::Native => &[XdpMode::Driver],
            XdpAttach::Generic => &[XdpMode::Skb],
        }
    }
}

/// How the TC programs attach (`--tc-attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX where the kernel has it (probed once at start), netlink otherwise.
    Auto,
    /// TCX links (kernel 6.6+), pinned: a restarted agent swaps its program in.
    Tcx,
    /// A cls_bpf filter on the clsact qdisc (any kernel), at Ferry's own
    /// priority and handle: a restarted agent replaces it in place.
    Netlink,
}

/// The mechanism the TC programs attach with, once `auto` is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    Tcx,
    Netlink,
}

impl TcMode {
    /// The ingress hook's name in logs, the status report and `ferry status`.
    pub fn hook(self) -> &'static str {
        self.hook_in(TcAttachType::Ingress)
    }

    /// The hook's name for programs attached in `direction`.
    pub fn hook_in(self, direction: TcAttachType) -> &'static str {
        match (self, direction == TcAttachType::Egress) {
            (TcMode::Tcx, false) => "tcx ingress",
            (TcMode::Tcx, true) => "tcx egress",
            (TcMode::Netlink, false) => "tc ingress (netlink)",
            (TcMode::Netlink, true) => "tc egress (netlink)",
        }
    }
}

impl TcAttach {
    /// The mechanism to use: `auto` asks `has_tcx` (called at most once).
    pub fn resolve(self, has_tcx: impl FnOnce() -> bool) -> TcMode {
        match self {
            TcAttach::Tcx => TcMode::Tcx,
            TcAttach::Netlink => TcMode::Netlink,
            TcAttach::Auto if has_tcx() => TcMode::Tcx,
            TcAttach::Auto => TcMode::Netlink,
        }
    }
}

/// Whether the kernel has TCX (6.6+): a TCX query on the loopback device,
/// which attaches nothing. Kernels without TCX refuse the attach type
/// (EINVAL); on any other error the kernel version decides.
pub fn probe_tcx() -> bool {
    match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
        Ok(_) => true,
        Err(e) if matches!(os_error(&e), Some(libc::EINVAL | libc::EOPNOTSUPP)) => false,
        Err(e) => {
            use aya::util::KernelVersion;
            let at_least = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
            tracing::warn!("probing TCX: {e}; going by the kernel version (TCX: {at_least})");
            at_least
        }
    }
}

/// The errno behind an attach or query error, where there is one.
fn os_error(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(SyscallError { io_error, .. }) => io_error.raw_os_error(),
        ProgramError::TcError(TcError::NetlinkError(n)) | ProgramError::NetlinkError(n) => n.raw_os_error(),
        ProgramError::TcError(TcError::IoError(io)) => io.raw_os_error(),
        _ => None,
    }
}

/// Ferry's cls_bpf filter on clsact ingress (`--tc-attach netlink`): a
/// priority and handle of its own, so a restarted agent finds and replaces
/// its filter instead of adding a second one. Priority 16 runs before filters
/// added with tc's defaults (49152 and up); Cilium uses 1 and handle 1.
pub const NETLINK_PRIORITY: u16 = 16;
pub const NETLINK_HANDLE: u32 = 0xf3;

/// Where a program is attached (one entry program per hook, as in Cilium).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// TC ingress of the host side of a Pod's veth: traffic Pods send.
    FromPod,
    /// TC ingress of a node device: traffic from the network (replies of
    /// backends on other nodes; NodePort and friends).
    FromNetdev,
    /// XDP of a node device (`--xdp`), in front of FromNetdev.
    XdpFromNetdev,
    /// TC egress of the host side of a Pod's veth: what the node's stack
    /// sends a Pod (replies of host-network backends).
    ToPod,
    /// TC egress of a node device: what the node's stack sends out
    /// (replies of host-network backends).
    ToNetdev,
    /// FromNetdev and ToNetdev on a node device without an Ethernet header
    /// (WireGuard, TUN: an "L3 device"; no XDP there; IPIP and GRE keep their
    /// outer headers in front and are passed over).
    FromNetdevL3,
    ToNetdevL3,
}

impl Hook {
    pub const ALL: [Hook; 7] = [
        Hook::FromPod,
        Hook::FromNetdev,
        Hook::XdpFromNetdev,
        Hook::ToPod,
        Hook::ToNetdev,
        Hook::FromNetdevL3,
        Hook::ToNetdevL3,
    ];
    /// The hooks with a TC program, and where each attaches.
    pub const TC: [(Hook, TcAttachType); 6] = [
        (Hook::FromPod, TcAttachType::Ingress),
        (Hook::FromNetdev, TcAttachType::Ingress),
        (Hook::ToPod, TcAttachType::Egress),
        (Hook::ToNetdev, TcAttachType::Egress),
        (Hook::FromNetdevL3, TcAttachType::Ingress),
        (Hook::ToNetdevL3, TcAttachType::Egress),
    ];

    pub fn program(self) -> &'static str {
        match self {
            Hook::FromPod => PROG_FROM_POD,
            Hook::FromNetdev => PROG_FROM_NETDEV,
            Hook::XdpFromNetdev => PROG_XDP_FROM_NETDEV,
            Hook::ToPod => PROG_TO_POD,
            Hook::ToNetdev => PROG_TO_NETDEV,
            Hook::FromNetdevL3 => PROG_FROM_NETDEV_L3,
            Hook::ToNetdevL3 => PROG_TO_NETDEV_L3,
        }
    }

    /// Whether `name` is one of Ferry's TC programs (as the kernel names it).
    pub fn is_tc_program(name: &str) -> bool {
        Self::TC.iter().any(|(h, _)| h.program() == name)
    }

    /// Where a TC hook's program attaches (None: XDP).
    fn tc_attach_type(self) -> Option<TcAttachType> {
        Self::TC.iter().find(|(h, _)| *h == self).map(|(_, t)| *t)
    }
}

/// A program kind the agent attaches through pinned bpf_links (TCX, XDP).
trait LinkedProgram {
    /// Swaps this program into an existing link (a previous agent's pin).
    fn replace(&mut self, old: FdLink) -> Result<FdLink, String>;
    /// A new link on `ifname`, and how it was attached (for the log).
    fn attach_new(&mut self, ifname: &str) -> Result<(FdLink, &'static str), DataplaneError>;
}

/// A TC program with the direction it attaches in.
struct TcProgram<'a>(&'a mut SchedClassifier, TcAttachType);

impl LinkedProgram for TcProgram<'_> {
    fn replace(&mut self, old: FdLink) -> Result<FdLink, String> {
        let old: SchedClassifierLink = old.try_into().map_err(|e: LinkError| e.to_string())?;
        let id = self.0.attach_to_link(old).map_err(|e| e.to_string())?;
        self.0
            .take_link(id)
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: LinkError| e.to_string())
    }

    fn attach_new(&mut self, ifname: &str) -> Result<(FdLink, &'static str), DataplaneError> {
        let what = || format!("attaching the TC program to {ifname}");
        let id = self
            .0
            .attach_with_options(ifname, self.1, TcAttachOptions::TcxOrder(LinkOrder::default()))
            .map_err(program(what()))?;
        let link = self
            .0
            .take_link(id)
            .map_err(program(what()))?
            .try_into()
            .map_err(link(what()))?;
        Ok((link, TcMode::Tcx.hook_in(self.1)))
    }
}

/// The XDP program with the modes to try on a device.
struct XdpProgram<'a>(&'a mut Xdp, &'static [XdpMode]);

impl LinkedProgram for XdpProgram<'_> {
    fn replace(&mut self, old: FdLink) -> Result<FdLink, String> {
        let old: XdpLink = old.try_into().map_err(|e: LinkError| e.to_string())?;
        let id = self.0.attach_to_link(old).map_err(|e| e.to_string())?;
        self.0
            .take_link(id)
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: LinkError| e.to_string())
    }

    /// Tries the allowed modes in order; the error is the last mode's.
    fn attach_new(&mut self, ifname: &str) -> Result<(FdLink, &'static str), DataplaneError> {
        let mut last = None;
        for &mode in self.1 {
            match self.0.attach(ifname, mode) {
                Ok(id) => {
                    let what = || format!("XDP link of {ifname}");
                    let link = self
                        .0
                        .take_link(id)
                        .map_err(program(what()))?
                        .try_into()
                        .map_err(link(what()))?;
                    return Ok((
                        link,
                        if mode == XdpMode::Driver {
                            "xdp native"
                        } else {
                            "xdp generic"
                        },
                    ));
                }
                Err(e) => {
                    tracing::debug!(ifname, ?mode, "XDP attach failed: {e}");
                    last = Some(e);
                }
            }
        }
        let what = format!("attaching {PROG_XDP_FROM_NETDEV} to {ifname} ({:?})", self.1);
        Err(match last {
            Some(source) => DataplaneError::Program { what, source },
            None => DataplaneError::MissingProgram(PROG_XDP_FROM_NETDEV),
        })
    }
}

/// The loaded dataplane: programs and the TC links that keep them attached.
pub struct Dataplane {
    ebpf: Ebpf,
    links_dir: PathBuf,
    /// How the TC programs attach (`--tc-attach`, resolved at load).
    tc_mode: TcMode,
    /// (hook, ifindex) → (interface name, the pinned link: none for a
    /// netlink filter, which the interface itself holds).
    attached: BTreeMap<(Hook, u32), (String, Option<PinnedLink>)>,
    /// Devices (ifindex, name) XDP could not attach to (TC serves them).
    xdp_refused: BTreeSet<(u32, String)>,
    /// A new Maglev table size the programs are told only once the new
    /// programs are attached (see [`Dataplane::after_swap`]).
    maglev_size_pending: Option<u32>,
    /// Maps migrated at load, caught up once the new programs are attached
    /// (see [`Dataplane::after_swap`]).
    migrated: migrate::Migrated,
}

const BPFFS: &str = "/sys/fs/bpf";

/// Linux capabilities the agent needs, and all it needs (deploy/daemonset.yaml
/// grants exactly these; tests compare, and run the agent with only these):
/// BPF to create, pin and load maps and programs; PERFMON because without it
/// the verifier refuses the programs (seen on kernel 6.18 once the reject path,
/// which builds RST and ICMP replies on the stack, was added: EACCES); NET_ADMIN
/// to attach TC programs. Not SYS_ADMIN: bpffs is mounted
/// into the container, so it is never mounted and no mount namespace is joined
/// (see `mountns`). Kernels before 5.8 have no CAP_BPF and would need SYS_ADMIN.
pub const REQUIRED_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "PERFMON"];

/// Whether the mount table `mounts` (a /proc/<pid>/mounts) has bpffs at /sys/fs/bpf.
pub fn has_bpffs(mounts: &str) -> bool {
    mount_points(mounts, "bpf").any(|t| t == BPFFS)
}

/// The mount points of file systems of type `fstype` in a mount table.
fn mount_points<'a>(mounts: &'a str, fstype: &'a str) -> impl Iterator<Item = &'a str> {
    mounts.lines().filter_map(move |l| {
        let mut f = l.split_whitespace();
        let (_, target, ty) = (f.next(), f.next()?, f.next()?);
        (ty == fstype).then_some(target)
    })
}

/// Mounts bpffs at /sys/fs/bpf when it is not (fresh machines don't have it).
pub fn ensure_bpffs() -> Result<(), DataplaneError> {
    if has_bpffs(&fs::read_to_string("/proc/self/mounts").unwrap_or_default()) {
        return Ok(());
    }
    tracing::info!("mounting bpffs at {BPFFS}");
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(DataplaneError::Mount)
}

impl Dataplane {
    /// Loads the object, reusing maps already pinned in `cfg.bpffs_dir` (so
    /// connection tracking survives restarts) where they still match this
    /// build and its flags (the others are migrated: see `migrate`), and loads
    /// the programs. Must run inside a tokio runtime (the eBPF log reader, if
    /// any, is a task).
    pub fn load(cfg: &Config) -> Result<(Self, KernelMaps), DataplaneError> {
        ensure_bpffs()?;
        let dir = &cfg.bpffs_dir;
        let links_dir = dir.join("links");
        fs::create_dir_all(&links_dir).map_err(|source| DataplaneError::CreateDir {
            path: links_dir.clone(),
            source,
        })?;
        let max_entries = cfg.max_entries();
        let copies = migrate::prepare(dir, &migrate::expected(DATAPLANE_OBJ, &max_entries)?)?;
        let mut ebpf = match load_object(dir, &max_entries) {
            Ok(ebpf) => ebpf,
            Err(e) => {
                // The programs still attached use the old maps: pinned again,
                // the next start migrates them anew.
                migrate::restore(dir, copies);
                return Err(e);
            }
        };
        // Right before the programs are swapped in: flows the old programs
        // create from now on are in the old maps only.
        let migrated = migrate::finish(dir, copies);
        spawn_ebpf_logs(&mut ebpf);
        let maglev_size_pending = set_maglev_table_size(&mut ebpf, cfg.maglev.table_size)?;
        let maps = KernelMaps::from_ebpf(&mut ebpf)?;
        let tc_mode = cfg.tc_attach.resolve(probe_tcx);
        tracing::info!(tc_attach = ?cfg.tc_attach, "TC programs attach as {}", tc_mode.hook());
        Ok((
            Self {
                ebpf,
                links_dir,
                tc_mode,
                attached: BTreeMap::new(),
                xdp_refused: BTreeSet::new(),
                maglev_size_pending,
                migrated,
            },
            maps,
        ))
    }

    /// After the first attach, when the new programs replaced the previous
    /// agent's: copies the flows those opened in the old maps of a migration
    /// meanwhile ([`migrate::Migrated::catch_up`]), and tells the programs a
    /// changed Maglev table size. Until now that was 0 (random), because the
    /// previous agent's programs share the config array and would have
    /// indexed their tables with the new size.
    pub fn after_swap(&mut self) -> Result<(), DataplaneError> {
        std::mem::take(&mut self.migrated).catch_up();
        let Some(m) = self.maglev_size_pending.take() else {
            return Ok(());
        };
        self.set_config(config::MAGLEV_TABLE_SIZE, m)
    }

    /// Attaches a hook's program to an interface: TC ingress (a pinned TCX
    /// link, or Ferry's netlink filter) or, for XDP, in the first of
    /// `xdp_modes` the device takes. Either way the program stays attached when
    /// the agent stops, and a restarted agent swaps its program in atomically.
    pub fn attach(
        &mut self,
        hook: Hook,
        ifname: &str,
        ifindex: u32,
        xdp_modes: &'static [XdpMode],
    ) -> Result<(), DataplaneError> {
        if self.attached.get(&(hook, ifindex)).is_some_and(|(n, _)| n == ifname) {
            return Ok(());
        }
        let name = hook.program();
        let pin = self.links_dir.join(format!("{name}-{ifindex}"));
        let (pinned, how) = match hook {
            Hook::XdpFromNetdev => {
                if self.xdp_refused.contains(&(ifindex, ifname.to_string())) {
                    return Ok(());
                }
                match attach_pinned(&mut XdpProgram(xdp_program(&mut self.ebpf)?, xdp_modes), &pin, ifname) {
                    Ok((p, how)) => (Some(p), how),
                    Err(e) => {
                        // Said once per device; from_netdev serves it all the same.
                        tracing::warn!(
                            ifname,
                            "XDP could not attach, falling back to TC only on this device: {}",
                            with_causes(&e)
                        );
                        self.xdp_refused.insert((ifindex, ifname.to_string()));
                        return Ok(());
                    }
                }
            }
            Hook::FromPod | Hook::FromNetdev | Hook::ToPod | Hook::ToNetdev | Hook::FromNetdevL3 | Hook::ToNetdevL3 => {
                self.attach_tc(hook, &pin, ifname)?
            }
        };
        tracing::info!(ifname, ifindex, "{name} attached ({how})");
        self.attached.insert((hook, ifindex), (ifname.to_string(), pinned));
        Ok(())
    }

    /// Attaches a TC hook's program the way `tc_mode` says, then removes what
    /// the other way left from an agent started with another `--tc-attach`
    /// (both would run).
    fn attach_tc(
        &mut self,
        hook: Hook,
        pin: &Path,
        ifname: &str,
    ) -> Result<(Option<PinnedLink>, &'static str), DataplaneError> {
        let direction = hook.tc_attach_type().unwrap_or(TcAttachType::Ingress);
        let prog = classifier(&mut self.ebpf, hook)?;
        match self.tc_mode {
            TcMode::Tcx => {
                let (pinned, how) = attach_pinned(&mut TcProgram(prog, direction), pin, ifname)?;
                remove_netlink_filter(ifname, direction);
                Ok((Some(pinned), how))
            }
            TcMode::Netlink => {
                let how = attach_netlink(prog, ifname, direction)?;
                remove_tcx_pin(pin);
                Ok((None, how))
            }
        }
    }

    /// How the TC programs attach.
    pub fn tc_mode(&self) -> TcMode {
        self.tc_mode
    }

    /// Forgets interfaces that are gone (or no longer for this hook) and
    /// removes their pinned links.
    pub fn forget_missing(&mut self, present: &BTreeMap<(Hook, u32), String>) {
        self.attached.retain(|key, (name, _)| {
            let keep = present.get(key) == Some(name);
            if !keep {
                tracing::info!(ifname = %name, "interface gone");
            }
            keep
        });
        // Pins of interfaces that vanished while no agent ran.
        if let Ok(entries) = fs::read_dir(&self.links_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pinned = Hook::ALL.into_iter().find_map(|h| {
                    let idx = name.strip_prefix(h.program())?.strip_prefix('-')?;
                    Some((h, idx.parse::<u32>().ok()?))
                });
                if pinned.is_some_and(|k| !present.contains_key(&k)) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// Attaches the socket-level load balancer (cgroup connect4, sendmsg4,
    /// recvmsg4, getpeername4 and their IPv6 twins) to the cgroup v2
    /// directory `cgroup`: sockets of processes in it reach frontends without
    /// any packet NAT, those of the node's own network namespace always, those
    /// of other namespaces (Pods) when `pods` (`--socket-lb-pods`). The links
    /// are pinned (`links/<program>-cgroup`): they stay when the agent stops;
    /// a restarted agent attaches anew, then unpins the old ones.
    pub fn attach_cgroup(&mut self, cgroup: &Path, pods: bool) -> Result<(), DataplaneError> {
        let cookie = own_netns_cookie().map_err(|source| DataplaneError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        self.set_config(config::HOST_NETNS_COOKIE_LO, cookie as u32)?;
        self.set_config(config::HOST_NETNS_COOKIE_HI, (cookie >> 32) as u32)?;
        self.set_config(config::SOCK_LB_PODS, u32::from(pods))?;
        let dir = fs::File::open(cgroup).map_err(|source| DataplaneError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        for name in PROG_SOCK_ALL {
            let prog = sock_addr_program(&mut self.ebpf, name)?;
            let id = prog
                // A bpf_link: several programs per cgroup are allowed anyway; link
                // creation refuses the multi flag.
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(program(format!("attaching {name} to {}", cgroup.display())))?;
            let fd_link: FdLink = prog
                .take_link(id)
                .map_err(program(format!("link of {name}")))?
                .try_into()
                .map_err(link(format!("link of {name}")))?;
            let pin = self.links_dir.join(format!("{name}-cgroup"));
            // The old link (a previous agent's) goes once the new one is in.
            let _ = fs::remove_file(&pin);
            fd_link.pin(&pin).map_err(|source| DataplaneError::Pin {
                path: pin.clone(),
                source,
            })?;
        }
        let whose = if pods {
            "the node's and Pods' sockets"
        } else {
            "the node's own sockets only"
        };
        tracing::info!(cgroup = %cgroup.display(), "socket load balancing attached (cgroup connect, sendmsg, recvmsg, getpeername; IPv4 and IPv4-mapped IPv6) for {whose}");
        Ok(())
    }

    /// Makes `FERRY_SOCK_LB_SKIP` hold exactly the cookies of the network
    /// namespaces `netns` (`--socket-lb-skip-netns`) that exist now: their
    /// sockets are left to the TC path. A namespace that does not exist (yet)
    /// is skipped and looked up again at the next call. Returns the namespaces
    /// that could not be resolved, with why.
    pub fn set_sock_lb_skip(&mut self, netns: &[PathBuf]) -> Result<Vec<(PathBuf, io::Error)>, DataplaneError> {
        let mut want = BTreeSet::new();
        let mut missing = Vec::new();
        for path in netns {
            match netns_cookie_of(path) {
                Ok(c) => {
                    want.insert(c);
                }
                Err(e) => missing.push((path.clone(), e)),
            }
        }
        let map = self
            .ebpf
            .map_mut(SOCK_LB_SKIP_MAP)
            .ok_or(DataplaneError::MissingMap(SOCK_LB_SKIP_MAP))?;
        let mut skip: BpfHashMap<&mut MapData, u64, u8> =
            BpfHashMap::try_from(map).map_err(|source| DataplaneError::SkipMap { source })?;
        let have: BTreeSet<u64> = skip.keys().flatten().collect();
        for c in have.difference(&want) {
            let _ = skip.remove(c);
        }
        for c in want.difference(&have) {
            skip.insert(c, 1, 0)
                .map_err(|source| DataplaneError::SkipMap { source })?;
        }
        Ok(missing)
    }

    /// Tells the programs the node address north-south flows to backends on
    /// other nodes are SNATed to.
    pub fn set_node_addr(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        self.set_config(config::NODE_ADDR, addr_to_map(addr.octets()))
    }

    /// Tells the programs the node's own addresses (`addrs`, every address
    /// of its network namespace): a translated packet to one of them is
    /// delivered by the stack (counted as `fib_local`, not `fib_miss`).
    /// Writes only what differs; at most [`NODE_ADDRS_MAX`] are kept.
    pub fn set_node_addrs(&mut self, addrs: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError> {
        let map = self
            .ebpf
            .map_mut(NODE_ADDRS_MAP)
            .ok_or(DataplaneError::MissingMap(NODE_ADDRS_MAP))?;
        let err = |source| DataplaneError::NodeAddrsMap { source };
        let mut m: BpfHashMap<&mut MapData, u32, u8> = BpfHashMap::try_from(map).map_err(err)?;
        let want: BTreeSet<u32> = addrs
            .iter()
            .take(NODE_ADDRS_MAX as usize)
            .map(|a| addr_to_map(a.octets()))
            .collect();
        if addrs.len() > want.len() {
            tracing::warn!(
                addresses = addrs.len(),
                kept = want.len(),
                "the node has more addresses than its map holds"
            );
        }
        let have: BTreeSet<u32> = m.keys().collect::<Result<_, _>>().map_err(err)?;
        for gone in have.difference(&want) {
            m.remove(gone).map_err(err)?;
        }
        for new in want.difference(&have) {
            m.insert(new, 1, 0).map_err(err)?;
        }
        Ok(())
    }

    /// Tells the programs the connection-tracking lifetimes and the SNAT
    /// port range.
    pub fn set_ct_config(&mut self, c: &CtConfig) -> Result<(), DataplaneError> {
        let secs = |d: std::time::Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1);
        for (index, value) in [
            (config::CT_TIMEOUT_TCP_SYN, secs(c.timeout_tcp_syn)),
            (config::CT_TIMEOUT_TCP, secs(c.timeout_tcp)),
            (config::CT_TIMEOUT_TCP_CLOSE, secs(c.timeout_tcp_close)),
            (config::CT_TIMEOUT_UDP, secs(c.timeout_udp)),
            (config::CT_TIMEOUT_UDP_STREAM, secs(c.timeout_udp_stream)),
            (config::SNAT_PORT_MIN, u32::from(c.snat_ports.0)),
            (config::SNAT_PORT_MAX, u32::from(c.snat_ports.1)),
            (config::NODEPORT_MODE, c.nodeport_mode.to_map()),
        ] {
            self.set_config(index, value)?;
        }
        Ok(())
    }

    fn set_config(&mut self, index: u32, value: u32) -> Result<(), DataplaneError> {
        let map = self
            .ebpf
            .map_mut(CONFIG_MAP)
            .ok_or(DataplaneError::MissingMap(CONFIG_MAP))?;
        let mut array: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(|source| DataplaneError::ConfigMap { source })?;
        array
            .set(index, value, 0)
            .map_err(|source| DataplaneError::ConfigMap { source })
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.values().map(|(n, _)| n.as_str())
    }

    /// The devices XDP could not attach to (TC serves them alone).
    pub fn xdp_refused(&self) -> impl Iterator<Item = &str> {
        self.xdp_refused.iter().map(|(_, n)| n.as_str())
    }
}

/// Tells the programs the size of a Maglev table, before the agent reads the
/// pinned tables back with it. When a previous agent used another size, its
/// tables mean nothing with the new one: the programs are told 0 (Maglev
/// frontends pick at random), the tables are zeroed (an empty entry means
/// random too), and the new size is returned, to be told once the new
/// programs are attached (the old ones still run until then, on their own
/// tables); the first sync writes the tables anew.
fn set_maglev_table_size(ebpf: &mut Ebpf, m: u32) -> Result<Option<u32>, DataplaneError> {
    let config_err = |source| DataplaneError::ConfigMap { source };
    let map = ebpf.map_mut(CONFIG_MAP).ok_or(DataplaneError::MissingMap(CONFIG_MAP))?;
    let mut cfg: Array<&mut MapData, u32> = Array::try_from(map).map_err(config_err)?;
    let old = cfg.get(&config::MAGLEV_TABLE_SIZE, 0).map_err(config_err)?;
    if old != 0 && old != m {
        tracing::info!(
            old,
            new = m,
            "the Maglev table size changed: tables are rewritten (new flows pick at random meanwhile)"
        );
        cfg.set(config::MAGLEV_TABLE_SIZE, 0, 0).map_err(config_err)?;
        let map = ebpf.map_mut(MAGLEV_MAP).ok_or(DataplaneError::MissingMap(MAGLEV_MAP))?;
        let mut tables: Array<&mut MapData, u32> = Array::try_from(map).map_err(config_err)?;
        for i in 0..tables.len() {
            tables.set(i, 0, 0).map_err(config_err)?;
        }
        return Ok(Some(m));
    }
    cfg.set(config::MAGLEV_TABLE_SIZE, m, 0).map_err(config_err)?;
    Ok(None)
}

/// Warns when the SNAT port range overlaps the node's ephemeral port range
/// (`net.ipv4.ip_local_port_range`): the node's own connections to a backend
/// could then take a port a north-south flow holds, or the other way round.
pub fn warn_if_snat_ports_are_ephemeral(snat: (u16, u16)) {
    let Ok(text) = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut it = text.split_whitespace().filter_map(|p| p.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (it.next(), it.next()) {
        if snat.0 <= hi && lo <= snat.1 {
            tracing::warn!(
                snat = %format!("{}-{}", snat.0, snat.1),
                ephemeral = %format!("{lo}-{hi}"),
                "--snat-port-range overlaps net.ipv4.ip_local_port_range: reserve it there (ip_local_reserved_ports) or choose another range"
            );
        }
    }
}

/// The object with its maps pinned in `dir` (created or reused) and every
/// program loaded (verified), not attached.
fn load_object(dir: &Path, max_entries: &[(&'static str, u32)]) -> Result<Ebpf, DataplaneError> {
    // connect() refused with ECONNREFUSED needs bpf_set_retval (5.18); the
    // programs leave the call out before (the call then fails with EPERM).
    let set_retval =
        u32::from(aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 18, 0)));
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(dir);
    loader.override_global(SOCK_SET_RETVAL, &set_retval, true);
    for &(name, max) in max_entries {
        loader.map_max_entries(name, max);
    }
    let mut ebpf = loader.load(DATAPLANE_OBJ)?;
    for (hook, _) in Hook::TC {
        classifier(&mut ebpf, hook)?
            .load()
            .map_err(program(format!("loading {} (verifier)", hook.program())))?;
    }
    xdp_program(&mut ebpf)?
        .load()
        .map_err(program(format!("loading {PROG_XDP_FROM_NETDEV} (verifier)")))?;
    for name in PROG_SOCK_ALL {
        sock_addr_program(&mut ebpf, name)?
            .load()
            .map_err(program(format!("loading {name} (verifier)")))?;
    }
    Ok(ebpf)
}

/// Reuses the link pinned at `pin` (a previous agent's) or makes a new one
/// and pins it. Returns the pinned link and how it is attached.
fn attach_pinned(
    prog: &mut impl LinkedProgram,
    pin: &Path,
    ifname: &str,
) -> Result<(PinnedLink, &'static str), DataplaneError> {
    let reused = match PinnedLink::from_pin(pin) {
        Ok(old) => match prog.replace(FdLink::from(old)) {
            Ok(link) => Some(link),
            Err(e) => {
                // A link of an interface that is gone (the ifindex was reused),
                // or of another kind.
                tracing::debug!(ifname, "stale pinned link: {e}");
                let _ = fs::remove_file(pin);
                None
            }
        },
        Err(LinkError::SyscallError(SyscallError { io_error, .. })) if io_error.kind() == io::ErrorKind::NotFound => {
            None
        }
        Err(e) => return Err(link(format!("opening pinned link {}", pin.display()))(e)),
    };
    let how = match reused {
        // The pin holds the link already.
        Some(_) => "reused pinned link",
        None => {
            let (fd_link, how) = prog.attach_new(ifname)?;
            fd_link.pin(pin).map_err(|source| DataplaneError::Pin {
                path: pin.to_path_buf(),
                source,
            })?;
            how
        }
    };
    let pinned = PinnedLink::from_pin(pin).map_err(link(format!("re-opening {}", pin.display())))?;
    Ok((pinned, how))
}

/// Attaches `prog` as Ferry's filter on clsact `direction` of `ifname` (the
/// qdisc is added when missing): replaces the filter a previous agent left at
/// Ferry's priority and handle, atomically, or creates it. Netlink filters
/// are no bpf_links and cannot be pinned, and aya deletes the filter when its
/// link is dropped: the link is forgotten, so the filter outlives the agent
/// (as a pinned TCX link does) until `ferry cleanup` or the interface goes.
fn attach_netlink(
    prog: &mut SchedClassifier,
    ifname: &str,
    direction: TcAttachType,
) -> Result<&'static str, DataplaneError> {
    let what = || format!("attaching the TC program to {ifname} (netlink)");
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(program(format!("adding the clsact qdisc to {ifname}"))(e.into())),
    }
    let handle = TcHandle::from(NETLINK_HANDLE);
    let ours = SchedClassifierLink::attached(ifname, direction, NETLINK_PRIORITY, handle, None)
        .map_err(|e| program(what())(TcError::IoError(e).into()))?;
    let egress = direction == TcAttachType::Egress;
    let (id, how) = match prog.attach_to_link(ours) {
        Ok(id) => (
            id,
            if egress {
                "tc egress (netlink), replaced Ferry's filter"
            } else {
                "tc ingress (netlink), replaced Ferry's filter"
            },
        ),
        Err(e) if os_error(&e) == Some(libc::ENOENT) => {
            let opts = NlOptions {
                priority: NETLINK_PRIORITY,
                handle,
                classid: None,
            };
            let id = prog
                .attach_with_options(ifname, direction, TcAttachOptions::Netlink(opts))
                .map_err(program(what()))?;
            (
                id,
                if egress {
                    "tc egress (netlink), new filter"
                } else {
                    "tc ingress (netlink), new filter"
                },
            )
        }
        Err(e) => return Err(program(what())(e)),
    };
    std::mem::forget(prog.take_link(id).map_err(program(what()))?);
    Ok(how)
}

/// Deletes Ferry's netlink filter in `direction` from `ifname`, if there is
/// one (none is the usual case: only an agent that ran with `--tc-attach
/// netlink` leaves one). Failing is logged only (no filter, no qdisc).
fn remove_netlink_filter(ifname: &str, direction: TcAttachType) {
    let handle = TcHandle::from(NETLINK_HANDLE);
    let removed = SchedClassifierLink::attached(ifname, direction, NETLINK_PRIORITY, handle, None)
        .map_err(|e| e.to_string())
        .and_then(|link| link.detach().map_err(|e| e.to_string()));
    match removed {
        Ok(()) => tracing::info!(ifname, "removed Ferry's netlink TC filter (now attached with TCX)"),
        Err(e) => tracing::debug!(ifname, "no netlink TC filter of Ferry's to remove: {e}"),
    }
}

/// Detaches and unpins the TCX link pinned at `pin`, if any (an agent that
/// ran with TCX left it).
fn remove_tcx_pin(pin: &Path) {
    let Ok(fd) = crate::bpfsys::obj_get(pin) else {
        return;
    };
    match crate::bpfsys::link_detach(std::os::fd::AsFd::as_fd(&fd)) {
        Ok(()) => tracing::info!(pin = %pin.display(), "detached the TCX link (now attached with netlink)"),
        Err(e) => tracing::warn!(pin = %pin.display(), "detaching the TCX link: {e}"),
    }
    let _ = fs::remove_file(pin);
}

/// The interfaces of this network namespace, as attaching the programs needs
/// them (read once per link event).
#[derive(Clone, Debug, Default)]
pub struct Links {
    /// Interface names by index.
    pub names: BTreeMap<u32, String>,
    /// The ifindexes of the veths.
    pub veths: BTreeSet<u32>,
    /// The ifindexes of devices without an Ethernet header (IPIP, GRE,
    /// WireGuard, PPP: the link types the kernel's redirect treats so).
    pub l3: BTreeSet<u32>,
}

impl Links {
    pub fn new(links: &[LinkMessage]) -> Self {
        let names = links
            .iter()
            .filter_map(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some((l.header.index, n.clone())),
                    _ => None,
                })
            })
            .collect();
        let veths = links
            .iter()
            .filter(|l| {
                l.attributes.iter().any(|a| match a {
                    LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
                    _ => false,
                })
            })
            .map(|l| l.header.index)
            .collect();
        let l3 = links
            .iter()
            .filter(|l| is_l3(l.header.link_layer_type))
            .map(|l| l.header.index)
            .collect();
        Self { names, veths, l3 }
    }

    /// Where each hook goes: every node device present gets from_netdev and
    /// to_netdev (their L3 twins on a device without an Ethernet header),
    /// and with `xdp` also xdp_from_netdev (not on L3 devices); every veth
    /// that is not a node device (a Pod's) gets from_pod and to_pod.
    pub fn hooks(&self, devices: &[String], xdp: bool) -> BTreeMap<(Hook, u32), String> {
        let mut out = BTreeMap::new();
        for (&idx, name) in &self.names {
            let hooks: &[Hook] = if devices.contains(name) && self.l3.contains(&idx) {
                &[Hook::FromNetdevL3, Hook::ToNetdevL3]
            } else if devices.contains(name) {
                if xdp {
                    &[Hook::FromNetdev, Hook::ToNetdev, Hook::XdpFromNetdev]
                } else {
                    &[Hook::FromNetdev, Hook::ToNetdev]
                }
            } else if self.veths.contains(&idx) {
                &[Hook::FromPod, Hook::ToPod]
            } else {
                &[]
            };
            for hook in hooks {
                out.insert((*hook, idx), name.clone());
            }
        }
        out
    }
}

/// Whether a link type has no Ethernet header: the types for which the
/// kernel's bpf_redirect strips the MAC header (`dev_is_mac_header_xmit`).
fn is_l3(t: LinkLayerType) -> bool {
    use LinkLayerType as T;
    matches!(
        t,
        T::Tunnel | T::Tunnel6 | T::Sit | T::Ipgre | T::Ip6gre | T::Void | T::None | T::Rawip | T::Pimreg | T::Ppp
    )
}

/// The program `name` of the object as the kind `P` (`kind` says which, for
/// the error when it is another).
fn program_of<'a, P>(ebpf: &'a mut Ebpf, name: &'static str, kind: &str) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(program(format!("{name} is not {kind}")))
}

/// A hook's TC program of the object.
fn classifier(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, DataplaneError> {
    program_of(ebpf, hook.program(), "a TC classifier")
}

/// The XDP program of the object.
fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    program_of(ebpf, PROG_XDP_FROM_NETDEV, "an XDP program")
}

/// A socket load-balancing program (cgroup connect4, sendmsg4, recvmsg4).
fn sock_addr_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr, DataplaneError> {
    program_of(ebpf, name, "a cgroup sock_addr program")
}

/// Forwards `aya-log` records of the programs to our log, if the object has the
/// log map at all (the dataplane may well not log: it costs per packet).
fn spawn_ebpf_logs(ebpf: &mut Ebpf) {
    if ebpf.map("AYA_LOGS").is_none() {
        tracing::debug!("the eBPF object has no aya-log map; no eBPF logs");
        return;
    }
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("eBPF logs unavailable: {e}");
            return;
        }
    };
    // SAFETY: the fd is the logger's ring buffer map, owned by the logger, which
    // the AsyncFd owns in turn: it stays open and the same for the AsyncFd's life.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("eBPF logs unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// All links of this network namespace.
pub async fn list_links(handle: &rtnetlink::Handle) -> Result<Links, DataplaneError> {
    let msgs: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    Ok(Links::new(&msgs))
}

/// Every address of this network namespace, of both families: (ifindex,
/// address).
pub async fn list_addresses(handle: &rtnetlink::Handle) -> Result<Vec<(u32, IpAddr)>, DataplaneError> {
    let msgs: Vec<AddressMessage> = handle.address().get().execute().try_collect().await?;
    Ok(msgs
        .iter()
        .flat_map(|m| {
            m.attributes.iter().filter_map(move |a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some((m.header.index, *ip)),
                _ => None,
            })
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect())
}

/// The addresses NodePorts are served on, as kube-proxy's
/// `--nodeport-addresses`: with CIDRs, every address of the node within them
/// (of either family); without, the addresses of the node devices. Never
/// loopback, nor IPv6 link-local (meaningless without its interface). Sorted.
pub fn nodeport_addresses(
    addrs: &[(u32, IpAddr)],
    links: &BTreeMap<u32, String>,
    devices: &[String],
    cidrs: &[ipnet::IpNet],
) -> Vec<IpAddr> {
    let link_local: ipnet::Ipv6Net = "fe80::/10".parse().expect("valid CIDR");
    let mut out: Vec<IpAddr> = addrs
        .iter()
        .filter(|(_, ip)| {
            !ip.is_loopback()
                && match ip {
                    IpAddr::V4(_) => true,
                    IpAddr::V6(v6) => !link_local.contains(v6),
                }
        })
        .filter(|(idx, ip)| {
            if cidrs.is_empty() {
                links.get(idx).is_some_and(|name| devices.contains(name))
            } else {
                cidrs.iter().any(|c| c.contains(ip))
            }
        })
        .map(|(_, ip)| *ip)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE).
fn own_netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and a u64-sized out buffer.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookie of the network namespace at `path` (a bind mount such as
/// /run/netns/NAME, or /proc/PID/ns/net), read from a socket made in it on a
/// short-lived thread.
fn netns_cookie_of(path: &Path) -> io::Result<u64> {
    let ns = fs::File::open(path)?;
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a valid fd.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        own_netns_cookie()
    })
    .join()
    .map_err(|_| io::Error::other("netns cookie thread panicked"))?
}

/// The cgroup v2 root, where the socket load balancer goes by default:
/// /sys/fs/cgroup when it is cgroup2, else the hybrid layout's
/// /sys/fs/cgroup/unified.
pub fn default_cgroup(mounts: &str) -> Option<PathBuf> {
    let cgroup2: Vec<&str> = mount_points(mounts, "cgroup2").collect();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|p| cgroup2.contains(p))
        .map(PathBuf::from)
}

/// Pin directory default for a node.
pub fn default_bpffs_dir(node: &str) -> PathBuf {
    Path::new(BPFFS).join("ferry").join(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_their_causes_once() {
        let e = DataplaneError::Program {
            what: "attaching from_pod to eth0".into(),
            source: ProgramError::SyscallError(SyscallError {
                call: "bpf_link_create",
                io_error: io::Error::from_raw_os_error(libc::ERANGE),
            }),
        };
        let text = with_causes(&e);
        assert!(
            text.starts_with("attaching from_pod to eth0: `bpf_link_create` failed: "),
            "{text}"
        );
        assert!(text.contains("out of range"), "{text}");
        assert_eq!(text.matches("out of range").count(), 1, "{text}");
    }

    #[test]
    fn tc_attach_probes_only_for_auto() {
        let never = || -> bool { panic!("probed although the mode was given") };
        assert_eq!(TcAttach::Tcx.resolve(never), TcMode::Tcx);
        assert_eq!(TcAttach::Netlink.resolve(never), TcMode::Netlink);
        assert_eq!(TcAttach::Auto.resolve(|| true), TcMode::Tcx);
        assert_eq!(TcAttach::Auto.resolve(|| false), TcMode::Netlink);
    }

    #[test]
    fn cgroup2_root_on_unified_and_hybrid_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n";
        assert_eq!(default_cgroup(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert!(has_bpffs(hybrid));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(default_cgroup(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert!(!has_bpffs(unified));
        assert_eq!(default_cgroup("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"), None);
    }

    #[test]
    fn nodeport_addresses_follow_devices_or_cidrs_of_both_families_and_never_loopback() {
        let links: BTreeMap<u32, String> =
            [(1, "lo".to_string()), (2, "eth0".to_string()), (3, "eth1".to_string())].into();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let addrs = [
            (1, ip("127.0.0.1")),
            (1, ip("::1")),
            (2, ip("192.168.77.11")),
            (2, ip("2001:db8::11")),
            (2, ip("fe80::1")),
            (3, ip("10.0.0.5")),
            (3, ip("fd00:1::5")),
        ];
        let eth0 = vec!["eth0".to_string()];
        assert_eq!(
            nodeport_addresses(&addrs, &links, &eth0, &[]),
            [ip("192.168.77.11"), ip("2001:db8::11")],
            "the device's addresses of both families, not its link-local one"
        );
        let all: Vec<ipnet::IpNet> = vec!["0.0.0.0/0".parse().unwrap()];
        assert_eq!(
            nodeport_addresses(&addrs, &links, &eth0, &all),
            [ip("10.0.0.5"), ip("192.168.77.11")]
        );
        let ten: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert_eq!(
            nodeport_addresses(&addrs, &links, &eth0, &ten),
            [ip("10.0.0.5"), ip("fd00:1::5")]
        );
        let any6: Vec<ipnet::IpNet> = vec!["::/0".parse().unwrap()];
        assert_eq!(
            nodeport_addresses(&addrs, &links, &eth0, &any6),
            [ip("2001:db8::11"), ip("fd00:1::5")],
            "never loopback or link-local"
        );
        assert!(nodeport_addresses(&addrs, &links, &[], &[]).is_empty());
    }
}
