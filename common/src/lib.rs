//! The one place that owns Ferry's BPF map layout.
//!
//! Every key and value the dataplane (`dataplane-ebpf`) and the agent exchange is
//! defined here, `#[repr(C)]`, with explicit padding so that no byte is left
//! uninitialised (the kernel hashes keys bytewise). `size_of` of each type is
//! asserted at compile time below.
//!
//! Byte order: addresses and ports are stored exactly as they appear on the wire
//! (network byte order), so the dataplane can compare them with packet fields
//! without swapping. Use [`addr_to_map`]/[`port_to_map`] and their inverses in
//! userspace.
//!
//! The layout follows Cilium's lb4 maps:
//! - [`SERVICES_MAP`]: `{vip, port, proto, scope, slot}` → [`ServiceValue`]. Slot 0
//!   describes the Service frontend (backend count, reverse-NAT id, flags); slots
//!   `1..=count` name the backend ids to choose from.
//! - [`BACKENDS_MAP`]: backend id → [`Backend`] `{ip, port}`.
//! - [`REVNAT_MAP`]: reverse-NAT id → [`RevNat`] `{vip, port}` for replies.
//! - [`CT_TCP_MAP`] and [`CT_ANY_MAP`]: connection tracking, [`CtKey`] →
//!   [`CtValue`], TCP apart from everything else (Cilium's ct4_global and
//!   ct_any4_global) so that a UDP storm cannot evict established TCP flows.
//!   The TCP table is a plain hash: its entries go only when they expire (the
//!   agent's garbage collector) or close, never to make room; when it is full,
//!   new TCP flows are tracked in the LRU any-table instead (and counted).
//! - [`AFFINITY_MAP`]: LRU session affinity (sessionAffinity: ClientIP),
//!   [`AffinityKey`] `{client, rev_nat_id}` → [`AffinityValue`] `{backend, last used}`.
//! - [`COUNTERS_MAP`]: per-CPU counters indexed by [`Counter`].
//! - [`SRC_RANGES_MAP`]: LPM trie of loadBalancerSourceRanges,
//!   `{prefixlen, rev_nat_id, addr}` → `u8` (Cilium's lb4_src_range).
//! - [`NODE_ADDRS_MAP`]: the node's own IPv4 addresses (wire order) → `u8`
//!   (1), kept current by the agent: a translated packet to one of them is
//!   delivered by the node's stack, not forwarded (counted apart from a FIB
//!   miss).
#![no_std]

use core::mem::size_of;

/// Map names, also the file names under the pin directory (`<bpffs>/<name>`).
pub const SERVICES_MAP: &str = "FERRY_SERVICES";
pub const BACKENDS_MAP: &str = "FERRY_BACKENDS";
pub const REVNAT_MAP: &str = "FERRY_REVNAT";
/// TCP flows (a plain hash: never evicted, only expired).
pub const CT_TCP_MAP: &str = "FERRY_CT_TCP";
/// UDP flows, and TCP flows that did not fit in the TCP table (LRU).
pub const CT_ANY_MAP: &str = "FERRY_CT_ANY";
/// Both connection-tracking tables.
pub const CT_MAPS: [&str; 2] = [CT_TCP_MAP, CT_ANY_MAP];
/// IPv4 fragments: the ports of a datagram's first fragment, keyed by
/// [`FragKey`], for the fragments after it, which carry no L4 header (LRU;
/// Cilium's IPV4_FRAG_DATAGRAMS_MAP).
pub const FRAGS_MAP: &str = "FERRY_FRAGS";
pub const DEFAULT_FRAGS_MAX: u32 = 8_192;
pub const COUNTERS_MAP: &str = "FERRY_COUNTERS";
pub const AFFINITY_MAP: &str = "FERRY_AFFINITY";
/// Socket-level load balancing: which frontend a UDP socket's backend stands
/// for, so replies are reported from the frontend (LRU).
pub const SOCK_REVNAT_MAP: &str = "FERRY_SOCK_REVNAT";
/// reverse-NAT id → [`ServiceName`], for inspection (`ferry svc list`); the
/// dataplane never reads it.
pub const SVC_NAMES_MAP: &str = "FERRY_SVC_NAMES";
/// Per-CPU traffic of each frontend: reverse-NAT id (`u16`) → [`SvcStats`].
pub const SVC_STATS_MAP: &str = "FERRY_SVC_STATS";
/// Node settings the programs read: an array of `u32` indexed by [`config`].
pub const CONFIG_MAP: &str = "FERRY_CONFIG";
/// loadBalancerSourceRanges: an LPM trie keyed by [`SrcRangeKey`] (behind the
/// trie's `u32` prefix length), value `u8` (1, unused). A LoadBalancer
/// frontend with [`svc_flags::SOURCE_RANGES`] takes new flows only from
/// clients that match an entry of its reverse-NAT id.
pub const SRC_RANGES_MAP: &str = "FERRY_SRC_RANGES";
/// Maglev lookup tables: an array of `u32` backend ids, `tables × M` entries
/// (M = [`config::MAGLEV_TABLE_SIZE`], a prime). Table `t` occupies
/// `t*M .. (t+1)*M`; a frontend with [`svc_flags::MAGLEV`] names its table in
/// slot 0's `backend_id`, and a new flow takes entry
/// `t*M + maglev_flow_hash(..) % M`. The agent writes a changed table into a
/// free table index and then switches slot 0 to it (one map update), so the
/// dataplane never sees half a table.
pub const MAGLEV_MAP: &str = "FERRY_MAGLEV";
/// Cilium's default Maglev table size (`--bpf-lb-maglev-table-size`), a prime.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;
/// Tables the Maglev map has room for (`--maglev-tables`).
pub const DEFAULT_MAGLEV_TABLES: u32 = 64;

