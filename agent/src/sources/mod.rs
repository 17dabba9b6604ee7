//! Where the objects come from. Standalone mode: a directory of manifests plus the
//! shim's Pod status files. Cluster mode: the Kubernetes API (kube-rs watchers).
//! Both produce an [`Input`] for the same translation and syncer.
pub mod cluster;
pub mod manifests;
pub mod watch;

/// What a source produces: the objects and the problems found reading them.
pub type Input = manifests::Manifests;
