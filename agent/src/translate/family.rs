//! Address families: the translation is family-generic (addresses are
//! `IpAddr`, prefixes `IpNet`), and one gate, [`Families`] in
//! [`super::Config`], says which families this node's dataplane serves.
//! Today that is IPv4 only (its maps are IPv4: `maps::layout` encodes them), so
//! an IPv6 address anywhere in the input is refused at validation with an error
//! naming its object and field, and an IPv6 `--service-cluster-ip-range` or
//! `--nodeport-addresses` CIDR is refused when the flags are parsed.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    pub fn of_net(net: IpNet) -> Self {
        Self::of(net.addr())
    }

    /// An EndpointSlice's `addressType` ("IPv4", "IPv6"; None for "FQDN",
    /// which names no address).
    pub fn of_address_type(t: &str) -> Option<Self> {
        match t {
            "IPv4" => Some(Self::V4),
            "IPv6" => Some(Self::V6),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// The families this node serves: the gate every address of the input passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    v4: bool,
    v6: bool,
}

impl Families {
    /// What the dataplane serves today: its maps hold IPv4 addresses only.
    pub const IPV4: Self = Self { v4: true, v6: false };
    /// Both families (dual stack): for the translation's own tests until the
    /// dataplane has IPv6 maps; `maps::layout` refuses IPv6 frontends.
    pub const IPV4_IPV6: Self = Self { v4: true, v6: true };

    pub fn admits(self, family: Family) -> bool {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    /// `net` when its family is served; else why not (for a flag's error).
    pub fn check_net(self, net: IpNet) -> Result<IpNet, String> {
        let family = Family::of_net(net);
        if self.admits(family) {
            Ok(net)
        } else {
            Err(format!("{family} is not supported yet"))
        }
    }

    /// "IPv4 address", "IPv6 address" or "IP address": what a valid
    /// address is, for errors.
    fn noun(self) -> &'static str {
        match (self.v4, self.v6) {
            (true, false) => "IPv4 address",
            (false, true) => "IPv6 address",
            _ => "IP address",
        }
    }
}

impl Default for Families {
    fn default() -> Self {
        Self::IPV4
    }
}

/// An address as a Kubernetes object spells it, of a family in `families`:
/// dotted decimal for IPv4 (leading zeros, "010.096.000.010", are octal to
/// inet_aton and decimal to Go's ParseIPSloppy, so two proxies would disagree:
/// refused rather than guessed at), RFC 4291 text for IPv6 (no zone), no
/// surrounding whitespace. The error says why; an address of a family not
/// served says so ("IPv6, not supported yet").
pub fn parse_ip(s: &str, families: Families) -> Result<IpAddr, String> {
    if let Ok(a) = s.parse::<IpAddr>() {
        let family = Family::of(a);
        return if families.admits(family) {
            Ok(a)
        } else {
            Err(format!("{family}, not supported yet"))
        };
    }
    let noun = families.noun();
    let octets: Vec<&str> = s.split('.').collect();
    let numeric = octets.len() == 4
        && octets
            .iter()
            .all(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()));
    Err(if s.trim() != s {
        format!("not an {noun}: it has surrounding whitespace")
    } else if s.contains(':') && !families.admits(Family::V6) {
        "IPv6, not supported yet".into()
    } else if s.contains(':') {
        "not an IPv6 address".into()
    } else if numeric && octets.iter().any(|o| o.len() > 1 && o.starts_with('0')) {
        "not an IPv4 address: leading zeros are ambiguous (octal to some parsers, decimal to others); write it without them"
            .into()
    } else {
        format!("not an {noun}")
    })
}

/// How many addresses [`nth_host`] hands out in `net`: all but the network
/// and broadcast addresses (at least one), at most `u32::MAX` (an IPv6 range
/// is larger than any cluster's Services).
pub fn host_count(net: IpNet) -> u32 {
    let bits = u32::from(net.max_prefix_len() - net.prefix_len());
    if bits >= 32 {
        u32::MAX - 1
    } else {
        ((1u64 << bits).saturating_sub(2).max(1)) as u32
    }
}

/// The `k`th allocatable address of `net` (`k` < [`host_count`]): the one
/// `k + 1` after the network address.
pub fn nth_host(net: IpNet, k: u32) -> IpAddr {
    match net {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).wrapping_add(1).wrapping_add(k))),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + 1 + u128::from(k))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_only_served_families_and_names_the_refused_one() {
        let v6: IpAddr = "fd00::10".parse().unwrap();
        assert_eq!(
            parse_ip("fd00::10", Families::IPV4),
            Err("IPv6, not supported yet".into())
        );
        assert_eq!(parse_ip("fd00::10", Families::IPV4_IPV6), Ok(v6));
        // Not an address at all: worded for what is served.
        assert_eq!(parse_ip("nope", Families::IPV4), Err("not an IPv4 address".into()));
        assert_eq!(parse_ip("nope", Families::IPV4_IPV6), Err("not an IP address".into()));
        assert_eq!(
            parse_ip("fd00::1%eth0", Families::IPV4_IPV6),
            Err("not an IPv6 address".into())
        );
        assert_eq!(
            Families::IPV4.check_net("fd00::/108".parse().unwrap()),
            Err("IPv6 is not supported yet".into())
        );
        let net: IpNet = "10.96.0.0/12".parse().unwrap();
        assert_eq!(Families::IPV4.check_net(net), Ok(net));
        assert_eq!(Family::of_address_type("FQDN"), None);
    }

    #[test]
    fn allocation_arithmetic_is_the_same_for_both_families() {
        let v4: IpNet = "10.96.0.0/30".parse().unwrap();
        assert_eq!(host_count(v4), 2);
        assert_eq!(nth_host(v4, 0), "10.96.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(host_count("0.0.0.0/0".parse().unwrap()), u32::MAX - 1);
        let v6: IpNet = "fd00::/108".parse().unwrap();
        assert_eq!(host_count(v6), (1 << 20) - 2);
        assert_eq!(nth_host(v6, 0x1_0000), "fd00::1:1".parse::<IpAddr>().unwrap());
        assert_eq!(host_count("fd00::/64".parse().unwrap()), u32::MAX - 1, "capped");
    }
}
