/// The eBPF object built by build.rs.
pub static DATAPLANE_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-dataplane"));
