//! What the kernel says: the programs attached to this network namespace's
//! interfaces (TCX ingress, XDP and its mode) and through the pinned cgroup
//! links, and how full each pinned map is.
use std::{collections::HashMap, os::fd::AsFd as _, path::Path};

use aya::{
    maps::{MapInfo, MapType},
    programs::{links::PinnedLink, SchedClassifier, TcAttachType},
};
use ferry_common::{PROG_FROM_NETDEV, PROG_FROM_NETDEV_L3, PROG_XDP_FROM_NETDEV};
use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
    tc::{TcAttribute, TcFilterBpfOption, TcMessage, TcOption},
};
use serde::Serialize;

use super::{report::AgentReport, MAP_WARN_PERCENT};
use crate::{
    bpfsys,
    dataplane::{Hook, TcMode},
    maps::table::Info,
};

/// One program on one hook, or one that should be and is not.
#[derive(Debug, Serialize, PartialEq)]
pub struct ProgramRow {
    /// An interface name, or the cgroup's path.
    pub interface: String,
    pub ifindex: Option<u32>,
    /// `tcx ingress`, `xdp native`, `xdp generic`, `xdp` (not attached), `cgroup`.
    pub hook: String,
    pub program: String,
    pub attached: bool,
    pub error: Option<String>,
}

/// One pinned map.
#[derive(Debug, Serialize, PartialEq)]
pub struct MapRow {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    /// None for arrays (always full by design) and maps that cannot be read.
    pub entries: Option<u32>,
    pub max: u32,
    pub percent: Option<f64>,
    /// At or above 90%.
    pub warning: bool,
    pub error: Option<String>,
    /// The flag that sizes it (from the map's declaration in `maps::defs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_flag: Option<&'static str>,
}

impl MapRow {
    /// The warning for a map this full.
    pub fn fill_warning(&self) -> String {
        let raise = self.size_flag.map(|f| format!("; raise {f}")).unwrap_or_default();
        format!(
            "map {} is {:.0}% full ({} of {} entries{raise})",
            self.name,
            self.percent.unwrap_or(0.0),
            self.entries.unwrap_or(0),
            self.max
        )
    }
}

/// An interface of this network namespace.
pub(crate) struct Iface {
    pub index: u32,
    pub name: String,
    /// XDP attach mode and program id, if any.
    pub xdp: Option<(XdpAttached, u32)>,
    /// Ferry's programs in cls_bpf filters on clsact ingress (`--tc-attach
    /// netlink`).
    pub tc_filters: Vec<TcFilter>,
}

/// A cls_bpf filter on clsact ingress or egress that runs one of Ferry's TC
/// programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TcFilter {
    pub direction: TcAttachType,
    pub program: String,
    pub program_id: u32,
    pub priority: u16,
    /// major << 16 | minor.
    pub handle: u32,
}

/// The interfaces of this network namespace.
pub(crate) async fn interfaces() -> Result<Vec<Iface>, String> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let msgs: Result<Vec<LinkMessage>, _> = handle.link().get().execute().try_collect().await;
    let mut out: Vec<Iface> = match msgs {
        Ok(m) => m.iter().filter_map(iface).collect(),
        Err(e) => {
            task.abort();
            return Err(e.to_string());
        }
    };
    for i in &mut out {
        i.tc_filters = ferry_tc_filters(&handle, i.index).await;
    }
    task.abort();
    Ok(out)
}

/// Ferry's cls_bpf filters on clsact ingress and egress of interface
/// `index` (none where there is no clsact qdisc).
async fn ferry_tc_filters(handle: &rtnetlink::Handle, index: u32) -> Vec<TcFilter> {
    let Ok(index) = i32::try_from(index) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
        let get = handle.traffic_filter(index).get();
        let get = if direction == TcAttachType::Egress {
            get.egress()
        } else {
            get.ingress()
        };
        let msgs: Vec<TcMessage> = get.execute().try_collect().await.unwrap_or_default();
        out.extend(
            msgs.iter()
                .filter_map(|m| tc_filter(m, direction))
                .filter(|f| Hook::is_tc_program(&f.program)),
        );
    }
    out
}