/// The hash a Maglev frontend picks its table entry by, identical on every
/// node (this function is compiled into both the dataplane and the agent):
/// over the client address and port, the destination port and the protocol,
/// all as on the wire. The destination address is left out on purpose: a
/// client reaching a NodePort through node 1's address or node 2's (ECMP,
/// round-robin DNS over nodes, a drained node) hashes alike and, the tables
/// being computed from the backends alone, gets the same backend. Mixing is
/// murmur3's 32-bit finaliser, so that neighbouring source ports spread.
#[inline(always)]
pub const fn maglev_flow_hash(saddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x9e37_79b9u32 ^ proto as u32;
    h = fmix32(h ^ saddr);
    h = fmix32(h ^ (((sport as u32) << 16) | dport as u32));
    h
}

#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}
/// The node's own IPv4 addresses: a hash, address (wire order) → `u8` (1).
pub const NODE_ADDRS_MAP: &str = "FERRY_NODE_ADDRS";

/// Indices into [`CONFIG_MAP`].
pub mod config {
    /// The node's address (wire order) that north-south flows to backends on
    /// other nodes are SNATed to; 0: not known yet (the packet's destination,
    /// the node address a NodePort client dialled, is used then).
    pub const NODE_ADDR: u32 = 0;
    /// The node's own network namespace cookie (low and high 32 bits): the
    /// socket load balancer always serves sockets of that namespace (host
    /// network); those of other namespaces (Pods) only with
    /// [`SOCK_LB_PODS`].
    pub const HOST_NETNS_COOKIE_LO: u32 = 1;
    pub const HOST_NETNS_COOKIE_HI: u32 = 2;
    /// The last backend id and reverse-NAT id the agent handed out (its
    /// allocators' cursors; 0: none yet). Kept here so that a restarted agent
    /// goes on after them instead of handing out again an id freed just before
    /// the restart, which connection-tracking entries may still carry. Only
    /// the agent reads them.
    pub const LAST_BACKEND_ID: u32 = 3;
    pub const LAST_REVNAT_ID: u32 = 4;
    /// Connection-tracking lifetimes in seconds (0: the built-in default,
    /// [`super::ct_timeouts`]); an entry expires this long after the last
    /// packet that refreshed it.
    pub const CT_TIMEOUT_TCP_SYN: u32 = 8;
    pub const CT_TIMEOUT_TCP: u32 = 9;
    pub const CT_TIMEOUT_TCP_CLOSE: u32 = 10;
    pub const CT_TIMEOUT_UDP: u32 = 11;
    pub const CT_TIMEOUT_UDP_STREAM: u32 = 12;
    /// The source ports north-south flows to backends on other nodes are
    /// SNATed to, inclusive, host order (0: [`super::DEFAULT_SNAT_PORTS`]).
    pub const SNAT_PORT_MIN: u32 = 13;
    pub const SNAT_PORT_MAX: u32 = 14;
    /// Entries of one Maglev table (M, a prime; `--maglev-table-size`).
    /// 0: unknown, Maglev frontends then pick at random.
    pub const MAGLEV_TABLE_SIZE: u32 = 15;
    /// 1: the socket load balancer serves sockets of every network namespace
    /// in its cgroup (Pods too), except those in [`super::SOCK_LB_SKIP_MAP`];
    /// 0: only the node's own (`--socket-lb-pods=false`, Cilium's
    /// `bpf-lb-sock-hostns-only`).
    pub const SOCK_LB_PODS: u32 = 16;
    /// Set to 1 by the dataplane before it first tracks a TCP flow in the
    /// any-table (the TCP table was full), never cleared: until then a TCP
    /// packet's lookups skip the any-table (two hash lookups fewer for every
    /// TCP packet that is not translated, e.g. of connections socket LB
    /// pointed at a backend).
    pub const TCP_IN_ANY: u32 = 17;
    /// The frontend gate of from_pod (see [`super::FRONTEND_ADDRS_MAP`]):
    /// 1 once the agent has written the gate's addresses, 0 before (every
    /// destination may be a frontend then). With the gate on, a destination
    /// inside the service CIDR (`SERVICE_CIDR_ADDR`/`SERVICE_CIDR_MASK`, wire
    /// order; mask 0: none) or in the map may be a frontend; any other packet
    /// can only be a reply, and skips the forward conntrack and services
    /// lookups.
    pub const FRONTEND_GATE: u32 = 18;
    pub const SERVICE_CIDR_ADDR: u32 = 19;
    pub const SERVICE_CIDR_MASK: u32 = 20;
    /// How north-south flows reach a backend on another node
    /// (`--nodeport-mode`, [`super::nodeport_mode`]): 0 SNAT to this node,
    /// 1 DSR (the client's address kept, the frontend carried to the
    /// backend's node in an IPv4 option), 2 hybrid (DSR for TCP, SNAT for
    /// UDP). A node in DSR or hybrid mode also honours the option on the
    /// packets it receives.
    pub const NODEPORT_MODE: u32 = 21;
    /// Entries of the array: room above the last index so that new settings
    /// need no new map (a pinned array of another size is copied over).
    pub const COUNT: u32 = 32;
    /// Every index above, for the test that they are distinct and below COUNT.
    pub const ALL: [u32; 19] = [
        NODE_ADDR,
        HOST_NETNS_COOKIE_LO,
        HOST_NETNS_COOKIE_HI,
        LAST_BACKEND_ID,
        LAST_REVNAT_ID,
        CT_TIMEOUT_TCP_SYN,
        CT_TIMEOUT_TCP,
        CT_TIMEOUT_TCP_CLOSE,
        CT_TIMEOUT_UDP,
        CT_TIMEOUT_UDP_STREAM,
        SNAT_PORT_MIN,
        SNAT_PORT_MAX,
        MAGLEV_TABLE_SIZE,
        SOCK_LB_PODS,
        TCP_IN_ANY,
        FRONTEND_GATE,
        SERVICE_CIDR_ADDR,
        SERVICE_CIDR_MASK,
        NODEPORT_MODE,
    ];
}

