//! Conversions between `std::net::SocketAddr` and `sockaddr_storage`.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// A socket address in the kernel's layout.
pub struct RawAddr {
    /// The storage, large enough for any family.
    pub storage: libc::sockaddr_storage,
    /// The number of meaningful bytes.
    pub len: libc::socklen_t,
}

impl RawAddr {
    /// An empty address for the kernel to fill in (accept, recvfrom).
    pub fn empty() -> RawAddr {
        // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
        RawAddr {
            storage: unsafe { mem::zeroed() },
            len: mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    /// A pointer for calls that read the address.
    pub fn as_ptr(&self) -> *const libc::sockaddr {
        (&self.storage as *const libc::sockaddr_storage).cast()
    }

    /// A pointer for calls that write the address.
    pub fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        (&mut self.storage as *mut libc::sockaddr_storage).cast()
    }

    /// The address as a `SocketAddr`, or `EAFNOSUPPORT` for other families.
    pub fn to_socket_addr(&self) -> io::Result<SocketAddr> {
        match self.storage.ss_family as i32 {
            libc::AF_INET if self.len as usize >= mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says this is a sockaddr_in and it is long enough.
                let sin: &libc::sockaddr_in = unsafe { &*(self.as_ptr().cast()) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Ok(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if self.len as usize >= mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: the family says this is a sockaddr_in6 and it is long enough.
                let sin6: &libc::sockaddr_in6 = unsafe { &*(self.as_ptr().cast()) };
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Ok(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
        }
    }
}

impl From<&SocketAddr> for RawAddr {
    fn from(addr: &SocketAddr) -> RawAddr {
        let mut raw = RawAddr::empty();
        match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
                unsafe { std::ptr::write(raw.as_mut_ptr().cast(), sin) };
                raw.len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
                unsafe { std::ptr::write(raw.as_mut_ptr().cast(), sin6) };
                raw.len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for s in ["127.0.0.1:80", "[::1]:443", "[fe80::1%2]:9", "0.0.0.0:0"] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(RawAddr::from(&a).to_socket_addr().unwrap(), a);
        }
    }

    #[test]
    fn unknown_family_is_an_error() {
        let raw = RawAddr::empty();
        assert_eq!(
            raw.to_socket_addr().unwrap_err().raw_os_error(),
            Some(libc::EAFNOSUPPORT)
        );
    }
}
