//! The Ferry agent: sources → translation → map layout → syncer → kernel.
pub mod admin;
pub mod bpfsys;
pub mod cleanup;
pub mod ct;
pub mod dataplane;
pub mod endpoints;
pub mod error;
pub mod health_check_nodeport;
pub mod ids;
pub mod incremental;
pub mod inspect;
pub mod kubeproxy;
pub mod kubeproxyconfig;
pub mod logging;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod mountns;
pub mod pinlock;
pub mod run;
pub mod sources;
pub mod status;
pub mod translate;

#[cfg(test)]
mod tests {
    /// The agent reads the shim's Pod status through `ferry_podstate`; only
    /// the binary (`ferry shim`, `ferry echo` in main.rs) links the shim. Cargo
    /// cannot keep a dependency out of the library, so this test does.
    #[test]
    fn the_library_does_not_use_the_shim() {
        fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("agent/src is readable").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    rust_files(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        assert!(files.len() > 10, "found the sources: {files:?}");
        let offenders: Vec<_> = files
            .iter()
            .filter(|p| **p != src.join("main.rs"))
            .filter(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .contains(concat!("ferry", "_shim"))
            })
            .collect();
        assert!(
            offenders.is_empty(),
            "the agent library uses the shim crate: {offenders:?}"
        );
    }
}
