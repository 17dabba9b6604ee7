//! Which node runs a Pod that does not name one (no spec.nodeName).
//!
//! There is no scheduler in the lab: every node's shim reads the same manifests
//! and must agree, without talking to the others, on the one node that runs each
//! such Pod. So the choice is a pure function of the Pod and the sorted node
//! list, with a hash fixed here (FNV-1a, 64 bit) rather than std's
//! `DefaultHasher`, whose output may change between Rust releases (two shims
//! built by different toolchains would then disagree):
//!
//! - a standalone Pod runs on `nodes[fnv1a("<namespace>/<name>") % n]`;
//! - replica `i` of a Deployment (the Pod `<deployment>-<i>`) runs on
//!   `nodes[(fnv1a("<namespace>/<deployment>") + i) % n]`: round-robin from a
//!   hashed first node, so a Deployment's replicas spread evenly (node counts
//!   differ by at most one) and different Deployments start on different nodes.

/// FNV-1a, 64 bit: a tiny, fixed hash (the same on every build and machine).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET_BASIS, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// The nodes Pods without spec.nodeName are spread over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Sorted, without duplicates, never empty.
    nodes: Vec<String>,
}

/// The replica indices of a Deployment one node runs: `first`, `first +
/// stride`, `first + 2 * stride`, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    pub first: u32,
    /// The number of nodes (0 is taken as 1).
    pub stride: u32,
}

impl Slots {
    /// Every index: a single node runs all replicas.
    pub const ALL: Slots = Slots { first: 0, stride: 1 };

    /// How many of the indices `0..replicas` are this node's.
    pub fn count(&self, replicas: u32) -> u32 {
        if self.first >= replicas {
            0
        } else {
            (replicas - self.first - 1) / self.stride.max(1) + 1
        }
    }

    /// Whether replica index `i` is one of these.
    pub fn has(&self, i: u64) -> bool {
        let (first, stride) = (u64::from(self.first), u64::from(self.stride.max(1)));
        i >= first && (i - first).is_multiple_of(stride)
    }

    /// The `k`-th index of this node.
    pub fn index(&self, k: u32) -> u64 {
        u64::from(self.first) + u64::from(k) * u64::from(self.stride.max(1))
    }
}

impl Placement {
    /// The node list, in any order; None if it is empty (no spreading: a Pod
    /// without spec.nodeName runs on whichever node reads it).
    pub fn new<S: AsRef<str>>(nodes: &[S]) -> Option<Self> {
        let mut nodes: Vec<String> = nodes.iter().map(|n| n.as_ref().to_string()).collect();
        nodes.sort();
        nodes.dedup();
        (!nodes.is_empty()).then_some(Self { nodes })
    }

    /// The nodes, sorted.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub fn contains(&self, node: &str) -> bool {
        self.nodes.binary_search_by(|n| n.as_str().cmp(node)).is_ok()
    }

    /// The node that runs the standalone Pod `namespace/name`.
    pub fn pod_node(&self, namespace: &str, name: &str) -> &str {
        let h = fnv1a(format!("{namespace}/{name}").as_bytes());
        &self.nodes[self.modulo(h)]
    }

    /// The node that runs replica `index` of the Deployment `namespace/name`.
    pub fn replica_node(&self, namespace: &str, deployment: &str, index: u64) -> &str {
        let first = self.modulo(fnv1a(format!("{namespace}/{deployment}").as_bytes()));
        &self.nodes[(first + self.modulo(index)) % self.nodes.len()]
    }

    /// The replica indices of the Deployment `namespace/name` that `node` runs
    /// (none if it is not one of the nodes).
    pub fn slots(&self, namespace: &str, deployment: &str, node: &str) -> Option<Slots> {
        let n = self.nodes.len();
        let position = self.nodes.iter().position(|x| x == node)?;
        let first = self.modulo(fnv1a(format!("{namespace}/{deployment}").as_bytes()));
        Some(Slots {
            first: ((position + n - first) % n) as u32,
            stride: n as u32,
        })
    }

    fn modulo(&self, h: u64) -> usize {
        (h % self.nodes.len() as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_values() {
        // From the FNV reference test vectors (64-bit FNV-1a).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn every_node_agrees_whatever_order_it_was_given() {
        let a = Placement::new(&["n2", "n1", "n3"]).unwrap();
        let b = Placement::new(&["n3", "n1", "n2", "n1"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.nodes(), ["n1", "n2", "n3"]);
        for i in 0..50 {
            let name = format!("pod-{i}");
            assert_eq!(a.pod_node("default", &name), b.pod_node("default", &name));
        }
        assert!(Placement::new::<&str>(&[]).is_none());
    }

    #[test]
    fn the_choice_is_stable() {
        // Fixed by the hash: a change here would move Pods between nodes
        // (fnv1a("default/client") = 0xb5eb0c41497fda94, "default/echo" =
        // 0xe2ad5e5f7587893a, both even).
        let p = Placement::new(&["n2", "n1"]).unwrap();
        assert_eq!(fnv1a(b"default/client"), 0xb5eb_0c41_497f_da94);
        assert_eq!(p.pod_node("default", "client"), "n1");
        assert_eq!(fnv1a(b"default/echo"), 0xe2ad_5e5f_7587_893a);
        let replicas: Vec<&str> = (0..4).map(|i| p.replica_node("default", "echo", i)).collect();
        assert_eq!(replicas, ["n1", "n2", "n1", "n2"]);
    }

    #[test]
    fn standalone_pods_spread() {
        let p = Placement::new(&["n1", "n2", "n3"]).unwrap();
        let mut per_node = std::collections::BTreeMap::<&str, usize>::new();
        for i in 0..30 {
            *per_node.entry(p.pod_node("default", &format!("web-{i}"))).or_default() += 1;
        }
        assert_eq!(per_node.len(), 3, "{per_node:?}");
    }

    #[test]
    fn replicas_spread_evenly_and_each_node_knows_its_slots() {
        for nodes in [&["n1", "n2"][..], &["a", "b", "c"], &["only"]] {
            let p = Placement::new(nodes).unwrap();
            for replicas in [0u32, 1, 2, 5, 6, 7] {
                let mut counts = Vec::new();
                for node in nodes {
                    let s = p.slots("default", "echo", node).unwrap();
                    let mine: Vec<u64> = (0..s.count(replicas)).map(|k| s.index(k)).collect();
                    for i in &mine {
                        assert!(*i < u64::from(replicas));
                        assert!(s.has(*i));
                        assert_eq!(p.replica_node("default", "echo", *i), *node);
                    }
                    counts.push(mine.len() as u32);
                }
                assert_eq!(counts.iter().sum::<u32>(), replicas, "{nodes:?} {replicas}");
                for i in 0..u64::from(replicas) {
                    let owners = nodes.iter().filter(|n| p.slots("default", "echo", n).unwrap().has(i));
                    assert_eq!(owners.count(), 1, "{nodes:?}: index {i}");
                }
                let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(max - min <= 1, "{nodes:?} {replicas}: {counts:?}");
            }
        }
        let p = Placement::new(&["n1", "n2"]).unwrap();
        assert_eq!(p.slots("default", "echo", "n9"), None);
    }
}
