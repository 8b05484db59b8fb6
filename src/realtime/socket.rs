//! The one place that reaches below tiny_http: after `Request::upgrade`, duplicate the
//! connection's file descriptor (which the patched tiny_http reports), so the session
//! gets a writer that never waits on the blocked reader. tiny_http's upgraded stream
//! cannot be split or given timeouts; a duplicated fd can.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;

/// Returns an independent `TcpStream` on a duplicate of `fd`, the descriptor of the
/// connection to `peer` (checked, so a descriptor that was closed and reused for
/// another socket is never taken). O(1): no search through the process's descriptors,
/// so a reconnect storm costs nothing per open connection.
pub fn duplicate_connection(fd: i32, peer: SocketAddr) -> std::io::Result<TcpStream> {
    if sock_addr(fd, true) != Some(peer) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("descriptor {fd} is not the connection to {peer}"),
        ));
    }
    // SAFETY: `fd` is an open socket of this process (its request's stream is alive);
    // dup gives us our own descriptor, which the returned TcpStream owns and closes.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    Ok(unsafe { TcpStream::from_raw_fd(dup) })
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
        let (server_side, peer) = listener.accept().expect("accept");
        use std::os::fd::AsRawFd;
        let mut dup = duplicate_connection(server_side.as_raw_fd(), peer).expect("found");
        dup.write_all(b"hi").expect("write");
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn refuses_a_descriptor_of_another_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let _a = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _b = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (first, _) = listener.accept().expect("accept");
        let (_second, second_peer) = listener.accept().expect("accept");
        use std::os::fd::AsRawFd;
        assert!(duplicate_connection(first.as_raw_fd(), second_peer).is_err());
    }
}
