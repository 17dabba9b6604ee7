//! Internet checksum arithmetic (RFC 1071, RFC 1624) for the checksums the
//! dataplane computes itself: the rejections built from scratch (`reject`)
//! and the incremental updates at XDP, where no skb helper exists (`nat`,
//! `xdp`). At TC the kernel's checksum helpers do the incremental work.

/// A ones' complement sum of 16-bit words (in a `u32` with room for carries)
/// folded to 16 bits: the carries added back in.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The Internet checksum of a ones' complement sum: its folded complement,
/// the value a checksum field holds.
#[inline(always)]
pub fn checksum(sum: u32) -> u16 {
    !fold(sum)
}

/// Adds `bytes` as big-endian 16-bit words to `acc` (even lengths only).
#[inline(always)]
pub fn sum_words(bytes: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += ((bytes[i] as u32) << 8) | bytes[i + 1] as u32;
        i += 2;
    }
    acc
}

/// A checksum after a 32-bit field changed from `old` to `new` (RFC 1624:
/// HC' = ~(~HC + ~m + m')). Works on values as they lie in the packet, in
/// whatever byte order they are loaded, as long as all are loaded alike.
#[inline(always)]
pub fn replace4(csum: u16, old: u32, new: u32) -> u16 {
    let sum = (!csum) as u32 + (!(old as u16)) as u32 + (!((old >> 16) as u16)) as u32 + (new & 0xffff) + (new >> 16);
    checksum(sum)
}

/// A checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn replace2(csum: u16, old: u16, new: u16) -> u16 {
    checksum((!csum) as u32 + (!old) as u32 + new as u32)
}
