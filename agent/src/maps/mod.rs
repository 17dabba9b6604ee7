//! From desired frontends to the exact contents of the BPF maps (`layout`), and
//! from there to the kernel by writing only the difference (`sync`), through
//! one generic typed table per map (`table`; the maps are declared in `defs`,
//! opened in `kernel`). The byte layout itself is `ferry_common`'s.
pub mod defs;
pub mod gate;
pub mod kernel;
pub mod layout;
pub mod sync;
pub mod table;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use ferry_common::{Backend, RevNat, ServiceKey, ServiceName, ServiceValue};
use ipnet::Ipv4Net;

use self::table::{Opened, Synced};

/// The contents of the maps the agent owns (connection tracking belongs to
/// the dataplane).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub revnat: BTreeMap<u16, RevNat>,
    pub names: BTreeMap<u16, ServiceName>,
    /// The source-ranges trie's entries.
    pub source_ranges: BTreeSet<SourceRange>,
    /// The id allocators' cursors (in the config array).
    pub cursors: IdCursors,
    /// Maglev tables in use: table index → the backend id of each of its M
    /// entries (read back from the kernel only for the indices frontends
    /// name).
    pub maglev: BTreeMap<u32, Arc<Vec<u32>>>,
}

/// The last backend id and reverse-NAT id handed out (0: none): a restarted
/// agent goes on after them, so an id freed just before the restart is not
/// handed out again while connection-tracking entries may carry it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdCursors {
    pub backend: u32,
    pub revnat: u32,
}

/// A loadBalancerSourceRanges entry: (reverse-NAT id of the LoadBalancer
/// frontend, a client prefix with its host bits cleared).
pub type SourceRange = (u16, Ipv4Net);

/// A backend in a frontend's slots: (reverse-NAT id, backend id, protocol).
pub type Assignment = (u16, u32, u8);

/// The assignments of `c`: which backends each frontend hands new flows to.
pub fn assignments(c: &MapContents) -> BTreeSet<Assignment> {
    c.services
        .iter()
        .filter(|(k, v)| k.slot > 0 && v.backend_id != 0)
        .map(|(k, v)| (v.rev_nat_id, v.backend_id, k.proto))
        .collect()
}

/// The Maglev tables the frontends of `services` name (slot 0 with
/// `svc_flags::MAGLEV`: its `backend_id` is the table index).
pub fn maglev_tables_in_use(services: &BTreeMap<ServiceKey, ServiceValue>) -> BTreeSet<u32> {
    services
        .iter()
        .filter(|(k, v)| k.slot == 0 && v.flags & ferry_common::svc_flags::MAGLEV != 0)
        .map(|(_, v)| v.backend_id)
        .collect()
}

/// What [`MapStore::forget_flows`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// Connection-tracking entries (both directions count).
    pub ct: usize,
    /// Session-affinity entries.
    pub affinity: usize,
}

/// Access to the maps: aya's pinned maps in production, a BTreeMap in tests.
/// Writes name the map by its declaration (`defs`).
pub trait MapStore {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Whether a write failed because the map is full.
    fn is_full(e: &Self::Error) -> bool;
    fn read_all(&self) -> Result<MapContents, Self::Error>;
    /// Writes one entry of a map the agent keeps in step (a Maglev table is
    /// written whole: never one a frontend uses, a changed table gets a
    /// fresh index).
    fn put<D: Synced>(&mut self, k: &D::Key, v: &D::Value) -> Result<(), Self::Error>;
    /// Deletes one entry of a map the agent keeps in step (fine if absent).
    fn del<D: Synced>(&mut self, k: &D::Key) -> Result<(), Self::Error>;
    /// Deletes an entry of a map the dataplane writes, such as the traffic
    /// counted for a reverse-NAT id that is freed (fine if absent).
    fn clear<D: Opened>(&mut self, k: &D::Key) -> Result<(), Self::Error>;
    fn put_cursors(&mut self, c: IdCursors) -> Result<(), Self::Error>;
    /// Forgets the state that ties clients to assignments that ended: UDP
    /// connection-tracking entries (both directions; a UDP "flow" never ends by
    /// itself, so the client's next datagram must be balanced again, as
    /// kube-proxy's conntrack flush does) and session-affinity entries. TCP
    /// entries stay: established connections continue while the backend exists.
    fn forget_flows(&mut self, gone: &BTreeSet<Assignment>) -> Result<Forgotten, Self::Error>;
}
