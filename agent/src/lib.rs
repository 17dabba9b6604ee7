//! The Ferry agent: sources → translation → map layout → syncer → kernel.
pub mod dataplane;
pub mod endpoints;
pub mod error;
pub mod health;
pub mod healthcheck;
pub mod inspect;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod mountns;
pub mod run;
pub mod sources;
pub mod translate;