/// Values of [`config::NODEPORT_MODE`].
pub mod nodeport_mode {
    pub const SNAT: u32 = 0;
    pub const DSR: u32 = 1;
    pub const HYBRID: u32 = 2;
}

/// The IPv4 option that carries a DSR flow's frontend from the node that
/// balanced it to the backend's node (Cilium's "opt" DSR mode, same
/// layout): type (copied on fragmentation, class 0, number 26), length 8,
/// the frontend port, the frontend address (both wire order). Inserted
/// right behind the 20-byte base header.
pub mod dsr_opt {
    /// Option type: copy flag (0x80) | 0x1a.
    pub const TYPE: u8 = 0x9a;
    /// Option length in bytes (also what it adds to the packet).
    pub const LEN: u8 = 8;
}

/// Built-in connection-tracking lifetimes in seconds, as kube-proxy
/// configures netfilter (`conntrack.tcpEstablishedTimeout` 24 h, UDP 30 s)
/// and Cilium its CT (SYN 60 s, closing 10 s, replied UDP 120 s).
pub mod ct_timeouts {
    /// A TCP flow whose backend has not answered yet (SYN sent).
    pub const TCP_SYN: u32 = 60;
    /// An established TCP flow (the backend answered).
    pub const TCP: u32 = 86_400;
    /// After a FIN or RST in either direction.
    pub const TCP_CLOSE: u32 = 10;
    /// A UDP flow the backend has not answered.
    pub const UDP: u32 = 30;
    /// A UDP flow the backend answered (a "stream").
    pub const UDP_STREAM: u32 = 120;
}

/// Default SNAT source ports: outside Linux's default ephemeral range
/// (`ip_local_port_range` 32768-60999), so the node's own connections never
/// collide with them, and below the default NodePort range (30000-32767).
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (10_000, 29_999);

