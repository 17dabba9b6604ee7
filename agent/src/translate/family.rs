//! Address families: the translation is family-generic (addresses are
//! `IpAddr`, prefixes `IpNet`) and reads both families in every field. What
//! the dataplane serves is [`Families`] in [`super::Config`]: today IPv4 only
//! (its maps are IPv4: `maps::layout` encodes them), so the frontends of
//! another family are translated (`Translation::not_served`, each Service's
//! named once by [`super::not_served_notices`]) but not programmed.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

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

/// The families this node's dataplane serves: a frontend of another family
/// is translated but not programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    v4: bool,
    v6: bool,
}

impl Families {
    /// What the dataplane serves today: its maps hold IPv4 addresses only.
    pub const IPV4: Self = Self { v4: true, v6: false };
    /// Both families (dual stack): for the translation's own tests until the
    /// dataplane has IPv6 maps; `maps::layout` leaves IPv6 frontends out.
    pub const IPV4_IPV6: Self = Self { v4: true, v6: true };

    pub fn admits(self, family: Family) -> bool {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

impl Default for Families {
    fn default() -> Self {
        Self::IPV4
    }
}

/// An address as a Kubernetes object spells it, of either family: dotted
/// decimal for IPv4 (leading zeros, "010.096.000.010", are octal to inet_aton
/// and decimal to Go's ParseIPSloppy, so two proxies would disagree: refused
/// rather than guessed at), RFC 4291 text for IPv6 (no zone), no surrounding
/// whitespace. The error says why.
pub fn parse_ip(s: &str) -> Result<IpAddr, String> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(a);
    }
    let octets: Vec<&str> = s.split('.').collect();
    let numeric = octets.len() == 4
        && octets
            .iter()
            .all(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()));
    let noun = if s.contains(':') {
        "IPv6 address"
    } else if s.contains('.') || s.trim().bytes().all(|b| b.is_ascii_digit()) {
        "IPv4 address"
    } else {
        "IP address"
    };
    Err(if s.trim() != s {
        format!("not an {noun}: it has surrounding whitespace")
    } else if numeric && octets.iter().any(|o| o.len() > 1 && o.starts_with('0')) {
        "not an IPv4 address: leading zeros are ambiguous (octal to some parsers, decimal to others); write it without them"
            .into()
    } else {
        format!("not an {noun}")
    })
}

/// `--service-cluster-ip-range`: where ClusterIPs are allocated, at most one
/// range per family, as kube-apiserver's flag (`10.96.0.0/12,fd00::/108`); the
/// first given is the primary family (a single-stack Service without
/// `spec.ipFamilies` gets a ClusterIP of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceCidrs {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
    /// The family of the first range given (its range is always set).
    pub primary: Family,
}

impl ServiceCidrs {
    /// One range, of its family.
    pub fn single(net: IpNet) -> Self {
        match net {
            IpNet::V4(n) => Self {
                v4: Some(n),
                v6: None,
                primary: Family::V4,
            },
            IpNet::V6(n) => Self {
                v4: None,
                v6: Some(n),
                primary: Family::V6,
            },
        }
    }

    /// The range of `family`, if one was given.
    pub fn get(&self, family: Family) -> Option<IpNet> {
        match family {
            Family::V4 => self.v4.map(IpNet::V4),
            Family::V6 => self.v6.map(IpNet::V6),
        }
    }

    /// The other family than the primary one, when it has a range too.
    pub fn secondary(&self) -> Option<Family> {
        let other = match self.primary {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        };
        self.get(other).map(|_| other)
    }
}

impl std::str::FromStr for ServiceCidrs {
    type Err = String;

    /// "CIDR" or "CIDR,CIDR" of the two families.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out: Option<Self> = None;
        for (k, part) in s.split(',').map(str::trim).enumerate() {
            if k >= 2 {
                return Err(format!("{s:?}: at most two ranges, one per family"));
            }
            let net: IpNet = part.parse().map_err(|e| format!("{part:?}: {e}"))?;
            match &mut out {
                None => out = Some(Self::single(net)),
                Some(c) => {
                    let family = Family::of_net(net);
                    if c.get(family).is_some() {
                        return Err(format!("{s:?}: two {family} ranges; at most one per family"));
                    }
                    match net {
                        IpNet::V4(n) => c.v4 = Some(n),
                        IpNet::V6(n) => c.v6 = Some(n),
                    }
                }
            }
        }
        out.ok_or_else(|| "empty".to_string())
    }
}

impl fmt::Display for ServiceCidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let primary = self.get(self.primary).expect("the primary family has a range");
        write!(f, "{primary}")?;
        if let Some(other) = self.secondary().and_then(|s| self.get(s)) {
            write!(f, ",{other}")?;
        }
        Ok(())
    }
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
    fn both_families_parse_and_a_bad_spelling_is_named_by_the_family_it_looks_like() {
        let v6: IpAddr = "fd00::10".parse().unwrap();
        assert_eq!(parse_ip("fd00::10"), Ok(v6));
        assert_eq!(parse_ip("10.96.0.10"), Ok("10.96.0.10".parse().unwrap()));
        assert_eq!(parse_ip("nope"), Err("not an IP address".into()));
        assert_eq!(parse_ip("fd00::1%eth0"), Err("not an IPv6 address".into()));
        assert_eq!(parse_ip("10.96.10"), Err("not an IPv4 address".into()));
        assert!(!Families::IPV4.admits(Family::V6) && Families::IPV4.admits(Family::V4));
        assert_eq!(Family::of_address_type("FQDN"), None);
    }

    #[test]
    fn service_cidrs_take_one_range_per_family_the_first_primary() {
        let one: ServiceCidrs = "10.96.0.0/12".parse().unwrap();
        assert_eq!((one.primary, one.v6, one.secondary()), (Family::V4, None, None));
        assert_eq!(one.to_string(), "10.96.0.0/12");
        let dual: ServiceCidrs = "fd00::/108, 10.96.0.0/12".parse().unwrap();
        assert_eq!(dual.primary, Family::V6);
        assert_eq!(dual.secondary(), Some(Family::V4));
        assert_eq!(dual.get(Family::V4), Some("10.96.0.0/12".parse().unwrap()));
        assert_eq!(dual.to_string(), "fd00::/108,10.96.0.0/12");
        let v6_only: ServiceCidrs = "fd00::/108".parse().unwrap();
        assert_eq!((v6_only.primary, v6_only.v4), (Family::V6, None));
        for (bad, why) in [
            ("10.96.0.0/12,10.100.0.0/16", "two IPv4 ranges"),
            ("fd00::/108,fd01::/108", "two IPv6 ranges"),
            ("10.96.0.0/12,fd00::/108,10.1.0.0/16", "at most two ranges"),
            ("10.96.0.0/33", "invalid IP address syntax"),
            ("", "invalid IP address syntax"),
        ] {
            let e = bad.parse::<ServiceCidrs>().expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
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
