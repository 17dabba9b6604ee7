//! Connection tracking: one entry per direction of a service flow, TCP in a
//! table of its own (see `ferry_common::CT_TCP_MAP`).
//!
//! FORWARD entries are keyed by the packet as the client sends it (to the
//! frontend) and name the backend; REPLY entries are keyed by the reply as the
//! backend sends it and carry what reverse NAT must restore.
//!
//! Lifetimes, in the style of netfilter and Cilium: every packet pushes its
//! entry's `expires` out by the lifetime of the flow's state (SYN-sent,
//! established, closing; UDP unreplied or replied; `lifetime_ns`). A flow is
//! alive while one of its entries is unexpired, unless a closing entry has
//! expired; a dead flow is treated as absent here, and deleted by the agent's
//! garbage collector (same rule, `agent/src/ct.rs`).
//!
//! Every entry program asks the same two things: what a packet is to
//! connection tracking ([`classify`]: a reply, a packet of an established
//! flow, or new; an ICMP error quoting a flow is [`related`] to it), and, for
//! a new flow a frontend takes, [`open_flow`] (backend chosen, source NAT
//! decided, both entries recorded).
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use ferry_common::{
    addr_to_map, backend_flags, config, ct_flags, ct_timeouts, nodeport_mode, svc_flags, Backend, Counter, CtKey,
    CtValue, RevNat, CT_DIR_FORWARD, CT_DIR_REPLY, DEFAULT_SNAT_PORTS, HAIRPIN_SNAT_ADDR, PROTO_TCP,
};

use crate::{
    lb,
    maps::{config, count, CONFIG, CT_ANY, CT_TCP, REVNAT},
    parse::Packet,
};

const NS_PER_SEC: u64 = 1_000_000_000;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = -17;

/// The key of `pkt`'s own tuple in direction `dir`.
#[inline(always)]
pub fn key(pkt: &Packet, dir: u8) -> CtKey {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir,
        _pad: [0; 2],
    }
}

/// The entry of `k`: TCP flows live in the TCP table, or in the any-table
/// when the TCP table had no room; everything else in the any-table.
#[inline(always)]
fn find(k: &CtKey) -> Option<&'static mut CtValue> {
    let p = match (k.proto == PROTO_TCP).then(|| CT_TCP.get_ptr_mut(k)).flatten() {
        Some(p) => p,
        // No TCP flow was ever tracked in the any-table (config TCP_IN_ANY).
        None if k.proto == PROTO_TCP && config(config::TCP_IN_ANY) == 0 => return None,
        None => CT_ANY.get_ptr_mut(k)?,
    };
    // SAFETY: a valid map value pointer; racing updates of its plain fields
    // store the same kind of values (timestamps, sticky flags).
    Some(unsafe { &mut *p })
}

#[inline(always)]
fn remove(k: &CtKey) {
    if k.proto == PROTO_TCP {
        let _ = CT_TCP.remove(k);
    }
    let _ = CT_ANY.remove(k);
}

/// How long an entry of a `proto` flow with `flags` lives past its last packet.
#[inline(always)]
fn lifetime_ns(proto: u8, flags: u16) -> u64 {
    let replied = flags & ct_flags::REPLIED != 0;
    let (index, default) = if proto != PROTO_TCP {
        if replied {
            (config::CT_TIMEOUT_UDP_STREAM, ct_timeouts::UDP_STREAM)
        } else {
            (config::CT_TIMEOUT_UDP, ct_timeouts::UDP)
        }
    } else if flags & ct_flags::CLOSING != 0 {
        (config::CT_TIMEOUT_TCP_CLOSE, ct_timeouts::TCP_CLOSE)
    } else if replied {
        (config::CT_TIMEOUT_TCP, ct_timeouts::TCP)
    } else {
        (config::CT_TIMEOUT_TCP_SYN, ct_timeouts::TCP_SYN)
    };
    let secs = match config(index) {
        0 => default,
        s => s,
    };
    u64::from(secs) * NS_PER_SEC
}

