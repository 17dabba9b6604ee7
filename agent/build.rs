//! Builds the eBPF dataplane (`dataplane-ebpf`) for `bpfel-unknown-none` and puts
//! the object in OUT_DIR, where `src/loader.rs` embeds it.
//!
//! The eBPF crate needs `-Z build-std=core`, i.e. a toolchain with `rust-src`. On
//! our machines that is Debian's `rustc-web`, linked into rustup as `bpf-web` by
//! `cargo xtask setup` (see shared/notes/toolchain.md). Override with
//! FERRY_EBPF_TOOLCHAIN; set AYA_BUILD_SKIP=1 to skip (then the binary cannot load).
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=FERRY_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("FERRY_EBPF_TOOLCHAIN").unwrap_or_else(|_| "bpf-web".into());
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    // aya-build reruns on changes to the eBPF crate only; the map layout it
    // compiles in (ferry-common: map sizes, config indices) must rebuild it too.
    let common = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "ferry-common")
        .ok_or_else(|| anyhow!("ferry-common package not found"))?;
    if let Some(dir) = common.manifest_path.parent() {
        println!("cargo:rerun-if-changed={dir}");
    }
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "ferry-dataplane-ebpf")
        .ok_or_else(|| anyhow!("ferry-dataplane-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent of {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building the eBPF dataplane with toolchain `{toolchain}` failed; \
             run `cargo xtask setup` first"
        )
    })
}
