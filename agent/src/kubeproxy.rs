//! Is kube-proxy's ruleset still on this node? Its iptables modes create the
//! chain KUBE-SERVICES in the nat table (iptables-legacy: the kernel's
//! ip_tables; iptables-nft: an nftables table `ip nat`), its nftables mode the
//! tables `ip kube-proxy` and `ip6 kube-proxy`.
//!
//! Read without running iptables or nft, and without a C library: no Rust
//! crate lists nftables chains without libnftnl (or without pulling in a whole
//! rule-building API), so this module speaks the two kernel interfaces
//! directly, read-only: an nf_tables chain dump over NETLINK_NETFILTER, and
//! the ip_tables `IPT_SO_GET_INFO`/`IPT_SO_GET_ENTRIES` socket options for the
//! tables /proc/net/ip_tables_names lists (only those: asking for another
//! would make the kernel load its module).
use std::{fmt, io, os::fd::AsRawFd as _};

use netlink_sys::{constants::NETLINK_NETFILTER, Socket, SocketAddr};

/// `--kube-proxy-rules`: what the agent does when it finds them at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KubeProxyRules {
    /// Log a warning with the cleanup command, and go on.
    #[default]
    Warn,
    /// Refuse to start.
    Fail,
    /// Do not look.
    Ignore,
}

/// One trace of kube-proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// iptables-legacy: a KUBE-SERVICES chain in this ip_tables table.
    Legacy { table: String },
    /// nftables (iptables-nft): a KUBE-SERVICES chain in this table.
    NftChain { family: &'static str, table: String },
    /// kube-proxy's own nftables table (`--proxy-mode=nftables`).
    NftTable { family: &'static str },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Legacy { table } => {
                write!(f, "iptables-legacy: chain KUBE-SERVICES in table {table}")
            }
            Self::NftChain { family, table } => {
                write!(
                    f,
                    "iptables-nft: chain KUBE-SERVICES in nftables table {family} {table}"
                )
            }
            Self::NftTable { family } => write!(f, "nftables: table {family} kube-proxy"),
        }
    }
}