/// Program names (function names in the eBPF object).
pub const PROG_FROM_POD: &str = "from_pod";
pub const PROG_FROM_NETDEV: &str = "from_netdev";
/// TC egress of the node devices and of the Pod veths: replies of
/// host-network backends, which leave through the node's own stack.
pub const PROG_TO_NETDEV: &str = "to_netdev";
pub const PROG_TO_POD: &str = "to_pod";
/// from_netdev and to_netdev for node devices without an Ethernet header
/// (WireGuard, TUN; IPIP and GRE packets, which keep their outer headers in
/// front, are passed over).
pub const PROG_FROM_NETDEV_L3: &str = "from_netdev_l3";
pub const PROG_TO_NETDEV_L3: &str = "to_netdev_l3";
/// XDP on the node devices (`--xdp`): NodePort/LoadBalancer flows to backends
/// on other nodes, and their replies, forwarded before the stack sees them.
pub const PROG_XDP_FROM_NETDEV: &str = "xdp_from_netdev";
/// cgroup/connect4, sendmsg4, recvmsg4, getpeername4 and their IPv6 twins
/// (IPv4-mapped addresses): socket-level load balancing for the node's own
/// processes and for Pods. Kernel program names hold 15 characters, hence
/// `sock_peer4` for getpeername4.
pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
pub const PROG_SOCK_PEER4: &str = "sock_peer4";
pub const PROG_SOCK_CONNECT6: &str = "sock_connect6";
pub const PROG_SOCK_SENDMSG6: &str = "sock_sendmsg6";
pub const PROG_SOCK_RECVMSG6: &str = "sock_recvmsg6";
pub const PROG_SOCK_PEER6: &str = "sock_peer6";
/// Every socket program, in the order the agent attaches them.
pub const PROG_SOCK_ALL: [&str; 8] = [
    PROG_SOCK_CONNECT4,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_PEER4,
    PROG_SOCK_CONNECT6,
    PROG_SOCK_SENDMSG6,
    PROG_SOCK_RECVMSG6,
    PROG_SOCK_PEER6,
];
/// A global of the socket programs (`u32`): 1 where the kernel has
/// `bpf_set_retval` (5.18+), set by the agent at load time.
pub const SOCK_SET_RETVAL: &str = "SOCK_SET_RETVAL";
/// Network namespaces (cookie, `u64`) whose sockets the socket load balancer
/// leaves alone (`--socket-lb-skip-netns`): their traffic goes the TC path.
/// The frontend gate: addresses (wire order → `u8` 1) that may be frontends
/// although outside the service CIDR (ExternalIPs, LoadBalancer IPs, NodePort
/// addresses, ClusterIPs out of range), and those that stopped being
/// frontends while flows to them may still be tracked. Read by from_pod (see
/// [`config::FRONTEND_GATE`]).
pub const FRONTEND_ADDRS_MAP: &str = "FERRY_FRONTEND_ADDRS";
pub const DEFAULT_FRONTEND_ADDRS_MAX: u32 = 65_536;
pub const SOCK_LB_SKIP_MAP: &str = "FERRY_SOCK_LB_SKIP";
pub const DEFAULT_SOCK_LB_SKIP_MAX: u32 = 1024;
pub const DEFAULT_SOCK_REVNAT_MAX: u32 = 65_536;

/// Default map sizes; the agent can override them at load time (`--*-map-size`).
pub const DEFAULT_SERVICES_MAX: u32 = 262_144;
pub const DEFAULT_BACKENDS_MAX: u32 = 262_144;
pub const DEFAULT_REVNAT_MAX: u32 = 65_536;
/// Connection-tracking tables when their size is not given and cannot be
/// derived from the node's memory (see the agent's `--ct-map-size`).
pub const DEFAULT_CT_TCP_MAX: u32 = 524_288;
pub const DEFAULT_CT_ANY_MAX: u32 = 262_144;
pub const DEFAULT_AFFINITY_MAX: u32 = 65_536;
/// Source-range entries over all LoadBalancer frontends together.
pub const DEFAULT_SRC_RANGES_MAX: u32 = 16_384;
/// Addresses of the node ([`NODE_ADDRS_MAP`]); more are left out (logged).
pub const NODE_ADDRS_MAX: u32 = 256;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Source address used when a pod reaches itself through a Service (hairpin).
/// The pod would drop a packet whose source is its own address, so the dataplane
/// rewrites the source to this link-local address (Cilium's `IPV4_LOOPBACK`
/// does the same) and restores it on the reply. 169.254.42.1, wire order.
pub const HAIRPIN_SNAT_ADDR: [u8; 4] = [169, 254, 42, 1];

/// Lookup scope of a service key. Every frontend has an external-scope entry;
/// a NodePort, ExternalIP or LoadBalancer frontend whose Service has
/// `externalTrafficPolicy: Local` also has an internal-scope twin with the
/// endpoints of every node, used by clients inside the cluster (Pods and the
/// node's own processes), as kube-proxy short-circuits them (Cilium's
/// two-scope lookup). The external entry carries [`svc_flags::INTERNAL_TWIN`].
pub const SCOPE_EXTERNAL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// `ServiceValue::flags` bits (slot 0).
pub mod svc_flags {
    pub const CLUSTER_IP: u32 = 1 << 0;
    pub const NODE_PORT: u32 = 1 << 1;
    pub const EXTERNAL_IP: u32 = 1 << 2;
    pub const LOAD_BALANCER: u32 = 1 << 3;
    /// sessionAffinity: ClientIP (timeout in `ServiceValue::affinity_timeout`).
    pub const AFFINITY: u32 = 1 << 4;
    /// externalTrafficPolicy: Local.
    pub const ETP_LOCAL: u32 = 1 << 5;
    /// internalTrafficPolicy: Local.
    pub const ITP_LOCAL: u32 = 1 << 6;
    /// loadBalancerSourceRanges present (LoadBalancer frontends only): new
    /// flows only from clients in [`crate::SRC_RANGES_MAP`] for this frontend's
    /// reverse-NAT id.
    pub const SOURCE_RANGES: u32 = 1 << 7;
    /// The backends in the slots are serving+terminating fallbacks (no ready one).
    pub const TERMINATING_FALLBACK: u32 = 1 << 8;
    /// An internal-scope twin of this frontend exists for in-cluster clients
    /// (see [`super::SCOPE_INTERNAL`]).
    pub const INTERNAL_TWIN: u32 = 1 << 9;
    /// This entry is the internal-scope twin (keyed with
    /// [`super::SCOPE_INTERNAL`]).
    pub const INTERNAL: u32 = 1 << 10;
    /// New flows pick their backend by Maglev consistent hashing: slot 0's
    /// `backend_id` is the index of the frontend's table in
    /// [`crate::MAGLEV_MAP`] (the slots still name the backends).
    pub const MAGLEV: u32 = 1 << 11;
}

