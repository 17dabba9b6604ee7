//! The dataplane's maps. Layout and names come from `ferry_common` (the one place
//! that owns them); every map is pinned by name so that maps, and with them
//! connection tracking, survive agent restarts.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use ferry_common::{
    config, AffinityKey, AffinityValue, Backend, Counter, CtKey, CtValue, FragKey, FragPorts, RevNat, ServiceKey,
    ServiceName, ServiceValue, SockRevKey, SrcRangeKey, SvcStats, COUNTER_COUNT, DEFAULT_AFFINITY_MAX,
    DEFAULT_BACKENDS_MAX, DEFAULT_CT_ANY_MAX, DEFAULT_CT_TCP_MAX, DEFAULT_FRAGS_MAX, DEFAULT_FRONTEND_ADDRS_MAX,
    DEFAULT_MAGLEV_TABLES, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_REVNAT_MAX, DEFAULT_SERVICES_MAX,
    DEFAULT_SOCK_LB_SKIP_MAX, DEFAULT_SOCK_REVNAT_MAX, DEFAULT_SRC_RANGES_MAX, NODE_ADDRS_MAX,
};

#[map(name = "FERRY_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(DEFAULT_SERVICES_MAX, 0);

#[map(name = "FERRY_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_BACKENDS_MAX, 0);

#[map(name = "FERRY_REVNAT")]
pub static REVNAT: HashMap<u16, RevNat> = HashMap::pinned(DEFAULT_REVNAT_MAX, 0);

/// TCP connection tracking: a plain hash, so established flows are never
/// evicted to make room; entries go when they expire (see `ct`).
#[map(name = "FERRY_CT_TCP")]
pub static CT_TCP: HashMap<CtKey, CtValue> = HashMap::pinned(DEFAULT_CT_TCP_MAX, 0);

/// IPv4 fragments: the ports of each datagram's first fragment, for the
/// fragments after it (`parse`).
#[map(name = "FERRY_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(DEFAULT_FRAGS_MAX, 0);

/// Connection tracking of UDP, and of TCP flows the TCP table had no room
/// for (LRU).
#[map(name = "FERRY_CT_ANY")]
pub static CT_ANY: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(DEFAULT_CT_ANY_MAX, 0);

#[map(name = "FERRY_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(DEFAULT_AFFINITY_MAX, 0);

/// Socket-level LB: (socket, backend) → the frontend, for UDP replies.
#[map(name = "FERRY_SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, RevNat> = LruHashMap::pinned(DEFAULT_SOCK_REVNAT_MAX, 0);

/// Network namespaces (cookie) the socket load balancer leaves to the TC path
/// (`--socket-lb-skip-netns`).
#[map(name = "FERRY_SOCK_LB_SKIP")]
pub static SOCK_LB_SKIP: HashMap<u64, u8> = HashMap::pinned(DEFAULT_SOCK_LB_SKIP_MAX, 0);

/// loadBalancerSourceRanges: (reverse-NAT id, client prefix) → 1, read by
/// `lb::source_allowed` (aya's LpmTrie sets BPF_F_NO_PREALLOC, which LPM tries
/// require).
#[map(name = "FERRY_SRC_RANGES")]
pub static SRC_RANGES: LpmTrie<SrcRangeKey, u8> = LpmTrie::pinned(DEFAULT_SRC_RANGES_MAX, 0);

/// Maglev lookup tables (`ferry_common::MAGLEV_MAP`): table `t`, entry `i`
/// at `t * M + i` names a backend id; sized by the agent
/// (`--maglev-tables` × `--maglev-table-size`).
#[map(name = "FERRY_MAGLEV")]
pub static MAGLEV: Array<u32> = Array::pinned(DEFAULT_MAGLEV_TABLES * DEFAULT_MAGLEV_TABLE_SIZE, 0);
/// The node's own addresses (wire order → 1), written by the agent.
#[map(name = "FERRY_NODE_ADDRS")]
pub static NODE_ADDRS: HashMap<u32, u8> = HashMap::pinned(NODE_ADDRS_MAX, 0);

/// Whether `addr` (wire order) is one of the node's own addresses.
#[inline(always)]
pub fn is_node_addr(addr: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { NODE_ADDRS.get(&addr) }.is_some()
}

/// The frontend gate's addresses outside the service CIDR
/// (`ferry_common::FRONTEND_ADDRS_MAP`).
#[map(name = "FERRY_FRONTEND_ADDRS")]
pub static FRONTEND_ADDRS: HashMap<u32, u8> = HashMap::pinned(DEFAULT_FRONTEND_ADDRS_MAX, 0);

/// Whether a packet to `addr` (wire order) may be for a frontend, so worth
/// the forward conntrack and services lookups: always until the agent turns
/// the gate on; then when `addr` is in the service CIDR or in
/// [`FRONTEND_ADDRS`].
#[inline(always)]
pub fn may_be_frontend(addr: u32) -> bool {
    if config(config::FRONTEND_GATE) == 0 {
        return true;
    }
    let mask = config(config::SERVICE_CIDR_MASK);
    if mask != 0 && addr & mask == config(config::SERVICE_CIDR_ADDR) {
        return true;
    }
    // SAFETY: the value is only tested for presence.
    unsafe { FRONTEND_ADDRS.get(&addr) }.is_some()
}

/// Node settings written by the agent (indices: `ferry_common::config`).
#[map(name = "FERRY_CONFIG")]
pub static CONFIG: Array<u32> = Array::pinned(config::COUNT, 0);

/// A node setting (0 when unset).
#[inline(always)]
pub fn config(index: u32) -> u32 {
    CONFIG.get(index).copied().unwrap_or(0)
}

#[map(name = "FERRY_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

/// Names for inspection only (`ferry svc list`); the programs never read it.
#[map(name = "FERRY_SVC_NAMES")]
pub static SVC_NAMES: HashMap<u16, ServiceName> = HashMap::pinned(DEFAULT_REVNAT_MAX, 0);

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(c: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *v += 1 };
    }
}

/// Per-frontend traffic, keyed by reverse-NAT id (the agent removes an entry when
/// it frees the id).
#[map(name = "FERRY_SVC_STATS")]
pub static SVC_STATS: PerCpuHashMap<u16, SvcStats> = PerCpuHashMap::pinned(DEFAULT_REVNAT_MAX, 0);

/// Counts one packet of `bytes` sent to the frontend `rev_nat_id`.
#[inline(always)]
pub fn count_service(rev_nat_id: u16, bytes: u32) {
    match SVC_STATS.get_ptr_mut(rev_nat_id) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        Some(s) => unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes as u64;
        },
        None => {
            // A full map only loses statistics, never traffic.
            let _ = SVC_STATS.insert(
                rev_nat_id,
                SvcStats {
                    packets: 1,
                    bytes: bytes as u64,
                },
                0,
            );
        }
    }
}