/// A cls_bpf filter with its program, from a filter dump message of
/// `direction`.
fn tc_filter(m: &TcMessage, direction: TcAttachType) -> Option<TcFilter> {
    let opts = m.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(o) => Some(o),
        _ => None,
    })?;
    let bpf = || {
        opts.iter().filter_map(|o| match o {
            TcOption::Bpf(b) => Some(b),
            _ => None,
        })
    };
    let program = bpf().find_map(|b| match b {
        TcFilterBpfOption::ProgName(n) => Some(n.clone()),
        _ => None,
    })?;
    let program_id = bpf().find_map(|b| match b {
        TcFilterBpfOption::ProgId(id) => Some(*id),
        _ => None,
    })?;
    Some(TcFilter {
        direction,
        program,
        program_id,
        priority: (m.header.info >> 16) as u16,
        handle: (u32::from(m.header.handle.major) << 16) | u32::from(m.header.handle.minor),
    })
}

fn iface(m: &LinkMessage) -> Option<Iface> {
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    let xdp = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(x) => xdp_attachment(x),
        _ => None,
    });
    Some(Iface {
        index: m.header.index,
        name,
        xdp,
        tc_filters: Vec::new(),
    })
}

fn xdp_attachment(attrs: &[LinkXdp]) -> Option<(XdpAttached, u32)> {
    let mode = attrs.iter().find_map(|a| match a {
        LinkXdp::Attached(m) if *m != XdpAttached::None => Some(*m),
        _ => None,
    })?;
    let id = attrs.iter().find_map(|a| match a {
        LinkXdp::ProgId(id) => Some(*id),
        _ => None,
    })?;
    Some((mode, id))
}

fn xdp_hook(mode: XdpAttached) -> &'static str {
    match mode {
        XdpAttached::Driver => "xdp native",
        XdpAttached::SocketBuffer => "xdp generic",
        XdpAttached::Hardware => "xdp offload",
        _ => "xdp",
    }
}

/// Names of loaded programs by id (names are cut at 15 bytes by the kernel;
/// Ferry's are shorter).
pub(crate) fn program_names() -> HashMap<u32, String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_string()))
        .collect()
}

/// Ferry's programs attached in this network namespace and through the
/// pinned cgroup links, with the agent's attach errors and the devices that
/// lack from-netdev.
pub async fn programs(dir: &Path, report: Option<&AgentReport>) -> Result<Vec<ProgramRow>, String> {
    let ifaces = interfaces().await?;
    let names = program_names();
    let mut rows = Vec::new();
    for i in &ifaces {
        rows.extend(tc_rows(i));
        if let Some((mode, id)) = i.xdp {
            let program = names.get(&id).cloned().unwrap_or_default();
            if program == PROG_XDP_FROM_NETDEV {
                rows.push(row(&i.name, Some(i.index), xdp_hook(mode), &program, None));
            }
        }
    }
    rows.extend(cgroup_rows(dir, report, &names));
    if let Some(r) = report {
        rows.extend(expected_but_missing(r, &ifaces, &rows));
    }
    if let Some(hint) = foreign_netns_hint(dir, &rows) {
        rows.push(hint);
    }
    Ok(rows)
}

fn row(interface: &str, ifindex: Option<u32>, hook: &str, program: &str, error: Option<String>) -> ProgramRow {
    ProgramRow {
        interface: interface.to_string(),
        ifindex,
        hook: hook.to_string(),
        program: program.to_string(),
        attached: error.is_none(),
        error,
    }
}

/// Ferry's TC programs on an interface: through TCX and netlink filters.
fn tc_rows(i: &Iface) -> Vec<ProgramRow> {
    let tcx = ferry_tcx_programs(&i.name)
        .into_iter()
        .map(|(n, _, hook)| row(&i.name, Some(i.index), hook, &n, None));
    let netlink = i.tc_filters.iter().map(|f| {
        row(
            &i.name,
            Some(i.index),
            TcMode::Netlink.hook_in(f.direction),
            &f.program,
            None,
        )
    });
    tcx.chain(netlink).collect()
}

/// Ferry's programs at TCX ingress and egress of `ifname`: (name, program
/// id, "tcx ingress" or "tcx egress"). An interface without TCX programs (or
/// a kernel without TCX) has none.
pub(crate) fn ferry_tcx_programs(ifname: &str) -> Vec<(String, u32, &'static str)> {
    [
        (TcAttachType::Ingress, "tcx ingress"),
        (TcAttachType::Egress, "tcx egress"),
    ]
    .into_iter()
    .filter_map(|(direction, hook)| Some((SchedClassifier::query_tcx(ifname, direction).ok()?.1, hook)))
    .flat_map(|(progs, hook)| {
        progs
            .iter()
            .filter_map(|p| Some((p.name_as_str()?.to_string(), p.id(), hook)))
            .filter(|(n, _, _)| Hook::is_tc_program(n))
            .collect::<Vec<_>>()
    })
    .collect()
}