/// `Backend::flags` bits.
pub mod backend_flags {
    /// The backend runs on this node.
    pub const LOCAL: u8 = 1 << 0;
    /// The endpoint is terminating (kept so existing flows continue).
    pub const TERMINATING: u8 = 1 << 1;
}

/// `CtValue::flags` bits.
pub mod ct_flags {
    /// Forward-direction entry of a service flow (client → frontend).
    pub const SERVICE: u16 = 1 << 0;
    /// The source was rewritten too (hairpin, or a NodePort/ExternalIP/
    /// LoadBalancer flow to a backend on another node); the reply restores the
    /// destination.
    pub const SNAT: u16 = 1 << 1;
    /// A FIN or RST was seen in this entry's direction: the flow is ending,
    /// and the entry lives only `CT_TIMEOUT_TCP_CLOSE` past its last packet.
    pub const CLOSING: u16 = 1 << 2;
    /// A north-south flow (NodePort, ExternalIP, LoadBalancer) from a client
    /// outside the cluster.
    pub const EXTERNAL: u16 = 1 << 3;
    /// The backend has answered (TCP: established; UDP: a stream). Set on
    /// both entries of the flow by the first reply.
    pub const REPLIED: u16 = 1 << 4;
    /// Direct server return (`--nodeport-mode dsr|hybrid`). On the node that
    /// balanced the flow, its forward entry: the client's address is kept
    /// and the frontend travels in an IPv4 option. On the backend's node, a
    /// reply entry recorded from that option, without a forward entry and
    /// reverse-NAT id: `nat_addr`/`nat_port` name the frontend the replies
    /// come from.
    pub const DSR: u16 = 1 << 5;
}

/// Direction of a connection-tracking key.
pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// Key of the services map. 12 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address (ClusterIP, ...), wire order.
    pub addr: u32,
    /// Frontend port, wire order.
    pub port: u16,
    /// 0: the service entry; 1..=count: backend slots.
    pub slot: u16,
    pub proto: u8,
    /// [`SCOPE_EXTERNAL`], or [`SCOPE_INTERNAL`] for the in-cluster twin of
    /// an externalTrafficPolicy: Local frontend.
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// Value of the services map. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceValue {
    /// Slot > 0: the backend id this slot names. Slot 0: with
    /// [`svc_flags::MAGLEV`], the frontend's Maglev table index; else 0.
    pub backend_id: u32,
    /// Slot 0: number of backend slots. Slot > 0: unused.
    pub count: u16,
    /// Slot 0 and slots: reverse-NAT id of the frontend.
    pub rev_nat_id: u16,
    /// Slot 0: [`svc_flags`].
    pub flags: u32,
    /// Slot 0: session affinity timeout in seconds (0 = no affinity).
    pub affinity_timeout: u32,
}

/// Value of the backends map (key: backend id, `u32`). 8 bytes.
///
/// Builds before this one had a fifth field, `node_addr` (never set), making
/// the value 12 bytes; the agent copies a pinned map of that layout into
/// this one, ids kept, since connection-tracking entries name backends by id
/// (see [`BACKEND_LEGACY_SIZE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Endpoint address, wire order.
    pub addr: u32,
    /// Endpoint port (resolved targetPort), wire order.
    pub port: u16,
    pub proto: u8,
    /// [`backend_flags`].
    pub flags: u8,
}

/// The size of a [`Backend`] in pinned maps of earlier builds: the same
/// fields, then a 4-byte `node_addr` that was always 0.
pub const BACKEND_LEGACY_SIZE: u32 = 12;

/// Value of the reverse-NAT map (key: reverse-NAT id, `u16`). 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevNat {
    /// The frontend address replies must come from, wire order.
    pub addr: u32,
    /// The frontend port, wire order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of the service-names map (key: reverse-NAT id, `u16`): who a frontend