/// Pushes `e`'s expiry out for a packet seen `now`. Every CPU writing the
/// same cache line on every packet costs more than a second of slack, so an
/// expiry that moves by less than that is left alone (a shorter lifetime,
/// e.g. on closing, is always written).
#[inline(always)]
fn refresh(e: &mut CtValue, proto: u8, now: u64) {
    let expires = now + lifetime_ns(proto, e.flags);
    if expires < e.expires || expires > e.expires + NS_PER_SEC {
        e.expires = expires;
    }
}

#[inline(always)]
fn expired(e: &CtValue, now: u64) -> bool {
    now > e.expires
}

/// Where an entry's flow has its source rewritten to ([`ct_flags::SNAT`]:
/// hairpin, or north-south to a backend on another node): the client's
/// address and port in a reply entry, the SNAT address and port in a
/// forward one.
#[inline(always)]
pub fn snat(entry: &CtValue) -> Option<(u32, u16)> {
    (entry.flags & ct_flags::SNAT != 0).then_some((entry.nat_addr, entry.nat_port))
}

/// The reply key of the flow whose forward entry is `fwd`, for a client at
/// `client` (the forward key's source address).
#[inline(always)]
fn reply_key_of(client: u32, proto: u8, fwd: &CtValue) -> CtKey {
    CtKey {
        saddr: fwd.backend_addr,
        daddr: snat(fwd).map_or(client, |(a, _)| a),
        sport: fwd.backend_port,
        dport: fwd.nat_port,
        proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// The forward key of the flow whose reply entry is `rep`, to `frontend`.
#[inline(always)]
fn forward_key_of(proto: u8, rep: &CtValue, frontend: &RevNat) -> CtKey {
    CtKey {
        saddr: rep.nat_addr,
        daddr: frontend.addr,
        sport: rep.nat_port,
        dport: frontend.port,
        proto,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    }
}

/// The frontend of reverse-NAT id `id`, if the Service still exists.
#[inline(always)]
fn frontend(id: u16) -> Option<RevNat> {
    // SAFETY: copied out at once.
    unsafe { REVNAT.get(id).copied() }
}

/// Whether the flow of `e` is over, given its other entry `other` (if any):
/// a closing entry that expired ends it, otherwise both must have expired.
#[inline(always)]
fn dead(e: &CtValue, other: Option<&CtValue>, now: u64) -> bool {
    if !expired(e, now) {
        return false;
    }
    e.flags & ct_flags::CLOSING != 0 || other.is_none_or(|o| expired(o, now))
}

/// What connection tracking makes of a TCP or UDP packet. (An ICMP error
/// is neither: it is classified by the flow it quotes, [`related`].)
pub enum Class {
    /// A backend's packet to a client of a tracked flow: reverse NAT.
    Reply(Reply),
    /// A client's packet of a tracked flow: to the flow's backend.
    Established(Forward),
    /// Nothing usable is tracked for its tuple: a new flow, if a frontend
    /// takes it ([`open_flow`]).
    New,
}

/// Classifies `pkt`, refreshing the entries of the flow it belongs to (see
/// [`reply`] and [`forward`]). Entries of a dead or stale flow are removed,
/// and the packet is [`Class::New`].
#[inline(always)]
pub fn classify(pkt: &Packet) -> Class {
    if let Some(r) = reply(pkt) {
        return Class::Reply(r);
    }
    match forward(pkt) {
        Some(f) => Class::Established(f),
        None => Class::New,
    }
}

/// A tracked flow in the client → backend direction.
pub struct Forward {
    pub rev_nat_id: u16,
    /// The backend's address and port, wire order.
    pub backend: (u32, u16),
    pub snat: Option<(u32, u16)>,
    /// North-south (NodePort, ExternalIP, LoadBalancer).
    pub external: bool,
    /// Direct server return to a backend on another node: the client's
    /// address is kept, the frontend goes along in an IPv4 option (`dsr`).
    pub dsr: bool,
}

/// The tracked flow `pkt` (client → frontend) belongs to, refreshed. None
/// when `pkt` starts a new flow: nothing is tracked for its tuple, or what is
/// tracked is dead or stale (see `usable`); the stale entries are removed
/// then, so the caller can balance the packet afresh.
#[inline(always)]
fn forward(pkt: &Packet) -> Option<Forward> {
    let k = key(pkt, CT_DIR_FORWARD);
    let e = find(&k)?;
    let now = now();
    if !usable(pkt, e, now) {
        remove(&reply_key_of(pkt.saddr, pkt.proto, e));
        remove(&k);
        return None;
    }
    if pkt.closing() {
        e.flags |= ct_flags::CLOSING;
    }
    let dsr = e.flags & ct_flags::DSR != 0;
    // A DSR flow's replies never pass here: the client's first packet after
    // its SYN (the handshake's ACK) says the connection is established
    // (Cilium's `seen_non_syn`), so the entry lives as long as one.
    if dsr && pkt.proto == PROTO_TCP && !pkt.opening() && e.flags & ct_flags::REPLIED == 0 {
        e.flags |= ct_flags::REPLIED;
    }
    refresh(e, pkt.proto, now);
    Some(Forward {
        rev_nat_id: e.rev_nat_id,
        backend: (e.backend_addr, e.backend_port),
        snat: snat(e),
        external: e.flags & ct_flags::EXTERNAL != 0,
        dsr,
    })
}

/// Whether the forward entry `e` still decides where `pkt` goes:
/// - not when the flow is dead (expired);
/// - a TCP SYN opens a new connection: it keeps the entry's backend only
///   when it is a retransmission (the flow never got an answer) and the
///   backend still takes new flows; a SYN on an answered or closing flow is
///   a client reusing its port, balanced afresh;
/// - other TCP packets keep their backend even after it left the Service
///   (established connections run to their end, as with kube-proxy);
/// - a UDP flow is balanced afresh once its backend is gone.
#[inline(always)]
fn usable(pkt: &Packet, e: &CtValue, now: u64) -> bool {
    if expired(e, now) {
        // SAFETY: copied out at once.
        let reply = find(&reply_key_of(pkt.saddr, pkt.proto, e)).map(|r| *r);
        if dead(e, reply.as_ref(), now) {
            count(Counter::CtExpired);
            return false;
        }
    }
    if pkt.proto != PROTO_TCP {
        return lb::backend(e.backend_id).is_some();
    }
    if !pkt.opening() {
        return true;
    }
    let fresh = e.flags & (ct_flags::REPLIED | ct_flags::CLOSING) == 0
        && lb::backend(e.backend_id).is_some_and(|b| b.flags & backend_flags::TERMINATING == 0);
    if !fresh {
        count(Counter::CtStaleRebalanced);
    }
    fresh
}

/// A tracked flow in the backend → client direction.
pub struct Reply {
    /// The frontend the client dialled; None when the Service was deleted
    /// under a live flow.
    pub frontend: Option<RevNat>,
    /// The client to restore as destination (SNATed flows).
    pub snat: Option<(u32, u16)>,
    pub flags: u16,
}

impl Reply {
    /// A hairpin flow's reply (a Pod reaching itself through a Service): SNAT
    /// without a north-south client; it goes back into the Pod's own veth.
    #[inline(always)]
    pub fn hairpin(&self) -> bool {
        self.snat.is_some() && self.flags & ct_flags::EXTERNAL == 0
    }
}

/// The tracked flow `pkt` is a reply of, refreshed. The reply half of
/// [`classify`], for the hooks that see only replies (the node's own
/// packets at egress). The first reply marks
/// both entries [`ct_flags::REPLIED`] (TCP established, UDP a stream).
#[inline(always)]
pub fn reply(pkt: &Packet) -> Option<Reply> {
    let e = find(&key(pkt, CT_DIR_REPLY))?;
    let now = now();
    let r = reply_of(e);
    if pkt.closing() {
        e.flags |= ct_flags::CLOSING;
    }
    if e.flags & ct_flags::REPLIED == 0 {
        e.flags |= ct_flags::REPLIED;
        // A DSR reply entry (on the backend's node) has no forward entry.
        let fwd_key = r.frontend.filter(|_| !dsr_recorded(e));
        if let Some(fwd) = fwd_key.and_then(|f| find(&forward_key_of(pkt.proto, e, &f))) {
            fwd.flags |= ct_flags::REPLIED;
            refresh(fwd, pkt.proto, now);
        }
    }
    refresh(e, pkt.proto, now);
    Some(Reply { flags: e.flags, ..r })
}

/// What reverse NAT restores for the reply entry `e`: the frontend of its
/// reverse-NAT id, or, for a DSR flow recorded on the backend's node, the
/// frontend the other node's option named (kept in the entry itself: it may
/// be an address of the other node, which no map here knows).
#[inline(always)]
fn reply_of(e: &CtValue) -> Reply {
    if dsr_recorded(e) {
        return Reply {
            frontend: Some(RevNat {
                addr: e.nat_addr,
                port: e.nat_port,
                _pad: 0,
            }),
            snat: None,
            flags: e.flags,
        };
    }
    Reply {
        frontend: frontend(e.rev_nat_id),
        snat: snat(e),
        flags: e.flags,
    }
}

/// A reply entry recorded on a DSR backend's node (`record_dsr`): no
/// reverse-NAT id (ids start at 1), the frontend in the entry.
#[inline(always)]
fn dsr_recorded(e: &CtValue) -> bool {
    e.flags & ct_flags::DSR != 0 && e.rev_nat_id == 0
}

/// The flow an ICMP error is related to: the one whose reply entry is `k`
/// (the quoted packet's tuple, reversed). Read only: an error is no sign of
/// life.
#[inline(always)]
pub fn related(k: &CtKey) -> Option<Reply> {
    find(k).map(|e| reply_of(e))
}

/// Records, on the backend's node, a DSR flow whose packet `pkt` (client →
/// backend, as the balancing node sent it) carried the frontend `frontend`
/// (address, port; wire order) in its option: a reply entry only, which
/// turns the backend's replies into the frontend's (`reply_of`). An entry
/// already naming that frontend is only refreshed (every UDP datagram
/// carries the option).
#[inline(always)]
pub fn record_dsr(pkt: &Packet, frontend: (u32, u16)) -> Result<(), Counter> {
    let k = CtKey {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    };
    let now = now();
    if let Some(e) = find(&k) {
        // A retransmitted SYN, or the next datagram of the same flow.
        if dsr_recorded(e) && (e.nat_addr, e.nat_port) == frontend && !expired(e, now) {
            refresh(e, pkt.proto, now);
            return Ok(());
        }
    }
    let flags = ct_flags::DSR | ct_flags::EXTERNAL;
    let v = CtValue {
        created: now,
        expires: now + lifetime_ns(pkt.proto, flags),
        backend_id: 0,
        rev_nat_id: 0,
        flags,
        nat_addr: frontend.0,
        nat_port: frontend.1,
        _pad: 0,
        backend_addr: pkt.daddr,
        backend_port: pkt.dport,
        _pad2: 0,
    };
    if pkt.proto == PROTO_TCP {
        if CT_TCP.insert(&k, &v, BPF_ANY).is_ok() {
            return Ok(());
        }
        count(Counter::CtTcpFull);
        // Before the insert: TCP lookups look in the any-table from now on.
        if let Some(c) = CONFIG.get_ptr_mut(config::TCP_IN_ANY) {
            // SAFETY: an array slot; every writer stores 1.
            unsafe { *c = 1 };
        }
    }
    CT_ANY.insert(&k, &v, BPF_ANY).map_err(|_| Counter::DropCtFull)
}

/// Where a new flow comes from, which decides its source NAT.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A Pod of this node (from_pod). Its address stays the source, unless
    /// the backend is the Pod itself (hairpin: the Pod would drop a packet
    /// from its own address): then the source is [`HAIRPIN_SNAT_ADDR`], the
    /// Pod's port kept.
    Pod,
    /// A client outside the cluster (north-south: from_netdev, XDP). Its
    /// address stays the source for a backend on this node; for one on
    /// another node the source becomes this node's address and a port of the
    /// SNAT range, claimed atomically with the flow's reply tuple, so that
    /// the reply comes back here.
    External,
}

/// What opening a flow to a frontend came to.
pub enum Opened {
    /// The flow, tracked (unless the tables were full: counted, and it is
    /// sent all the same).
    Flow(Forward),
    /// The frontend has no usable endpoint; `etp_local`: its Service's
    /// externalTrafficPolicy is Local (none is on this node).
    NoEndpoint { etp_local: bool },
}

/// Opens a new flow from `pkt`'s client to the frontend `service`, the same
/// way for every hook (TC and XDP alike, so that whichever sees the flow's
/// next packet sends it the same way): a client outside the frontend's
/// loadBalancerSourceRanges is refused (before anything else, even a reject,
/// so it learns nothing about the Service), then the backend is chosen
/// (`lb::select_backend`), the source NAT decided by `origin`, and both
/// entries recorded.
#[inline(always)]
pub fn open_flow(pkt: &Packet, service: &lb::Service, origin: Origin) -> Result<Opened, Counter> {
    let svc = &service.value;
    if !lb::source_allowed(pkt, service) {
        return Err(Counter::DropSourceRange);
    }
    if svc.count == 0 {
        return Ok(Opened::NoEndpoint {
            etp_local: svc.flags & svc_flags::ETP_LOCAL != 0,
        });
    }
    let (backend_id, backend) = lb::select_backend(pkt, service, lb::Chooser::Flow)?;
    let mut flow = NewFlow {
        backend_id,
        backend,
        rev_nat_id: svc.rev_nat_id,
        snat_addr: 0,
        snat_port: pkt.sport,
        external: origin == Origin::External,
        dsr: false,
    };
    match origin {
        Origin::Pod if backend.addr == pkt.saddr => flow.snat_addr = addr_to_map(HAIRPIN_SNAT_ADDR),
        Origin::External if backend.flags & backend_flags::LOCAL == 0 && dsr_for(pkt.proto) => flow.dsr = true,
        Origin::External if backend.flags & backend_flags::LOCAL == 0 => {
            flow.snat_addr = match config(config::NODE_ADDR) {
                0 => pkt.daddr,
                a => a,
            };
            claim_snat_port(pkt, &mut flow)?;
            return Ok(Opened::Flow(flow.forward()));
        }
        _ => {}
    }
    // The reply tuple is unique to the client's own tuple (or, hairpin, the
    // client's port): overwritten, never contended.
    track(create(pkt, &flow, false));
    Ok(Opened::Flow(flow.forward()))
}

/// Whether a north-south flow of `proto` to a backend on another node goes
/// by direct server return (`--nodeport-mode`): always in DSR mode, TCP
/// only in hybrid mode (Cilium's: UDP is SNATed, so every datagram does not
/// need the option's 8 bytes).
#[inline(always)]
fn dsr_for(proto: u8) -> bool {
    match config(config::NODEPORT_MODE) {
        nodeport_mode::DSR => true,
        nodeport_mode::HYBRID => proto == PROTO_TCP,
        _ => false,
    }
}

/// Random SNAT ports tried for a new flow before giving up (Cilium's
/// SNAT_COLLISION_RETRIES is of the same order).
const SNAT_TRIES: u32 = 32;

/// Records `flow` with an SNAT port of its own: random ports of the SNAT
/// range (`--snat-port-range`), each claimed atomically with the flow's
/// reply tuple, so no two flows ever share one; a port comes free when its
/// flow's entries expire or close. Sets `flow.snat_port` (wire order).
#[inline(always)]
fn claim_snat_port(pkt: &Packet, flow: &mut NewFlow) -> Result<(), Counter> {
    let (min, max) = match (config(config::SNAT_PORT_MIN), config(config::SNAT_PORT_MAX)) {
        (lo, hi) if lo != 0 && lo <= hi && hi <= 0xffff => (lo, hi),
        _ => (u32::from(DEFAULT_SNAT_PORTS.0), u32::from(DEFAULT_SNAT_PORTS.1)),
    };
    let span = max - min + 1;
    // Look for a free port with lookups only (a small loop body keeps the
    // verifier quick), then claim it; losing the claim to a flow created on
    // another CPU meanwhile costs this packet (the client retransmits).
    let mut found = false;
    for _ in 0..SNAT_TRIES {
        // SAFETY: helper without preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        // (No `%`: its divide-by-zero panic path is not a program the
        // verifier accepts.)
        flow.snat_port = ((min + r.checked_rem(span).unwrap_or(0)) as u16).to_be();
        if reply_tuple_free(pkt, flow) {
            found = true;
            break;
        }
    }
    if !found {
        return Err(Counter::DropSnatPorts);
    }
    match create(pkt, flow, true) {
        Err(CreateError::Taken) => Err(Counter::DropSnatPorts),
        created => {
            track(created);
            Ok(())
        }
    }
}

/// Counts the outcome of recording a new flow. A flow that could not be
/// recorded still goes (the node keeps working; its replies may not).
#[inline(always)]
fn track(r: Result<(), CreateError>) {
    count(if r.is_ok() {
        Counter::CtCreated
    } else {
        Counter::DropCtFull
    });
}

/// What a new flow was assigned to.
struct NewFlow {
    backend_id: u32,
    backend: Backend,
    rev_nat_id: u16,
    /// The source is rewritten to (`snat_addr`, `snat_port`) (0: not
    /// rewritten): hairpin, or a north-south flow to a backend on another node.
    snat_addr: u32,
    snat_port: u16,
    /// A north-south flow (NodePort, ExternalIP, LoadBalancer).
    external: bool,
    /// Direct server return (see [`Forward::dsr`]).
    dsr: bool,
}

impl NewFlow {
    /// The flow as [`classify`] will find it from its next packet on.
    #[inline(always)]
    fn forward(&self) -> Forward {
        Forward {
            rev_nat_id: self.rev_nat_id,
            backend: (self.backend.addr, self.backend.port),
            snat: (self.snat_addr != 0).then_some((self.snat_addr, self.snat_port)),
            external: self.external,
            dsr: self.dsr,
        }
    }
}

/// Why a new flow was not recorded.
enum CreateError {
    /// The reply tuple belongs to another live flow (an SNAT port taken).
    Taken,
    /// No room.
    Full,
}

/// Records both directions of a new flow. With `claim`, the reply tuple is
/// taken only if no live flow has it (an atomic insert: SNAT ports are never
/// shared); without, it is overwritten (it is unique to the client's tuple).
#[inline(always)]
fn create(pkt: &Packet, flow: &NewFlow, claim: bool) -> Result<(), CreateError> {
    let snat = flow.snat_addr != 0;
    let flags = if snat { ct_flags::SNAT } else { 0 }
        | if flow.external { ct_flags::EXTERNAL } else { 0 }
        | if flow.dsr { ct_flags::DSR } else { 0 };
    let nat_port = if snat { flow.snat_port } else { pkt.sport };
    let now = now();
    let expires = now + lifetime_ns(pkt.proto, flags);
    let reply_key = reply_key_for(pkt, flow);
    let entry = |flags, nat_addr, nat_port| CtValue {
        created: now,
        expires,
        backend_id: flow.backend_id,
        rev_nat_id: flow.rev_nat_id,
        flags,
        nat_addr,
        nat_port,
        _pad: 0,
        backend_addr: flow.backend.addr,
        backend_port: flow.backend.port,
        _pad2: 0,
    };
    let reply = entry(flags, pkt.saddr, pkt.sport);
    let forward = entry(ct_flags::SERVICE | flags, flow.snat_addr, nat_port);
    if claim {
        reclaim_if_dead(&reply_key, now);
        if find(&reply_key).is_some() {
            return Err(CreateError::Taken);
        }
    }
    // Reply first: once the forward entry exists, replies must be translatable.
    let how = if claim { BPF_NOEXIST } else { BPF_ANY };
    let tcp = pkt.proto == PROTO_TCP;
    let in_tcp = tcp
        && match CT_TCP.insert(&reply_key, &reply, how) {
            Ok(()) => true,
            Err(EEXIST) => return Err(CreateError::Taken),
            Err(_) => {
                count(Counter::CtTcpFull);
                // Before the insert: lookups of TCP flows look in the any-table
                // from now on.
                if let Some(v) = CONFIG.get_ptr_mut(config::TCP_IN_ANY) {
                    // SAFETY: an array slot; every writer stores 1.
                    unsafe { *v = 1 };
                }
                false
            }
        };
    if in_tcp {
        return CT_TCP
            .insert(&key(pkt, CT_DIR_FORWARD), &forward, BPF_ANY)
            .map_err(|_| {
                let _ = CT_TCP.remove(&reply_key);
                CreateError::Full
            });
    }
    match CT_ANY.insert(&reply_key, &reply, how) {
        Ok(()) => {}
        Err(EEXIST) => return Err(CreateError::Taken),
        Err(_) => return Err(CreateError::Full),
    }
    CT_ANY
        .insert(&key(pkt, CT_DIR_FORWARD), &forward, BPF_ANY)
        .map_err(|_| CreateError::Full)
}

/// The reply key a new flow would have: the backend answering the client,
/// or the SNAT address and port.
#[inline(always)]
fn reply_key_for(pkt: &Packet, flow: &NewFlow) -> CtKey {
    let snat = flow.snat_addr != 0;
    CtKey {
        saddr: flow.backend.addr,
        daddr: if snat { flow.snat_addr } else { pkt.saddr },
        sport: flow.backend.port,
        dport: if snat { flow.snat_port } else { pkt.sport },
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0; 2],
    }
}

