//! Where the objects come from. Standalone mode: a directory of manifests plus the
//! shim's Pod status files.
pub mod manifests;
pub mod watch;