/// is, for inspection and metrics (the dataplane never reads it). Explicit
/// fields, not text: the agent's `FrontendId::to_map`/`from_map` are its only
/// codec. Text fields are UTF-8, NUL-padded (none when full). 148 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// The Service's namespace (a DNS label: at most 63 bytes).
    pub namespace: [u8; 64],
    /// The Service's name (a DNS label: at most 63 bytes).
    pub name: [u8; 64],
    /// The Service port's name (an IANA service name: at most 15 bytes);
    /// empty for an unnamed port, which `port` names.
    pub port_name: [u8; 16],
    /// The Service port number of an unnamed port, host order (0: named).
    pub port: u16,
    /// [`frontend_kind`] (0: no frontend).
    pub kind: u8,
    pub _pad: u8,
}

impl Default for ServiceName {
    fn default() -> Self {
        Self {
            namespace: [0; 64],
            name: [0; 64],
            port_name: [0; 16],
            port: 0,
            kind: 0,
            _pad: 0,
        }
    }
}

/// `ServiceName::kind`: the kind of address a frontend is.
pub mod frontend_kind {
    pub const CLUSTER_IP: u8 = 1;
    pub const NODE_PORT: u8 = 2;
    pub const EXTERNAL_IP: u8 = 3;
    pub const LOAD_BALANCER: u8 = 4;
}

/// Key of the connection-tracking map. 16 bytes.
///
/// Forward entries are keyed by the packet as the client sent it (destination =
/// the frontend). Reply entries are keyed by the reply as the backend sends it
/// (source = the backend, destination = the client, or the hairpin address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// Value of the connection-tracking tables. 40 bytes.
///
/// The state of a flow is its protocol and flags: TCP without
/// [`ct_flags::REPLIED`] is SYN-sent, with it established, with
/// [`ct_flags::CLOSING`] closing; UDP is unreplied or replied (a stream).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the flow was created.
    pub created: u64,
    /// CLOCK_MONOTONIC nanoseconds after which the entry is expired: the last
    /// refreshing packet plus the lifetime of the flow's state. An expired
    /// entry is treated as absent by the dataplane and deleted by the
    /// agent's garbage collector.
    pub expires: u64,
    /// Backend the flow was assigned to.
    pub backend_id: u32,
    /// Reverse-NAT id of the frontend the client dialled.
    pub rev_nat_id: u16,
    /// [`ct_flags`].
    pub flags: u16,
    /// With `SNAT`: forward entry: the source address written; reply entry: the
    /// client address to restore as destination. Wire order.
    pub nat_addr: u32,
    /// Forward entry: the source port the backend sees (the SNAT port, or the
    /// client's own). Reply entry: the client's port. Wire order.
    pub nat_port: u16,
    pub _pad: u16,
    /// The backend's address and port (wire order), so that an established
    /// flow keeps reaching its backend after the backend left the Service
    /// (as netfilter's conntrack does for kube-proxy).
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad2: u16,
}

/// Key of the fragments map: a datagram as its fragments name it. 12 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    /// The IPv4 identification field, wire order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the fragments map: the datagram's ports, wire order. 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

/// Key of the session-affinity map. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// Client address, wire order.
    pub client: u32,
    /// Reverse-NAT id of the frontend (one affinity table per Service port, as
    /// kube-proxy's per-port `recent` lists).
    pub rev_nat_id: u16,
    pub _pad: u16,
}

/// Key of the socket reverse-NAT map: a socket and the backend it was sent
/// to. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevKey {
    /// bpf_get_socket_cookie().
    pub cookie: u64,
    /// Backend address and port, wire order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Value of the session-affinity map. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` of the last new connection of this client to the
    /// frontend; the entry expires `affinity_timeout` seconds after it.
    pub last_used: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Data of a key of the source-ranges LPM trie ([`SRC_RANGES_MAP`]), behind the
/// trie's `u32` prefix length (aya's `Key`). The trie matches bits from the
/// first byte on, so the prefix length of an entry is
/// [`SRC_RANGE_ID_BITS`] (the reverse-NAT id and padding, matched exactly)
/// plus the CIDR's length; a lookup uses [`SRC_RANGE_ID_BITS`] + 32. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey {
    /// Reverse-NAT id of the LoadBalancer frontend.
    pub rev_nat_id: u16,
    pub _pad: u16,
    /// Client address (prefix), wire order: the trie compares it bit by bit
    /// in network order.
    pub addr: u32,
}

/// Bits of [`SrcRangeKey`] before the address: reverse-NAT id and padding.
pub const SRC_RANGE_ID_BITS: u32 = 32;

/// Value of the per-CPU service stats map (key: the frontend's reverse-NAT id,
/// `u16`): packets and bytes (skb length at TC ingress) sent to the frontend and
/// translated to a backend. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub packets: u64,
    pub bytes: u64,
}

/// What a dataplane counter counts: packets dropped, by reason
/// (`ferry_drops_total{reason}`), or packets by what happened to them
/// (`ferry_packets_total{kind}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    Drop,
    Packet,
}

impl CounterKind {
    /// `drop` or `packet` (`ferry counters list`).
    pub const fn as_str(self) -> &'static str {
        match self {
            CounterKind::Drop => "drop",
            CounterKind::Packet => "packet",
        }
    }
}

