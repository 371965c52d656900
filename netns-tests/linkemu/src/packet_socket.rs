//! AF_PACKET raw sockets bound to one interface: whole Ethernet frames in and out.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Socket buffer size asked for, so that a burst at 100+ Mbit/s waits in the kernel rather than
/// being dropped while a thread is busy.
const SOCKET_BUFFER_BYTES: libc::c_int = 8 << 20;

/// Outcome of one non-blocking receive.
pub enum Received {
    /// A frame of this length is in the buffer.
    Frame(usize),
    /// A frame was larger than the buffer (e.g. GSO/GRO left on) and was cut.
    Truncated,
    /// A frame this host sent itself; not to be forwarded.
    Outgoing,
    /// Nothing waiting.
    Empty,
}

/// An AF_PACKET socket bound to one interface.
pub struct PacketSocket {
    fd: OwnedFd,
}

fn check(ret: libc::c_int, what: &str, ifname: &str) -> io::Result<libc::c_int> {
    if ret < 0 {
        let err = io::Error::last_os_error();
        Err(io::Error::new(
            err.kind(),
            format!("{what} on {ifname}: {err}"),
        ))
    } else {
        Ok(ret)
    }
}

fn set_int(fd: RawFd, level: i32, name: i32, value: libc::c_int) -> libc::c_int {
    // SAFETY: fd is a valid socket and the option value is a c_int of the declared size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    }
}

impl PacketSocket {
    /// Opens a socket on `ifname`: `receive` true to get every frame arriving on it, false for
    /// a send-only socket that never queues received frames.
    pub fn open(ifname: &str, receive: bool) -> io::Result<Self> {
        let cname = CString::new(ifname)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has NUL"))?;
        // SAFETY: cname is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface named '{ifname}' in this network namespace"),
            ));
        }
        // Protocol 0 at creation: the socket receives nothing until bind() names the
        // interface, so no frame from another interface slips in between.
        // SAFETY: plain socket(2) call.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        check(raw, "socket(AF_PACKET)", ifname)?;
        // SAFETY: raw is a freshly created, owned descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let raw = fd.as_raw_fd();
        if receive {
            // Frames we send on this interface ourselves must not come back as input.
            check(
                set_int(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1),
                "PACKET_IGNORE_OUTGOING",
                ifname,
            )?;
            if set_int(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                SOCKET_BUFFER_BYTES,
            ) < 0
            {
                check(
                    set_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER_BYTES),
                    "SO_RCVBUF",
                    ifname,
                )?;
            }
        } else if set_int(
            raw,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            SOCKET_BUFFER_BYTES,
        ) < 0
        {
            check(
                set_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER_BYTES),
                "SO_SNDBUF",
                ifname,
            )?;
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = if receive {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        addr.sll_ifindex = i32::try_from(ifindex)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
        // SAFETY: addr is a valid sockaddr_ll and the length matches it.
        let ret = unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(ret, "bind(AF_PACKET)", ifname)?;
        Ok(Self { fd })
    }

    /// Receives one frame without blocking.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut addr_len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and addr are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut addr as *mut libc::sockaddr_ll).cast(),
                &mut addr_len,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(Received::Empty),
                io::ErrorKind::Interrupted => Ok(Received::Empty),
                _ => Err(err),
            };
        }
        if addr.sll_pkttype == libc::PACKET_OUTGOING {
            return Ok(Received::Outgoing);
        }
        let n = n as usize;
        Ok(if n > buf.len() {
            Received::Truncated
        } else {
            Received::Frame(n)
        })
    }

    /// Sends one whole frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Frames the kernel dropped for this socket since the last call (receive buffer full).
    pub fn take_kernel_drops(&self) -> u64 {
        // SAFETY: tpacket_stats is plain data; all-zero is a valid value.
        let mut stats: libc::tpacket_stats = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: stats and len are valid out pointers of the declared size.
        let ret = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut stats as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if ret < 0 {
            0
        } else {
            u64::from(stats.tp_drops)
        }
    }

    /// The descriptor, for poll.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