/// Whether `flow`'s reply tuple (its SNAT port) looks free: nothing holds
/// it, or only an expired entry (which `create` reclaims if its flow is
/// dead). A cheap test for choosing a port; `create` claims it atomically.
#[inline(always)]
fn reply_tuple_free(pkt: &Packet, flow: &NewFlow) -> bool {
    find(&reply_key_for(pkt, flow)).is_none_or(|e| expired(e, now()))
}

/// Frees the reply tuple `k` if the flow holding it is dead (an expired
/// entry is as good as absent), so that its SNAT port can be claimed.
#[inline(always)]
fn reclaim_if_dead(k: &CtKey, now: u64) {
    let Some(e) = find(k) else {
        return;
    };
    if !expired(e, now) {
        return;
    }
    let fwd_key = frontend(e.rev_nat_id).map(|f| forward_key_of(k.proto, e, &f));
    // The forward entry of this very flow (its tuple may have moved on to
    // another flow since), copied out.
    let fwd = fwd_key.and_then(|fk| {
        let f = *find(&fk)?;
        (reply_key_of(fk.saddr, k.proto, &f) == *k).then_some((fk, f))
    });
    if dead(e, fwd.as_ref().map(|(_, f)| f), now) {
        if let Some((fk, _)) = fwd {
            remove(&fk);
        }
        remove(k);
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}
