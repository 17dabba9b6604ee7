//! The Ferry agent: sources → translation → map layout → syncer → kernel.
pub mod bpfsys;
pub mod dataplane;
pub mod endpoints;
pub mod error;
pub mod health;
pub mod healthcheck;
pub mod inspect;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod mountns;
pub mod pinlock;
pub mod status;
pub mod run;
pub mod sources;
pub mod translate;