/// Declares [`Counter`] with each counter's index, kind and name together:
/// adding a counter is one entry here (`Variant = index => Kind "name",`),
/// and the agent's `/metrics`, `ferry counters list` and `ferry status`
/// pick it up from [`Counter::ALL`].
macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident = $index:literal => $kind:ident $name:literal,)*) => {
        /// Indices into the per-CPU counters array. An index is part of the
        /// pinned map's layout: never renumber one.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $variant = $index,)*
        }

        impl Counter {
            /// Every counter, by index.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// Its name: the `reason` or `kind` label in `/metrics`, the name in
            /// `ferry counters list`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => $name,)*
                }
            }

            pub const fn kind(self) -> CounterKind {
                match self {
                    $(Counter::$variant => CounterKind::$kind,)*
                }
            }
        }
    };
}

counters! {
    /// Packets translated to a backend (forward direction).
    ServiceForward = 0 => Packet "service_forward",
    /// Replies reverse-translated.
    ReverseNat = 1 => Packet "reverse_nat",
    /// New flows that created a connection-tracking entry.
    CtCreated = 2 => Packet "ct_created",
    /// Service hit but it has no backends.
    DropNoBackend = 3 => Drop "no_backend",
    /// Slot or backend lookup failed (agent mid-update).
    DropBackendMissing = 4 => Drop "backend_missing",
    /// The packet could not be parsed or rewritten.
    DropMalformed = 5 => Drop "malformed",
    /// Connection-tracking insert failed.
    DropCtFull = 6 => Drop "ct_full",
    /// TCP to a Service without usable backends answered with a RST.
    RejectTcp = 7 => Packet "reject_tcp",
    /// UDP to a Service without usable backends answered with ICMP port unreachable.
    RejectUdp = 8 => Packet "reject_udp",
    /// New connections sent to the client's affinity backend (sessionAffinity).
    AffinityHit = 9 => Packet "affinity_hit",
    /// A NodePort/ExternalIP/LoadBalancer frontend without usable backends.
    DropNoBackendExternal = 10 => Drop "no_backend_external",
    /// No free SNAT port for a north-south flow to a remote backend.
    DropSnatPorts = 11 => Drop "snat_ports_exhausted",
    /// The FIB lookup for a translated packet found no route (or one it
    /// does not forward: blackhole, unreachable, forwarding disabled, ...);
    /// passed to the stack. Local destinations are [`Counter::FibLocal`].
    FibMiss = 12 => Packet "fib_miss",
    /// A new flow to a LoadBalancer IP from a client outside the Service's
    /// loadBalancerSourceRanges.
    DropSourceRange = 13 => Drop "source_range",
    /// North-south packets XDP translated and sent out itself (XDP_TX or
    /// XDP_REDIRECT), never reaching TC or the stack.
    XdpForward = 14 => Packet "xdp_forward",
    /// North-south packets XDP left to TC because their L4 checksum was only
    /// the pseudo-header's (checksum offload of a local sender on a virtual
    /// device: only the skb knows how to finish it).
    XdpPassPartialCsum = 15 => Packet "xdp_pass_partial_csum",
    /// New TCP flows tracked in the any-table because the TCP table was full
    /// (they can be evicted there; raise `--ct-map-size`).
    CtTcpFull = 16 => Packet "ct_tcp_full",
    /// Tracked flows found expired by the dataplane and treated as new.
    CtExpired = 17 => Packet "ct_expired",
    /// A new connection (TCP SYN) on a tuple still tracked for a finished or
    /// stale flow: balanced afresh instead of sent to the old backend.
    CtStaleRebalanced = 18 => Packet "ct_stale_rebalanced",
    /// A packet to a NodePort that answered a connection of the node's own
    /// (a local client whose port was the NodePort): left to the stack.
    NodePortLocalReply = 19 => Packet "nodeport_local_reply",
    /// A translated packet too big for its egress device (DF set): answered
    /// with an ICMP "fragmentation needed" quoting it untranslated.
    FragNeeded = 20 => Packet "frag_needed",
    /// ICMP errors about a translated flow (quoting it as the backend got
    /// it) translated back and sent to the client.
    IcmpErrorTranslated = 21 => Packet "icmp_error_translated",
    /// New flows whose backend a Maglev table chose.
    MaglevSelected = 22 => Packet "maglev_selected",
    /// Sockets pointed at a backend by the socket load balancer (connect,
    /// or an unconnected UDP send): no packet of theirs is translated.
    SockForward = 23 => Packet "sock_forward",
    /// connect() or an unconnected UDP send to a frontend without usable
    /// backends failed with ECONNREFUSED at the socket.
    SockReject = 24 => Packet "sock_reject",
    /// A translated packet whose new destination is an address of the node
    /// itself (a host-network backend, or a client process of the node): not
    /// forwarded, left to the stack to deliver. Not a [`Counter::FibMiss`].
    FibLocal = 25 => Packet "fib_local",
    /// A packet at an L3 device's hook whose data does not start at its
    /// IPv4 header (the kernel left outer headers in front, as IPIP and GRE
    /// devices do at ingress): passed on untouched.
    L3OuterHeader = 26 => Packet "l3_outer_header",
    /// Packets of DSR flows (`--nodeport-mode dsr|hybrid`) sent to a backend
    /// on another node with the client's address kept (TC and XDP), on the
    /// node that balanced them.
    DsrForward = 27 => Packet "dsr_forward",
    /// Packets arriving with the DSR option whose flow was recorded, on the
    /// backend's node.
    DsrAccept = 28 => Packet "dsr_accept",
    /// A backend's replies of a DSR flow, given the frontend as source on
    /// the backend's node and sent straight to the client.
    DsrReply = 29 => Packet "dsr_reply",
}

