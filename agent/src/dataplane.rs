//! Loading the eBPF dataplane, pinning its maps, and attaching `from_pod` to the
//! Pod veths of this network namespace as they come and go.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    programs::{
        links::{FdLink, LinkError, LinkOrder, PinnedLink},
        tc::TcAttachOptions,
        SchedClassifier, TcAttachType,
    },
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use ferry_common::{BACKENDS_MAP, CT_MAP, PROG_FROM_POD, SERVICES_MAP};
use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};

use crate::{loader::DATAPLANE_OBJ, maps::kernel::KernelMaps};

/// Where and how big.
#[derive(Clone, Debug)]
pub struct Config {
    pub bpffs_dir: PathBuf,
    pub services_max: u32,
    pub backends_max: u32,
    pub ct_max: u32,
}

/// The loaded dataplane: programs and the TC links that keep them attached.
pub struct Dataplane {
    ebpf: Ebpf,
    links_dir: PathBuf,
    /// ifindex → (interface name, the pinned TCX link).
    attached: BTreeMap<u32, (String, PinnedLink)>,
}

const BPFFS: &str = "/sys/fs/bpf";

/// Whether the mount table `mounts` (a /proc/<pid>/mounts) has bpffs at /sys/fs/bpf.
pub fn has_bpffs(mounts: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, target, fstype) = (f.next(), f.next(), f.next());
        target == Some(BPFFS) && fstype == Some("bpf")
    })
}

/// Mounts bpffs at /sys/fs/bpf when it is not (fresh machines don't have it).
pub fn ensure_bpffs() -> Result<()> {
    if has_bpffs(&fs::read_to_string("/proc/self/mounts").unwrap_or_default()) {
        return Ok(());
    }
    tracing::info!("mounting bpffs at {BPFFS}");
    nix::mount::mount(Some("bpf"), BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .with_context(|| format!("mounting bpffs at {BPFFS}"))
}

impl Dataplane {
    /// Loads the object, reusing maps already pinned in `cfg.bpffs_dir` (so
    /// connection tracking survives restarts), and loads the programs.

    pub fn load(cfg: &Config) -> Result<(Self, KernelMaps)> {
        ensure_bpffs()?;
        let dir = &cfg.bpffs_dir;
        let links_dir = dir.join("links");
        fs::create_dir_all(&links_dir).with_context(|| format!("creating {}", links_dir.display()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .map_max_entries(SERVICES_MAP, cfg.services_max)
            .map_max_entries(BACKENDS_MAP, cfg.backends_max)
            .map_max_entries(CT_MAP, cfg.ct_max)
            .load(DATAPLANE_OBJ)
            .context("loading the eBPF dataplane")?;
        let maps = KernelMaps::from_ebpf(&mut ebpf)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_FROM_POD)
            .context("from_pod missing from the object")?
            .try_into()?;
        prog.load().context("loading from_pod (verifier)")?;
        Ok((Self { ebpf, links_dir, attached: BTreeMap::new() }, maps))
    }

    /// Attaches `from_pod` at TC ingress (TCX) of an interface. The link is pinned,
    /// so the program stays attached when the agent stops; a restarted agent swaps
    /// its program into the pinned link atomically.
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        if self.attached.get(&ifindex).is_some_and(|(n, _)| n == ifname) {
            return Ok(());
        }
        let pin = self.links_dir.join(format!("from_pod-{ifindex}"));
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROG_FROM_POD)
            .context("from_pod missing")?
            .try_into()?;
        let reused = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link = FdLink::from(old).try_into()?;
                match prog.attach_to_link(link) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        // A link of an interface that is gone (the ifindex was reused).
                        tracing::debug!(ifname, "stale pinned link: {e}");
                        let _ = fs::remove_file(&pin);
                        None
                    }
                }
            }
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => return Err(e).context(format!("opening pinned link {}", pin.display())),
        };
        let fresh = reused.is_none();
        let id = match reused {
            Some(id) => id,
            None => prog
                .attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))
                .with_context(|| format!("attaching from_pod to {ifname}"))?,
        };
        let link: FdLink = prog.take_link(id)?.try_into()?;
        if fresh {
            link.pin(&pin).with_context(|| format!("pinning the link at {}", pin.display()))?;
        }
        let pinned = PinnedLink::from_pin(&pin).context("re-opening the pinned link")?;
        tracing::info!(ifname, ifindex, reused = !fresh, "from_pod attached (tc ingress)");
        self.attached.insert(ifindex, (ifname.to_string(), pinned));
        Ok(())
    }

    /// Forgets interfaces that are gone and removes their pinned links.
    pub fn forget_missing(&mut self, present: &BTreeMap<u32, String>) {
        self.attached.retain(|idx, (name, _)| {
            let keep = present.get(idx) == Some(name);
            if !keep {
                tracing::info!(ifname = %name, "interface gone");
            }
            keep
        });
        // Pins of interfaces that vanished while no agent ran.
        if let Ok(entries) = fs::read_dir(&self.links_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let idx = name.strip_prefix("from_pod-").and_then(|i| i.parse::<u32>().ok());
                if idx.is_some_and(|i| !present.contains_key(&i)) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.values().map(|(n, _)| n.as_str())
    }
}

/// Pod-facing interfaces: every veth that is not a node device.
pub fn pod_interfaces(links: &[LinkMessage], devices: &[String]) -> BTreeMap<u32, String> {
    links
        .iter()
        .filter_map(|l| {
            let mut name = None;
            let mut veth = false;
            for a in &l.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::LinkInfo(infos) => {
                        veth |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
                    }
                    _ => {}
                }
            }
            let name = name?;
            (veth && !devices.contains(&name)).then_some((l.header.index, name))
        })
        .collect()
}

/// All links of this network namespace.
pub async fn list_links(handle: &rtnetlink::Handle) -> Result<Vec<LinkMessage>> {
    Ok(handle.link().get().execute().try_collect().await?)
}

/// Pin directory default for a node.
pub fn default_bpffs_dir(node: &str) -> PathBuf {
    Path::new(BPFFS).join("ferry").join(node)
}
