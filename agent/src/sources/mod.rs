//! Where the objects come from. Standalone mode: a directory of manifests plus the
//! shim's Pod status files. Cluster mode: the Kubernetes API (kube-rs watchers).
//! Both produce an [`Input`] for the same translation and syncer.
pub mod cluster;
pub mod manifests;
pub mod watch;

/// What a source produces: the objects and the problems found reading them.
pub type Input = manifests::Manifests;

/// A change notice: when the agent received the event (a file-system
/// notification, a watch event, a completed list). The sync it triggers is
/// timed from the earliest pending one (`ferry_network_programming_duration_seconds`).
pub type Changed = std::time::Instant;

/// Where sources send their change notices.
pub type Changes = tokio::sync::mpsc::UnboundedSender<Changed>;