impl Finding {
    /// The command that removes it.
    pub fn cleanup(&self) -> String {
        match self {
            Self::Legacy { .. } | Self::NftChain { .. } => {
                "kube-proxy --cleanup (from the kube-proxy image, on the host network)".into()
            }
            Self::NftTable { family } => {
                format!("nft delete table {family} kube-proxy (or kube-proxy --cleanup)")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeProxyError {
    #[error(
        "kube-proxy's rules are on this node ({}); remove them first ({}), or start with \
         --kube-proxy-rules=warn",
        list(.0),
        cleanups(.0)
    )]
    Found(Vec<Finding>),
}

fn list(found: &[Finding]) -> String {
    found.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

fn cleanups(found: &[Finding]) -> String {
    let mut c: Vec<String> = Vec::new();
    for f in found {
        let cmd = f.cleanup();
        if !c.contains(&cmd) {
            c.push(cmd);
        }
    }
    c.join("; ")
}

/// Looks for kube-proxy's rules and acts as `mode` says. A check that cannot
/// run (no permission, say) is logged and does not stop the agent.
pub fn check(mode: KubeProxyRules) -> Result<(), KubeProxyError> {
    if mode == KubeProxyRules::Ignore {
        return Ok(());
    }
    let (found, errors) = detect();
    for e in errors {
        tracing::warn!("could not check for kube-proxy's rules: {e}");
    }
    if found.is_empty() {
        return Ok(());
    }
    if mode == KubeProxyRules::Fail {
        return Err(KubeProxyError::Found(found));
    }
    tracing::warn!(
        found = %list(&found),
        "kube-proxy's rules are on this node: for traffic Ferry does not translate first (host \
         processes outside --cgroup-path, traffic arriving on devices not in --devices) they \
         still translate Services to the endpoints kube-proxy saw last, which nothing updates. \
         Remove them: {}",
        cleanups(&found)
    );
    Ok(())
}

/// Everything found, and the checks that failed.
pub fn detect() -> (Vec<Finding>, Vec<String>) {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    match nft_chains() {
        Ok(chains) => found.extend(nft_findings(&chains)),
        // A kernel without nf_tables has no such rules.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EPROTONOSUPPORT)) => {}
        Err(e) => errors.push(format!("listing nftables chains: {e}")),
    }
    let tables = std::fs::read_to_string("/proc/net/ip_tables_names").unwrap_or_default();
    for table in tables.lines().map(str::trim).filter(|t| !t.is_empty()) {
        match legacy_chains(table) {
            Ok(chains) if chains.iter().any(|c| c == KUBE_SERVICES) => found.push(Finding::Legacy {
                table: table.to_string(),
            }),
            Ok(_) => {}
            Err(e) => errors.push(format!("reading ip_tables table {table}: {e}")),
        }
    }
    (found, errors)
}

const KUBE_SERVICES: &str = "KUBE-SERVICES";

/// An nftables chain: (family, table, chain).
type NftChain = (u8, String, String);

fn family_name(f: u8) -> &'static str {
    match f as i32 {
        libc::NFPROTO_IPV4 => "ip",
        libc::NFPROTO_IPV6 => "ip6",
        libc::NFPROTO_INET => "inet",
        libc::NFPROTO_ARP => "arp",
        libc::NFPROTO_BRIDGE => "bridge",
        libc::NFPROTO_NETDEV => "netdev",
        _ => "unknown",
    }
}

fn nft_findings(chains: &[NftChain]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (family, table, chain) in chains {
        let family = family_name(*family);
        if chain == KUBE_SERVICES && table != "kube-proxy" {
            out.push(Finding::NftChain {
                family,
                table: table.clone(),
            });
        }
        let t = Finding::NftTable { family };
        if table == "kube-proxy" && !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

// nfnetlink / nf_tables constants (linux/netfilter/nfnetlink.h, nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Every nftables chain of this network namespace (a GETCHAIN dump).
fn nft_chains() -> io::Result<Vec<NftChain>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    // nlmsghdr (16 bytes) + nfgenmsg { family AF_UNSPEC, version 0, res_id 0 }.
    let mut req = Vec::with_capacity(20);
    req.extend_from_slice(&20u32.to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN).to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[0, 0, 0, 0]);
    socket.send_to(&req, &SocketAddr::new(0, 0), 0)?;
    let mut chains = Vec::new();
    loop {
        let (buf, _) = socket.recv_from_full()?;
        if buf.is_empty() {
            return Ok(chains);
        }
        if parse_chain_dump(&buf, &mut chains)? {
            return Ok(chains);
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "a truncated netlink message")
}

/// Adds the chains of one datagram of the dump; true at its end.
fn parse_chain_dump(buf: &[u8], out: &mut Vec<NftChain>) -> io::Result<bool> {
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32_at(buf, at).ok_or_else(truncated)? as usize;
        let kind = u16_at(buf, at + 4).ok_or_else(truncated)?;
        let msg = buf.get(at..at + len).filter(|_| len >= 16).ok_or_else(truncated)?;
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = u32_at(msg, 16).ok_or_else(truncated)? as i32;
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                return Ok(true);
            }
            _ => {
                if let Some(chain) = parse_chain(&msg[16..]) {
                    out.push(chain);
                }
            }
        }
        at += (len + 3) & !3;
    }
    Ok(false)
}

/// nfgenmsg (family first) and the attributes of one chain.
fn parse_chain(payload: &[u8]) -> Option<NftChain> {
    let family = *payload.first()?;
    let (mut table, mut name) = (None, None);
    let mut at = 4;
    while at + 4 <= payload.len() {
        let len = u16_at(payload, at)? as usize;
        let kind = u16_at(payload, at + 2)? & NLA_TYPE_MASK;
        let value = payload.get(at + 4..at + len.max(4))?;
        match kind {
            NFTA_CHAIN_TABLE => table = Some(cstr(value)),
            NFTA_CHAIN_NAME => name = Some(cstr(value)),
            _ => {}
        }
        at += (len.max(4) + 3) & !3;
    }
    Some((family, table?, name?))
}

// ip_tables socket options (linux/netfilter_ipv4/ip_tables.h).
const IPT_SO_GET_INFO: libc::c_int = 64;
const IPT_SO_GET_ENTRIES: libc::c_int = 65;
/// sizeof(struct ipt_getinfo); `size` is its last field.
const GETINFO_LEN: usize = 84;
/// sizeof(struct ipt_get_entries) before the entries (name, size, padding).
const GET_ENTRIES_HEADER: usize = 40;
/// Offsets in struct ipt_entry.
const ENTRY_TARGET_OFFSET: usize = 88;
const ENTRY_NEXT_OFFSET: usize = 90;
/// struct xt_entry_target: u16 target_size, char name[29], u8 revision.
const TARGET_HEADER: usize = 32;

