//! Passing file descriptors over a Unix socket (SCM_RIGHTS).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Most descriptors one message may carry; more are closed and the read fails.
pub const MAX_FDS: usize = 4;

const CMSG_SPACE: usize = 64;
// Room for MAX_FDS descriptors in one control message, checked at compile time.
const _: () = assert!(CMSG_SPACE >= 16 + MAX_FDS * std::mem::size_of::<RawFd>());

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

/// Sends `data` with `fds` attached to its first byte (blocking socket).
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other("too many descriptors"));
    }
    let mut sent = 0usize;
    while sent < data.len() {
        let mut iov = libc::iovec {
            iov_base: data[sent..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - sent,
        };
        let mut cbuf = CmsgBuf([0; CMSG_SPACE]);
        // SAFETY: an all-zero msghdr is valid (no name, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            let payload = std::mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
            let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
            msg.msg_control = cbuf.0.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: msg_control points at `space` (<= CMSG_SPACE) aligned bytes, so the
            // first header and its data fit; we write the header and copy `fds` into it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    payload,
                );
            }
        }
        // SAFETY: msg points at live iovec/control buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// One `recvmsg`: bytes into `buf`, received descriptors appended to `fds` (owned,
/// close-on-exec). Returns the byte count (0 at end of stream). A message carrying more
/// than [`MAX_FDS`] descriptors, or truncated control data, is an error (the extra
/// descriptors the kernel did pass are closed).
pub fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; CMSG_SPACE]);
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE;
    // SAFETY: msg points at live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut got = Vec::new();
    // SAFETY: walking the control headers the kernel wrote, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = (*c).cmsg_len as usize - (data as usize - c as usize);
                for k in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(k));
                    got.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() + got.len() > MAX_FDS {
        return Err(std::io::Error::other(
            "peer sent more file descriptors than allowed",
        ));
    }
    fds.extend(got);
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn pass_a_file() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"hello").unwrap();
        send_with_fds(a.as_raw_fd(), b"x\n", &[f.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"x\n");
        assert_eq!(fds.len(), 1);
        let mut g = std::fs::File::from(fds.pop().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        // Too many descriptors: refused, nothing leaks into `fds`.
        let many: Vec<RawFd> = (0..MAX_FDS).map(|_| f.as_raw_fd()).collect();
        send_with_fds(a.as_raw_fd(), b"y", &many).unwrap();
        let mut fds = vec![std::fs::File::open("/dev/null").unwrap().into()];
        assert!(recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).is_err());
        assert_eq!(fds.len(), 1);
    }
}