/// The socket load balancer's pinned links (`links/<program>-cgroup`).
fn cgroup_rows(dir: &Path, report: Option<&AgentReport>, names: &HashMap<u32, String>) -> Vec<ProgramRow> {
    let wanted = report.and_then(|r| r.cgroup.as_ref());
    let cgroup = wanted.map_or_else(|| "cgroup".to_string(), |c| c.display().to_string());
    let mut rows: Vec<ProgramRow> = link_pins(dir)
        .into_iter()
        .filter(|(file, _)| file.ends_with("-cgroup"))
        .map(|(file, path)| {
            let id = PinnedLink::from_pin(&path)
                .map_err(|e| e.to_string())
                .and_then(|l| aya::programs::links::FdLink::from(l).info().map_err(|e| e.to_string()));
            match id {
                Ok(info) => {
                    let program = names.get(&info.program_id()).cloned().unwrap_or_default();
                    row(&cgroup, None, "cgroup", &program, None)
                }
                Err(e) => row(
                    &cgroup,
                    None,
                    "cgroup",
                    &file,
                    Some(format!("pinned link {}: {e}", path.display())),
                ),
            }
        })
        .collect();
    if wanted.is_some() && rows.is_empty() {
        let e = "not attached: no pinned cgroup link (--cgroup-path)".to_string();
        rows.push(row(&cgroup, None, "cgroup", "sock_connect4", Some(e)));
    }
    rows
}

