//! Running a loaded BPF program on a crafted frame (BPF_PROG_TEST_RUN), by
//! descriptor: the program a running agent loaded (found by id, see the
//! benchmark's synthetic figures) or one a test loaded itself. aya's
//! `TestRun` needs the program object that loaded it; a descriptor is what
//! other processes' programs and other threads (network namespaces) have.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use ferry_common::{PROTO_TCP, PROTO_UDP};

/// What one test run returned.
#[derive(Clone, Debug)]
pub struct Run {
    /// The program's verdict (TC_ACT_*, XDP_*).
    pub verdict: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// The kernel's measure: nanoseconds per run, averaged over `repeat`.
    pub ns_per_run: u32,
}

/// Runs the program `prog` on `frame` `repeat` times. The kernel repeats on
/// the same buffer: a program that rewrites the frame sees its own output
/// from the second run on, so only frames it leaves alone are worth
/// repeating; and every run sees the maps as the earlier ones left them.
pub fn run(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> io::Result<Run> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: repeat.max(1),
        ..Default::default()
    };
    // SAFETY: attr points at live buffers of the sizes given, for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            10, /* BPF_PROG_TEST_RUN */
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(Run {
        verdict: attr.retval,
        frame: out,
        ns_per_run: attr.duration,
    })
}

/// The BPF_PROG_TEST_RUN part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

// --- frames -------------------------------------------------------------
// Built from scratch here, independently of the dataplane's checksum code,
// for the packet tests and the benchmark's test runs.

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// The one's-complement sum `sum` folded to 16 bits.
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The sum of `data` as big-endian 16-bit words (an odd last byte padded).
pub fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Ethernet + IPv4 + TCP (SYN) or UDP with correct checksums.
pub fn frame(proto: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, udp_zero_csum: bool) -> Vec<u8> {
    frame_with(proto, src, dst, sport, dport, udp_zero_csum, b"hello")
}

/// [`frame`] with `payload`.
pub fn frame_with(
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    udp_zero_csum: bool,
    payload: &[u8],
) -> Vec<u8> {
    let l4_len = if proto == PROTO_TCP { 20 } else { 8 } + payload.len();
    let mut f = vec![0u8; 14 + 20 + l4_len];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let l4 = &mut f[34..];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == PROTO_TCP {
        l4[12] = 5 << 4;
        l4[13] = 0x02; // SYN
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        l4[20..].copy_from_slice(payload);
    } else {
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        l4[8..].copy_from_slice(payload);
    }
    if !(proto == PROTO_UDP && udp_zero_csum) {
        let c = l4_checksum(&f);
        let off = 34 + if proto == PROTO_TCP { 16 } else { 6 };
        f[off..off + 2].copy_from_slice(&c.to_be_bytes());
    }
    f
}

/// The L4 checksum of a frame computed from scratch (with the field zeroed).
pub fn l4_checksum(f: &[u8]) -> u16 {
    let proto = f[23];
    let mut seg = f[34..].to_vec();
    let off = if proto == PROTO_TCP { 16 } else { 6 };
    seg[off] = 0;
    seg[off + 1] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    let c = !fold(sum16(&pseudo) + sum16(&seg));
    if proto == PROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    }
}

/// The addresses, ports and L4 checksum of a frame made like [`frame`]'s.
pub struct Parsed {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub l4_csum: u16,
}

/// Reads a frame made like [`frame`]'s, past any IPv4 options.
pub fn parse(f: &[u8]) -> Parsed {
    let proto = f[23];
    // The IPv4 header's own length: a DSR packet carries an option.
    let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
    let off = l4 + if proto == PROTO_TCP { 16 } else { 6 };
    Parsed {
        src: f[26..30].try_into().unwrap(),
        dst: f[30..34].try_into().unwrap(),
        sport: u16::from_be_bytes([f[l4], f[l4 + 1]]),
        dport: u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]),
        l4_csum: u16::from_be_bytes([f[off], f[off + 1]]),
    }
}

/// `f` (TCP, made by [`frame`]) with other flags, checksum recomputed.
pub fn with_flags(mut f: Vec<u8>, flags: u8) -> Vec<u8> {
    f[47] = flags;
    let c = l4_checksum(&f);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_checksums_to_zero_and_reads_back() {
        let f = with_flags(
            frame(PROTO_TCP, [10, 244, 0, 200], [10, 96, 0, 10], 20000, 80, false),
            ACK,
        );
        assert_eq!(fold(sum16(&f[14..34])), 0xffff, "IPv4 header checksum");
        assert_eq!(l4_checksum(&f), parse(&f).l4_csum);
        let p = parse(&f);
        assert_eq!(
            (p.src, p.dst, p.sport, p.dport),
            ([10, 244, 0, 200], [10, 96, 0, 10], 20000, 80)
        );
        assert_eq!(f[47], ACK);
    }
}
