//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4), as Cilium's
//! `loadBalancer.algorithm=maglev` and Katran use it.
//!
//! A pure function of the backends' identities (address and port) and the
//! table size M: every node computes the same table for the same backends,
//! and the dataplane picks entry `maglev_flow_hash(flow) % M`
//! (`ferry_common::maglev_flow_hash`, compiled into both), so a flow reaches
//! the same backend through any node. Removing one of N backends changes
//! little more than the 1/N of the entries that named it.
use std::net::Ipv4Addr;

/// Whether `m` is prime (the table size must be: the permutations then
/// visit every entry).
pub fn is_prime(m: u32) -> bool {
    if m < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(m) {
        if m.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// 64-bit FNV-1a: fixed for ever (std's hasher may change between Rust
/// releases, and every node, of any version, must compute the same table).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// murmur3's 64-bit finaliser, to derive two independent hashes of a name.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// (offset, skip) of a backend's permutation: `offset + j * skip mod M`.
fn permutation(addr: Ipv4Addr, port: u16, m: u32) -> (u64, u64) {
    let name = format!("{addr}:{port}");
    let h = fnv1a64(name.as_bytes());
    let offset = fmix64(h ^ 0x6d61_676c_6576_3031) % u64::from(m);
    let skip = fmix64(h ^ 0x736b_6970_7365_6564) % (u64::from(m) - 1) + 1;
    (offset, skip)
}

/// The lookup table of size `m` (a prime, at least 2) over `backends`
/// (address, port), as indices into `backends`. Each backend gets `m / n`
/// or `m / n + 1` entries. The order of `backends` does not matter: the
/// turns go by the backends sorted by (address, port). Empty without
/// backends.
pub fn table(backends: &[(Ipv4Addr, u16)], m: u32) -> Vec<u32> {
    assert!(is_prime(m), "Maglev table size {m} is not prime");
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    order.dedup_by_key(|i| backends[*i]);
    if order.is_empty() {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| permutation(backends[i].0, backends[i].1, m))
        .collect();
    let mut next = vec![0u64; order.len()];
    const EMPTY: u32 = u32::MAX;
    let mut entry = vec![EMPTY; m as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (turn, &i) in order.iter().enumerate() {
            let (offset, skip) = perms[turn];
            let mut c = ((offset + next[turn] * skip) % u64::from(m)) as usize;
            while entry[c] != EMPTY {
                next[turn] += 1;
                c = ((offset + next[turn] * skip) % u64::from(m)) as usize;
            }
            entry[c] = i as u32;
            next[turn] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::{addr_to_map, maglev_flow_hash, port_to_map, DEFAULT_MAGLEV_TABLE_SIZE, PROTO_TCP};

    fn backends(n: u8) -> Vec<(Ipv4Addr, u16)> {
        (1..=n).map(|i| (Ipv4Addr::new(10, 244, i % 3, i), 8080)).collect()
    }

    /// The backend each table entry names, by identity.
    fn named(b: &[(Ipv4Addr, u16)], t: &[u32]) -> Vec<(Ipv4Addr, u16)> {
        t.iter().map(|&i| b[i as usize]).collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(DEFAULT_MAGLEV_TABLE_SIZE));
        assert!(is_prime(2) && is_prime(251) && is_prime(65_521));
        assert!(!is_prime(0) && !is_prime(1) && !is_prime(16_384) && !is_prime(65_535));
    }

    #[test]
    fn every_backend_gets_an_even_share_of_the_entries() {
        let m = DEFAULT_MAGLEV_TABLE_SIZE;
        for n in [1u8, 2, 3, 7, 10, 33] {
            let b = backends(n);
            let t = table(&b, m);
            assert_eq!(t.len(), m as usize);
            let mut counts = vec![0u32; b.len()];
            for &i in &t {
                counts[i as usize] += 1;
            }
            let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(
                *lo >= m / u32::from(n) && *hi <= m / u32::from(n) + 1,
                "n={n}: {counts:?}"
            );
        }
    }

    #[test]
    fn the_table_depends_on_the_backends_only_not_their_order() {
        let b = backends(5);
        let mut r = b.clone();
        r.reverse();
        assert_eq!(named(&b, &table(&b, 251)), named(&r, &table(&r, 251)));
        assert!(table(&[], 251).is_empty());
    }

    /// Removing one of N backends moves the entries that named it (1/N) and
    /// few others; adding one takes about 1/(N+1) of the entries.
    #[test]
    fn removing_or_adding_one_backend_disrupts_about_one_nth() {
        let m = DEFAULT_MAGLEV_TABLE_SIZE;
        for n in [3u8, 5, 10, 20] {
            let all = backends(n);
            let before = named(&all, &table(&all, m));
            let removed = all[all.len() / 2];
            let rest: Vec<_> = all.iter().copied().filter(|b| *b != removed).collect();
            let after = named(&rest, &table(&rest, m));
            let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64 / f64::from(m);
            let others = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| a != b && **a != removed)
                .count() as f64
                / f64::from(m);
            let ideal = 1.0 / f64::from(n);
            println!("n={n}: removing one changed {changed:.4} of the entries (ideal {ideal:.4}), {others:.4} not the removed backend's");
            assert!(
                changed >= ideal * 0.99 && changed <= ideal * 1.25,
                "n={n}: {changed} vs {ideal}"
            );
            assert!(
                others <= ideal * 0.25,
                "n={n}: {others} of the entries moved between remaining backends"
            );
            // And back: adding it again restores the first table exactly.
            assert_eq!(named(&all, &table(&all, m)), before);
            let added = after.iter().zip(&before).filter(|(a, b)| a != b).count() as f64 / f64::from(m);
            assert!(added <= ideal * 1.25, "n={n}: adding changed {added}");
        }
    }

    /// What the dataplane does with a table: flows spread evenly over the
    /// backends by `maglev_flow_hash`, and a flow's backend does not depend
    /// on the node address it was sent to.
    #[test]
    fn flows_spread_evenly_by_the_dataplanes_hash() {
        let m = DEFAULT_MAGLEV_TABLE_SIZE;
        let b = backends(4);
        let t = table(&b, m);
        let client = addr_to_map([192, 168, 77, 200]);
        let mut counts = [0u32; 4];
        for sport in 20_000..28_000u16 {
            let h = maglev_flow_hash(client, port_to_map(sport), port_to_map(30080), PROTO_TCP);
            counts[t[(h % m) as usize] as usize] += 1;
        }
        for c in counts {
            assert!((1_840..=2_160).contains(&c), "8000 flows over 4 backends: {counts:?}");
        }
    }
}