/// (file name, path) of every pin under `<dir>/links`.
pub(crate) fn link_pins(dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let mut out: Vec<_> = std::fs::read_dir(dir.join("links"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// What the agent reported as failing, and what it was asked for but the
/// kernel does not show: from-netdev on each `--devices` entry, XDP on each
/// with `--xdp`.
fn expected_but_missing(r: &AgentReport, ifaces: &[Iface], rows: &[ProgramRow]) -> Vec<ProgramRow> {
    let tc_hook = r.tc_hook.as_deref().unwrap_or("tc ingress");
    let mut out: Vec<ProgramRow> = r
        .attach_errors
        .iter()
        .map(|e| row(&e.interface, None, tc_hook, &e.program, Some(e.error.clone())))
        .collect();
    let has = |dev: &str, prog: &str| rows.iter().any(|p| p.interface == dev && p.program == prog);
    for dev in &r.devices {
        let index = ifaces.iter().find(|i| &i.name == dev).map(|i| i.index);
        if !has(dev, PROG_FROM_NETDEV)
            && !has(dev, PROG_FROM_NETDEV_L3)
            && !r.attach_errors.iter().any(|e| &e.interface == dev)
        {
            let why = match index {
                None => "not attached: no such interface in this network namespace (--devices)",
                Some(_) => "not attached",
            };
            out.push(row(dev, index, tc_hook, PROG_FROM_NETDEV, Some(why.into())));
        }
        // L3 devices get no XDP program (see Links::hooks).
        if r.xdp.is_some() && index.is_some() && !has(dev, PROG_XDP_FROM_NETDEV) && !has(dev, PROG_FROM_NETDEV_L3) {
            let why = if r.xdp_refused.contains(dev) {
                "XDP could not attach in the allowed modes (--xdp-mode); TC serves this device alone"
            } else {
                "not attached"
            };
            out.push(row(dev, index, "xdp", PROG_XDP_FROM_NETDEV, Some(why.into())));
        }
    }
    out
}

/// Pins of interface links exist, but none of them shows on an interface
/// here: `ferry status` runs in another network namespace than the agent.
fn foreign_netns_hint(dir: &Path, rows: &[ProgramRow]) -> Option<ProgramRow> {
    let pinned: Vec<u32> = link_pins(dir)
        .iter()
        .filter_map(|(file, _)| file.rsplit_once('-')?.1.parse().ok())
        .collect();
    let seen = rows
        .iter()
        .any(|r| r.attached && r.ifindex.is_some_and(|i| pinned.contains(&i)));
    (!pinned.is_empty() && !seen).then(|| {
        row(
            "-",
            None,
            "-",
            "-",
            Some(format!(
                "{} interface links are pinned but none is attached to an interface of this network \
                 namespace: run `ferry status` in the node's network namespace",
                pinned.len()
            )),
        )
    })
}

/// Every pinned map of `dir`: entries against max_entries.
pub fn maps(dir: &Path) -> Vec<MapRow> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.iter().map(|p| map_row(p)).collect()
}

fn map_row(path: &Path) -> MapRow {
    let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let declared = Info::find(&name);
    let size_flag = declared.and_then(|i| i.size_flag);
    let info = match MapInfo::from_pin(path) {
        Ok(i) => i,
        Err(e) => {
            return MapRow {
                name,
                type_: String::new(),
                entries: None,
                max: 0,
                percent: None,
                warning: false,
                error: Some(format!("not a readable map: {e}")),
                size_flag,
            }
        }
    };
    let type_ = info.map_type().ok();
    let max = info.max_entries();
    let (entries, error) = if type_.is_some_and(has_keys) {
        match info
            .fd()
            .map_err(|e| e.to_string())
            .and_then(|fd| bpfsys::count_keys(fd.as_fd(), info.key_size(), max).map_err(|e| e.to_string()))
        {
            Ok(n) => (Some(n), None),
            Err(e) => (None, Some(format!("counting entries: {e}"))),
        }
    } else {
        (None, None)
    };
    let error = error.or_else(|| {
        let (d, t) = (declared?, type_?);
        (t != d.kind.map_type()).then(|| {
            format!(
                "pinned as {t:?}, but the agent declares the {} {:?} (the agent recreates it when it starts)",
                d.shown, d.kind
            )
        })
    });
    let percent = entries
        .filter(|_| max > 0)
        .map(|n| f64::from(n) * 100.0 / f64::from(max));
    MapRow {
        name,
        type_: type_.map(|t| format!("{t:?}")).unwrap_or_else(|| "unknown".into()),
        entries,
        max,
        percent,
        warning: percent.is_some_and(|p| p >= MAP_WARN_PERCENT),
        error,
        size_flag,
    }
}

/// Map types whose entries come and go (arrays are always full).
fn has_keys(t: MapType) -> bool {
    matches!(
        t,
        MapType::Hash | MapType::PerCpuHash | MapType::LruHash | MapType::LruPerCpuHash | MapType::LpmTrie
    )
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::tc::TcHandle;

    use super::*;

    #[test]
    fn a_full_map_names_the_flag_that_sizes_it_from_its_declaration() {
        let row = |name: &str| MapRow {
            name: name.into(),
            type_: "Hash".into(),
            entries: Some(95),
            max: 100,
            percent: Some(95.0),
            warning: true,
            error: None,
            size_flag: Info::find(name).and_then(|i| i.size_flag),
        };
        assert_eq!(
            row(ferry_common::SERVICES_MAP).fill_warning(),
            "map FERRY_SERVICES is 95% full (95 of 100 entries; raise --services-map-size)"
        );
        assert_eq!(
            row(ferry_common::CT_TCP_MAP).fill_warning(),
            "map FERRY_CT_TCP is 95% full (95 of 100 entries; raise --ct-map-size)"
        );
        assert_eq!(
            row(ferry_common::FRAGS_MAP).fill_warning(),
            "map FERRY_FRAGS is 95% full (95 of 100 entries)",
            "a map the agent does not declare"
        );
    }

    #[test]
    fn a_cls_bpf_filter_dump_names_program_id_priority_and_handle() {
        let mut m = TcMessage::default();
        m.header.info = (16 << 16) | 0x0300;
        m.header.handle = TcHandle { major: 0, minor: 0xf3 };
        m.attributes = vec![
            TcAttribute::Kind("bpf".into()),
            TcAttribute::Options(vec![
                TcOption::Bpf(TcFilterBpfOption::ProgName("from_pod".into())),
                TcOption::Bpf(TcFilterBpfOption::ProgId(42)),
            ]),
        ];
        let f = tc_filter(&m, TcAttachType::Egress).expect("a bpf filter");
        assert_eq!(
            f,
            TcFilter {
                direction: TcAttachType::Egress,
                program: "from_pod".into(),
                program_id: 42,
                priority: 16,
                handle: 0xf3
            }
        );
        // The priority's own entry carries no program.
        m.attributes.truncate(1);
        assert_eq!(tc_filter(&m, TcAttachType::Ingress), None);
    }
}
