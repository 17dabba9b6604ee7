//! The bpf(2) commands aya 0.14 does not expose for objects we did not
//! create: open a pinned object or a link by id as a raw fd (`BPF_OBJ_GET`,
//! `BPF_LINK_GET_FD_BY_ID`), detach a link even while other processes hold it
//! (`BPF_LINK_DETACH`), and walk a map's keys whatever their type
//! (`BPF_MAP_GET_NEXT_KEY`, to count entries).
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

/// A `union bpf_attr` large enough for the commands above (the kernel
/// accepts a shorter attr than its own, zero-extended).
#[repr(C, align(8))]
struct Attr([u8; 32]);

impl Attr {
    fn new() -> Self {
        Self([0; 32])
    }
    fn put_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn put_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised buffer of the size passed, and
    // every pointer stored in it (see the callers) outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A command that returns a new fd.
fn new_fd(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens the object pinned at `path` (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    new_fd(BPF_OBJ_GET, &mut attr)
}

/// Opens the link with id `id`.
pub fn link_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    // struct { __u32 link_id; __u32 next_id; __u32 open_flags; }
    let mut attr = Attr::new();
    attr.put_u32(0, id);
    new_fd(BPF_LINK_GET_FD_BY_ID, &mut attr)
}

/// Detaches the link `link` from its hook (the link object lives on, empty,
/// while fds or pins hold it).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    // struct { __u32 link_fd; } link_detach
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// Counts the keys of a map (any type with keys of `key_size` bytes). Entries
/// may come and go meanwhile: the count is a snapshot, capped at `max` (a
/// walk restarted by a concurrent delete cannot run away).
pub fn count_keys(map: BorrowedFd<'_>, key_size: u32, max: u32) -> io::Result<u32> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0u32;
    let mut first = true;
    while count < max {
        // struct { __u32 map_fd; __u32 pad; __aligned_u64 key; __aligned_u64 next_key; }
        let mut attr = Attr::new();
        attr.put_u32(0, map.as_raw_fd() as u32)
            .put_u64(8, if first { 0 } else { key.as_ptr() as u64 })
            .put_u64(16, next.as_mut_ptr() as u64);
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(count)
}