/// The user-defined chains of an ip_tables table (their heads are entries
/// whose target is ERROR, with the chain's name as its data).
fn legacy_chains(table: &str) -> io::Result<Vec<String>> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut name = [0u8; 32];
    let n = table.len().min(31);
    name[..n].copy_from_slice(&table.as_bytes()[..n]);
    let mut info = [0u8; GETINFO_LEN];
    info[..32].copy_from_slice(&name);
    getsockopt(&sock, IPT_SO_GET_INFO, &mut info)?;
    let size = u32_at(&info, GETINFO_LEN - 4).ok_or_else(truncated)? as usize;
    let mut entries = vec![0u8; GET_ENTRIES_HEADER + size];
    entries[..32].copy_from_slice(&name);
    entries[32..36].copy_from_slice(&(size as u32).to_ne_bytes());
    getsockopt(&sock, IPT_SO_GET_ENTRIES, &mut entries)?;
    Ok(error_targets(&entries[GET_ENTRIES_HEADER..]))
}

fn getsockopt(sock: &std::net::UdpSocket, opt: libc::c_int, buf: &mut [u8]) -> io::Result<()> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            opt,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The data of every ERROR target in an entry table, except the table's
/// closing one (also ERROR, named "ERROR").
fn error_targets(table: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(target), Some(next)) = (
        u16_at(table, at + ENTRY_TARGET_OFFSET),
        u16_at(table, at + ENTRY_NEXT_OFFSET),
    ) {
        let t = at + target as usize;
        if let Some(header) = table.get(t..t + TARGET_HEADER) {
            if cstr(&header[2..31]) == "ERROR" {
                let data = cstr(table.get(t + TARGET_HEADER..at + next as usize).unwrap_or_default());
                if data != "ERROR" {
                    out.push(data);
                }
            }
        }
        if next == 0 {
            break;
        }
        at += next as usize;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attribute: len, type, value padded to 4.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    fn nlmsg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = ((16 + payload.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(payload);
        m
    }

    fn chain_msg(family: u8, table: &str, chain: &str) -> Vec<u8> {
        let mut p = vec![family, 0, 0, 0];
        p.extend(nla(NFTA_CHAIN_TABLE, format!("{table}\0").as_bytes()));
        p.extend(nla(2, &7u64.to_be_bytes()));
        p.extend(nla(NFTA_CHAIN_NAME, format!("{chain}\0").as_bytes()));
        nlmsg((NFNL_SUBSYS_NFTABLES << 8) | 3, &p)
    }

    #[test]
    fn a_chain_dump_yields_kube_proxys_chains_and_tables() {
        let mut buf = chain_msg(2, "nat", "PREROUTING");
        buf.extend(chain_msg(2, "nat", "KUBE-SERVICES"));
        buf.extend(chain_msg(10, "kube-proxy", "services"));
        buf.extend(chain_msg(10, "kube-proxy", "KUBE-SERVICES"));
        buf.extend(chain_msg(1, "filter", "KUBE-SERVICE"));
        let mut chains = Vec::new();
        assert!(!parse_chain_dump(&buf, &mut chains).unwrap(), "no DONE yet");
        assert_eq!(chains.len(), 5);
        assert_eq!(chains[1], (2, "nat".to_string(), "KUBE-SERVICES".to_string()));
        assert!(parse_chain_dump(&nlmsg(NLMSG_DONE, &[0; 4]), &mut chains).unwrap());
        assert_eq!(
            nft_findings(&chains),
            vec![
                Finding::NftChain {
                    family: "ip",
                    table: "nat".into()
                },
                Finding::NftTable { family: "ip6" },
            ]
        );
        let err = parse_chain_dump(&nlmsg(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes()), &mut chains).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert!(parse_chain_dump(&buf[..30], &mut Vec::new()).is_err(), "truncated");
    }

    /// An ipt_entry with a target of `name` and `data`.
    fn entry(name: &str, data: &str) -> Vec<u8> {
        let mut target = vec![0u8; TARGET_HEADER + 32];
        target[2..2 + name.len()].copy_from_slice(name.as_bytes());
        target[TARGET_HEADER..TARGET_HEADER + data.len()].copy_from_slice(data.as_bytes());
        let mut e = vec![0u8; 112];
        e[ENTRY_TARGET_OFFSET..ENTRY_TARGET_OFFSET + 2].copy_from_slice(&112u16.to_ne_bytes());
        let next = (112 + target.len()) as u16;
        e[ENTRY_NEXT_OFFSET..ENTRY_NEXT_OFFSET + 2].copy_from_slice(&next.to_ne_bytes());
        e.extend(target);
        e
    }

    #[test]
    fn user_chains_are_the_error_targets_of_an_entry_table() {
        let mut table = entry("", "");
        table.extend(entry("ERROR", "KUBE-SERVICES"));
        table.extend(entry("DNAT", "KUBE-SERVICES"));
        table.extend(entry("ERROR", "ERROR"));
        assert_eq!(error_targets(&table), vec!["KUBE-SERVICES".to_string()]);
        assert!(error_targets(&table[..50]).is_empty(), "truncated");
    }
}
