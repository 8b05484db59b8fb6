//! The one place that reaches below tiny_http: after `Request::upgrade`, find the
//! connection's file descriptor and duplicate it, so the session gets a writer that
//! never waits on the blocked reader. tiny_http's upgraded stream cannot be split or
//! given timeouts; a duplicated fd can.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;

/// Finds the socket connected to `peer` on local port `local_port` and returns an
/// independent `TcpStream` on a duplicate of its descriptor.
pub fn duplicate_connection(peer: SocketAddr, local_port: u16) -> std::io::Result<TcpStream> {
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        if sock_addr(fd, true) == Some(peer)
            && sock_addr(fd, false).is_some_and(|a| a.port() == local_port)
        {
            // SAFETY: `fd` is an open socket of this process; dup gives us our own
            // descriptor, which the returned TcpStream owns and closes.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(std::io::Error::last_os_error());
            }
            return Ok(unsafe { TcpStream::from_raw_fd(dup) });
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no socket connected to {peer}"),
    ))
}

fn sock_addr(fd: i32, peer: bool) -> Option<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is a valid buffer of the declared length.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let ptr = &mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr;
    // SAFETY: ptr/len describe `storage`; an invalid fd just returns -1.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, ptr, &mut len)
        } else {
            libc::getsockname(fd, ptr, &mut len)
        }
    };
    if rc != 0 {
        return None;
    }
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let a = unsafe { &*(ptr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let a = unsafe { &*(ptr as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::new(IpAddr::V6(ip), u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn duplicates_the_right_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (_server_side, peer) = listener.accept().expect("accept");
        let mut dup = duplicate_connection(peer, port).expect("found");
        dup.write_all(b"hi").expect("write");
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
    }
}
