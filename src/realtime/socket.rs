//! The one place that reaches below tiny_http. After `Request::upgrade`, the session
//! takes the connection's socket (whose descriptor the patched tiny_http reports) away
//! from tiny_http: checked to be the peer's, made non-blocking with Nagle off, then
//! duplicated into a descriptor of our own while a dummy takes the original number.
//! tiny_http's stream can then be dropped at once: its connection thread, which waits
//! for that stream's end, is free, and its shutdown on drop reaches only the dummy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd};

/// Checks that `fd` is the connection to `peer` (so a descriptor that was closed and
/// reused for another socket is never taken), and makes it non-blocking with Nagle
/// off. O(1): no search through the process's descriptors.
pub fn prepare(fd: i32, peer: SocketAddr) -> std::io::Result<()> {
    if sock_addr(fd, true) != Some(peer) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("descriptor {fd} is not the connection to {peer}"),
        ));
    }
    // SAFETY: fcntl/setsockopt on an open socket of this process, with valid arguments.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(())
}

/// Returns our own descriptor for the socket behind `fd` and atomically puts an
/// unconnected dummy socket under the number `fd` (dup3), so whatever its owner does
/// with `fd` afterwards (shutdown, close) no longer touches the connection. Call only
/// after [`prepare`] checked `fd`, while its owner keeps it open.
pub fn take_over(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain descriptor syscalls on descriptors of this process; every result
    // is checked and every descriptor we create is closed or returned owned.
    unsafe {
        let mine = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
        if mine < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let dummy = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if dummy < 0 || libc::dup3(dummy, fd, libc::O_CLOEXEC) < 0 {
            let e = std::io::Error::last_os_error();
            if dummy >= 0 {
                libc::close(dummy);
            }
            libc::close(mine);
            return Err(e);
        }
        libc::close(dummy);
        Ok(OwnedFd::from_raw_fd(mine))
    }
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
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;

    #[test]
    fn takes_the_right_connection_non_blocking() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (server_side, peer) = listener.accept().expect("accept");
        prepare(server_side.as_raw_fd(), peer).expect("prepared");
        assert!(server_side.nodelay().expect("nodelay"));
        let mine = TcpStream::from(take_over(server_side.as_raw_fd()).expect("taken"));
        // The old owner shuts and closes its descriptor: the connection lives on.
        let _ = server_side.shutdown(std::net::Shutdown::Both);
        drop(server_side);
        let mut buf = [0u8; 2];
        let e = (&mine).read(&mut buf).expect_err("nothing to read yet");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        (&mine).write_all(b"hi").expect("write");
        client.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hi");
        client.write_all(b"yo").expect("write back");
        mine.set_nonblocking(false).expect("blocking");
        (&mine).read_exact(&mut buf).expect("read back");
        assert_eq!(&buf, b"yo");
    }

    #[test]
    fn refuses_a_descriptor_of_another_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let _a = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _b = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (first, _) = listener.accept().expect("accept");
        let (_second, second_peer) = listener.accept().expect("accept");
        assert!(prepare(first.as_raw_fd(), second_peer).is_err());
    }
}
