//! Running a loaded BPF program on a crafted frame (BPF_PROG_TEST_RUN), by
//! descriptor: the program a running agent loaded (found by id, see the
//! benchmark's synthetic figures) or one a test loaded itself. aya's
//! `TestRun` needs the program object that loaded it; a descriptor is what
//! other processes' programs and other threads (network namespaces) have.
use std::{
    io,
    net::SocketAddrV4,
    os::fd::{AsRawFd as _, BorrowedFd},
};

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

/// TCP flags for [`tcp_frame`].
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// An Ethernet frame with an IPv4 TCP segment `src` → `dst` carrying `flags`
/// and no payload, checksums correct.
pub fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(54);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination MAC
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source MAC
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    let ip_csum = checksum(&f[ip_start..], 0);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_csum.to_be_bytes());
    let tcp_start = f.len();
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&1u32.to_be_bytes()); // sequence
    f.extend_from_slice(&(if flags & ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
    f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    // Pseudo-header: addresses, protocol, TCP length.
    let mut pseudo = 0u32;
    for w in f[ip_start + 12..ip_start + 20].chunks(2) {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += 6 + 20;
    let tcp_csum = checksum(&f[tcp_start..], pseudo);
    f[tcp_start + 16..tcp_start + 18].copy_from_slice(&tcp_csum.to_be_bytes());
    f
}

/// The destination (address, port) of an IPv4 TCP/UDP frame made like
/// [`tcp_frame`]'s (no IP options).
pub fn destination(frame: &[u8]) -> Option<SocketAddrV4> {
    let ip: [u8; 4] = frame.get(30..34)?.try_into().ok()?;
    let port = u16::from_be_bytes(frame.get(36..38)?.try_into().ok()?);
    Some(SocketAddrV4::new(ip.into(), port))
}

/// The Internet checksum of `bytes` with `sum` (a pseudo-header) added in.
fn checksum(bytes: &[u8], mut sum: u32) -> u16 {
    for w in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_checksums_to_zero_and_names_its_destination() {
        let src: SocketAddrV4 = "10.244.0.200:20000".parse().unwrap();
        let dst: SocketAddrV4 = "10.96.0.10:80".parse().unwrap();
        let f = tcp_frame(src, dst, SYN);
        assert_eq!(f.len(), 54);
        // A correct checksum over the header (its own field included) is 0.
        assert_eq!(checksum(&f[14..34], 0), 0);
        let pseudo = [10u32 << 8 | 244, 200, 10 << 8 | 96, 10].iter().sum::<u32>() + 6 + 20;
        assert_eq!(checksum(&f[34..], pseudo), 0);
        assert_eq!(destination(&f), Some(dst));
        assert_eq!(f[47], SYN);
    }
}