/// Size of the counters array: room above the last [`Counter`] so that new
/// counters do not need a new pinned map.
pub const COUNTER_COUNT: u32 = 32;
// `ALL` lists the counters by index, without gaps, and they fit the array.
const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i] as u32 == i as u32);
        i += 1;
    }
    assert!(Counter::ALL.len() as u32 <= COUNTER_COUNT);
};

const _: () = assert!(size_of::<ServiceKey>() == 12);
const _: () = assert!(size_of::<ServiceValue>() == 16);
const _: () = assert!(size_of::<Backend>() == 8);
const _: () = assert!(size_of::<RevNat>() == 8);
const _: () = assert!(size_of::<CtKey>() == 16);
const _: () = assert!(size_of::<CtValue>() == 40);
const _: () = assert!(size_of::<ServiceName>() == 148);
const _: () = assert!(size_of::<AffinityKey>() == 8);
const _: () = assert!(size_of::<AffinityValue>() == 16);
const _: () = assert!(size_of::<SvcStats>() == 16);
const _: () = assert!(size_of::<SockRevKey>() == 16);
const _: () = assert!(size_of::<SrcRangeKey>() == 8);
const _: () = assert!(size_of::<FragKey>() == 12);
const _: () = assert!(size_of::<FragPorts>() == 4);

/// An IPv4 address in map (wire) order.
#[inline]
pub const fn addr_to_map(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The octets of an address in map (wire) order.
#[inline]
pub const fn addr_from_map(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}

/// A host-order port in map (wire) order.
#[inline]
pub const fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// A map (wire) order port in host order.
#[inline]
pub const fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all these types are `#[repr(C)]`, `Copy`, contain only integers and
    // have no implicit padding (sizes asserted above equal the sum of fields).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SvcStats {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SrcRangeKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sum of field sizes equals `size_of`, i.e. no implicit padding holes.
    #[test]
    fn no_padding_holes() {
        assert_eq!(size_of::<ServiceKey>(), 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<ServiceValue>(), 4 + 2 + 2 + 4 + 4);
        assert_eq!(size_of::<Backend>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<RevNat>(), 4 + 2 + 2);
        assert_eq!(size_of::<CtKey>(), 4 + 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<CtValue>(), 8 + 8 + 4 + 2 + 2 + 4 + 2 + 2 + 4 + 2 + 2);
        assert_eq!(size_of::<AffinityKey>(), 4 + 2 + 2);
        assert_eq!(size_of::<AffinityValue>(), 8 + 4 + 4);
        assert_eq!(size_of::<SrcRangeKey>(), 2 + 2 + 4);
        assert_eq!(size_of::<ServiceName>(), 64 + 64 + 16 + 2 + 1 + 1);
        assert_eq!(SRC_RANGE_ID_BITS as usize, 8 * (2 + 2));
    }

    #[test]
    fn config_indices_are_distinct_and_fit_the_array() {
        for (i, a) in config::ALL.iter().enumerate() {
            assert!(*a < config::COUNT, "config index {a} >= config::COUNT");
            assert!(!config::ALL[i + 1..].contains(a), "config index {a} used twice");
        }
    }

    #[test]
    fn counter_names_are_distinct_labels() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            let name = c.name();
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{c:?}: {name:?} is not a label value in snake_case"
            );
            assert!(
                Counter::ALL[i + 1..].iter().all(|d| d.name() != name),
                "{c:?}: the name {name:?} is used twice"
            );
        }
        assert_eq!(Counter::DropSnatPorts.name(), "snat_ports_exhausted");
        assert_eq!(Counter::DropSnatPorts.kind(), CounterKind::Drop);
        assert_eq!(Counter::FibLocal.kind().as_str(), "packet");
    }

    #[test]
    fn wire_order_round_trips() {
        let a = addr_to_map([10, 96, 0, 10]);
        assert_eq!(a.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(addr_from_map(a), [10, 96, 0, 10]);
        let p = port_to_map(8080);
        assert_eq!(p.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(port_from_map(p), 8080);
    }
}
