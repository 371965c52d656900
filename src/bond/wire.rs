//! Wire format of everything the bond sends inside one link's WireGuard session.
//!
//! boringtun only hands back plaintext that starts with a valid IPv4/IPv6 header whose length
//! fits, so every message is shaped around that (full description in `docs/wire-format.md`):
//!
//! * **Data**: the inner IP packet, unchanged, followed by a trailer with the bonding
//!   metadata: [`COMPACT_TRAILER_LEN`] bytes once the peer said it reads them (a
//!   [`Control::Features`] message), else the original [`TRAILER_LEN`] bytes. The receiver finds
//!   the trailer from the IP header's length and tells the two apart by what is left.
//! * **Control** (hello, probe, probe reply, feedback): a 20-byte IPv4 header of protocol
//!   [`CONTROL_PROTO`] (253, "experimental", RFC 3692) from 0.0.0.0 to 0.0.0.0 whose total
//!   length covers the whole message, followed by the control body. No trailer.
//!
//! All integers are big-endian. Decoding checks every length before reading, never panics and
//! returns a specific [`DecodeError`].

use std::fmt;

/// Wire format version carried in every trailer and control body.
pub const VERSION: u8 = 1;
/// IP protocol number of control messages (RFC 3692 experimental).
pub const CONTROL_PROTO: u8 = 253;
/// Bytes of the original (format 1) trailer, sent to peers that have not said they read the
/// compact one.
pub const TRAILER_LEN: usize = 20;
/// Bytes of the compact trailer: 8 fewer per packet, about half a percent of a full-size
/// packet's wire bytes, which is goodput on a saturated link.
pub const COMPACT_TRAILER_LEN: usize = 12;
/// Flag bits a compact trailer may set; the others are kept for a later format and must be 0.
const COMPACT_FLAGS: u8 = FLAG_DUPLICATE | FLAG_UNORDERED | FLAG_RESENT;
/// [`Control::Features`] bit: this side decodes compact trailers.
pub const FEATURE_COMPACT_TRAILER: u8 = 0x01;
/// Length of the IPv4 header that wraps control messages.
const CTRL_IP_LEN: usize = 20;
/// Control body header: version, type.
const CTRL_HDR_LEN: usize = 2;
/// Longest link name carried in a hello.
pub const MAX_LINK_NAME: usize = 32;
/// Most per-link entries one feedback message may carry.
pub const MAX_FEEDBACK_ENTRIES: usize = 16;
/// Bytes of one feedback entry.
const FEEDBACK_ENTRY_LEN: usize = 1 + 4 + 4 + 8 + 4 + 4 + 4;

/// Trailer flag: this packet is one of several copies sent on different links.
pub const FLAG_DUPLICATE: u8 = 0x01;
/// Trailer flag: deliver at once, without waiting for earlier packets. `seq` then counts in a
/// separate sequence space (latency-critical packets that overtake bulk traffic).
pub const FLAG_UNORDERED: u8 = 0x02;
/// Trailer flag: sent again because the link that carried it died. Such a packet is expected
/// to come after its gap was given up; its lateness says nothing about the reorder timeout.
pub const FLAG_RESENT: u8 = 0x04;

/// Bonding metadata appended to a data packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Bond-wide sequence number, the order in which the sender scheduled the packet.
    pub seq: u64,
    /// Per-link sequence number, for loss estimation on that link.
    pub link_seq: u32,
    /// Sender's clock in microseconds (wrapping), for one-way-delay samples.
    pub send_time_us: u32,
    /// Link the packet was sent on, as the sender numbers it.
    pub link_id: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Sent (or to be sent) as a compact trailer, whose `seq` holds only the low 32 bits and
    /// `link_seq` the low 16: the receiver extends them from the highest it has seen.
    pub compact: bool,
}

/// A control message (everything but data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Names the sender's link that this WireGuard session belongs to.
    Hello(Hello),
    /// Acknowledges a hello: the receiver has bound the session to the link.
    HelloAck {
        /// Link acknowledged.
        link_id: u8,
        /// Echo of the hello's bond id.
        bond_id: u64,
        /// The acknowledging side's own bond id: a new one means it restarted and numbers its
        /// packets from scratch.
        acker_bond_id: u64,
    },
    /// RTT probe.
    Probe(Probe),
    /// Reply to a probe.
    ProbeReply(ProbeReply),
    /// What the receiver got on each link since the start.
    Feedback(Feedback),
    /// Data packets the receiver saw missing on one link: please send them again.
    Nack(Nack),
    /// The sender has begun putting ordered data on this link (its number) after a quiet
    /// spell. Sent on the other links, which arrive first when this one is slower: the
    /// receiver counts the link's delay in its reorder timeout before the first packets
    /// arrive, instead of skipping their gap as a loss.
    OrderedOn {
        /// The link, as the data's sender numbers it.
        link_id: u8,
    },
    /// The last data packet the sender put on this link before it went quiet. A loss shows
    /// as a gap when the next packet on the link arrives; the last one before a pause has no
    /// next packet for a while (a round trip, in TCP's slow start), and its repair would come
    /// after the reorder timeout. Sent a little after the link's queue ran dry.
    Tail {
        /// The link, as the data's sender numbers it.
        link_id: u8,
        /// Link sequence number of the last data packet sent on it.
        link_seq: u32,
    },
    /// What this side can decode beyond format 1 ([`FEATURE_COMPACT_TRAILER`] bits). Sent
    /// behind every hello and hello ack, so each side learns it when the link is bound, and
    /// again after the peer restarts. An older peer drops it as an unknown type and keeps
    /// getting format 1 trailers. Bytes after the first are ignored (room for later versions).
    Features {
        /// `FEATURE_*` bits; unknown bits are ignored.
        bits: u8,
    },
}

/// A run of packets missing on one link, by link sequence number: the packets after it on the
/// same link arrived first, and a link delivers in order, so these were lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nack {
    /// The link, as the data's sender numbers it.
    pub link_id: u8,
    /// First missing link sequence number.
    pub first_link_seq: u32,
    /// How many in a row (1..=[`MAX_NACK_RUN`]).
    pub count: u16,
}

/// Longest run of missing packets one NACK asks for; a longer gap is an outage, which the
/// link's failure detection handles.
pub const MAX_NACK_RUN: u16 = 64;

/// Link identity, sent by the side that owns the link (the site) until acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's number for this link.
    pub link_id: u8,
    /// Random per daemon start, so the receiver notices a restart.
    pub bond_id: u64,
    /// Human-readable link name (at most [`MAX_LINK_NAME`] bytes of UTF-8).
    pub name: String,
}

/// RTT probe, echoed by the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Link the probe is sent on.
    pub link_id: u8,
    /// Probe number on that link.
    pub probe_seq: u32,
    /// Sender's clock in microseconds (wrapping).
    pub send_time_us: u32,
}

/// Reply to a [`Probe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeReply {
    /// Link the probe came on (the probe sender's number).
    pub link_id: u8,
    /// Echo of the probe number.
    pub probe_seq: u32,
    /// Echo of the probe's send time.
    pub echo_time_us: u32,
    /// Microseconds the replier held the probe before answering.
    pub hold_us: u32,
}

/// Receiver feedback: cumulative counters per link of the sender's.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Feedback {
    /// Receiver's clock in microseconds (wrapping) when the feedback was made.
    pub recv_time_us: u32,
    /// One entry per link the receiver has heard data on.
    pub entries: Vec<FeedbackEntry>,
}

/// What the receiver has seen on one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FeedbackEntry {
    /// The data sender's link number.
    pub link_id: u8,
    /// Highest link sequence number received (wrapping).
    pub highest_link_seq: u32,
    /// Data packets received on the link, cumulative (wrapping).
    pub packets: u32,
    /// Data bytes received on the link (inner packet + trailer), cumulative (wrapping).
    pub bytes: u64,
    /// Smoothed one-way delay in microseconds: receiver clock minus sender clock. Only
    /// differences between links mean anything, as the clocks are not synchronised.
    pub owd_us: i32,
    /// One-way-delay variation (mean deviation) in microseconds.
    pub jitter_us: u32,
    /// Lowest one-way delay seen recently, microseconds, same clock offset as `owd_us`.
    pub min_owd_us: i32,
}

/// A decoded plaintext.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// An inner IP packet (without trailer) and its metadata.
    Data {
        /// The inner IP packet.
        packet: &'a [u8],
        /// Its bonding metadata.
        trailer: Trailer,
    },
    /// A control message.
    Control(Control),
}

/// Why a plaintext was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the smallest IP header.
    Truncated,
    /// The first nibble is neither 4 nor 6.
    NotIp,
    /// The IP header's length field is smaller than its header or larger than the plaintext.
    BadIpLength,
    /// Bytes after the IP packet are neither nothing (control) nor exactly one trailer.
    BadTrailerLength,
    /// Trailer or control body of an unknown version.
    BadVersion,
    /// A plaintext without trailer that is not a control message.
    NotControl,
    /// Unknown control message type.
    UnknownType,
    /// A control body shorter or longer than its type requires.
    BadControlLength,
    /// A hello whose name is not UTF-8 or too long.
    BadName,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Truncated => "truncated packet",
            Self::NotIp => "not an IPv4/IPv6 packet",
            Self::BadIpLength => "IP length field out of range",
            Self::BadTrailerLength => "bad trailer length",
            Self::BadVersion => "unknown wire format version",
            Self::NotControl => "packet without trailer is not a control message",
            Self::UnknownType => "unknown control message type",
            Self::BadControlLength => "bad control message length",
            Self::BadName => "bad link name in hello",
        };
        f.write_str(s)
    }
}

impl std::error::Error for DecodeError {}

/// Control message type codes.
mod ctype {
    pub(super) const HELLO: u8 = 1;
    pub(super) const HELLO_ACK: u8 = 2;
    pub(super) const PROBE: u8 = 3;
    pub(super) const PROBE_REPLY: u8 = 4;
    pub(super) const FEEDBACK: u8 = 5;
    pub(super) const NACK: u8 = 6;
    pub(super) const ORDERED_ON: u8 = 7;
    pub(super) const TAIL: u8 = 8;
    pub(super) const FEATURES: u8 = 9;
}

/// Length of the IP packet at the start of `buf`, from its header, checked against `buf`.
pub fn ip_packet_len(buf: &[u8]) -> Result<usize, DecodeError> {
    let first = *buf.first().ok_or(DecodeError::Truncated)?;
    let (len, hdr) = match first >> 4 {
        4 => {
            if buf.len() < 20 {
                return Err(DecodeError::Truncated);
            }
            let ihl = usize::from(first & 0x0f) * 4;
            (
                usize::from(u16::from_be_bytes([buf[2], buf[3]])),
                ihl.max(20),
            )
        }
        6 => {
            if buf.len() < 40 {
                return Err(DecodeError::Truncated);
            }
            (usize::from(u16::from_be_bytes([buf[4], buf[5]])) + 40, 40)
        }
        _ => return Err(DecodeError::NotIp),
    };
    if len < hdr || len > buf.len() {
        return Err(DecodeError::BadIpLength);
    }
    Ok(len)
}

/// Decodes one decrypted plaintext (the whole of it, not boringtun's cut slice).
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let ip_len = ip_packet_len(buf)?;
    let rest = &buf[ip_len..];
    if rest.is_empty() {
        return decode_control(buf).map(Message::Control);
    }
    let mut r = Reader::new(rest);
    // The two formats differ in how wide the sequence numbers are and in how they mark
    // their version (see docs/wire-format.md).
    let (seq, link_seq, compact) = match rest.len() {
        TRAILER_LEN => (r.u64()?, r.u32()?, false),
        COMPACT_TRAILER_LEN => (u64::from(r.u32()?), u32::from(r.u16()?), true),
        _ => return Err(DecodeError::BadTrailerLength),
    };
    let send_time_us = r.u32()?;
    let link_id = r.u8()?;
    let flags = r.u8()?;
    if compact {
        // No version byte: a later format sets a flag bit this one keeps 0.
        if flags & !COMPACT_FLAGS != 0 {
            return Err(DecodeError::BadVersion);
        }
    } else {
        let _reserved = r.u8()?;
        if r.u8()? != VERSION {
            return Err(DecodeError::BadVersion);
        }
    }
    let trailer = Trailer {
        seq,
        link_seq,
        send_time_us,
        link_id,
        flags,
        compact,
    };
    Ok(Message::Data {
        packet: &buf[..ip_len],
        trailer,
    })
}

fn decode_control(buf: &[u8]) -> Result<Control, DecodeError> {
    // ip_packet_len has checked that the IPv4/IPv6 header fits and the length matches.
    if buf[0] != 0x45 || buf[9] != CONTROL_PROTO {
        return Err(DecodeError::NotControl);
    }
    let mut r = Reader::new(&buf[CTRL_IP_LEN..]);
    let version = r.u8().map_err(|_| DecodeError::BadControlLength)?;
    if version != VERSION {
        return Err(DecodeError::BadVersion);
    }
    let kind = r.u8().map_err(|_| DecodeError::BadControlLength)?;
    let msg = match kind {
        ctype::HELLO => {
            let link_id = r.u8()?;
            let bond_id = r.u64()?;
            let name_len = usize::from(r.u8()?);
            if name_len > MAX_LINK_NAME {
                return Err(DecodeError::BadName);
            }
            let name = r.bytes(name_len)?;
            let name = std::str::from_utf8(name).map_err(|_| DecodeError::BadName)?;
            Control::Hello(Hello {
                link_id,
                bond_id,
                name: name.to_owned(),
            })
        }
        ctype::HELLO_ACK => Control::HelloAck {
            link_id: r.u8()?,
            bond_id: r.u64()?,
            acker_bond_id: r.u64()?,
        },
        ctype::PROBE => Control::Probe(Probe {
            link_id: r.u8()?,
            probe_seq: r.u32()?,
            send_time_us: r.u32()?,
        }),
        ctype::PROBE_REPLY => Control::ProbeReply(ProbeReply {
            link_id: r.u8()?,
            probe_seq: r.u32()?,
            echo_time_us: r.u32()?,
            hold_us: r.u32()?,
        }),
        ctype::FEEDBACK => {
            let recv_time_us = r.u32()?;
            let n = usize::from(r.u8()?);
            if n > MAX_FEEDBACK_ENTRIES {
                return Err(DecodeError::BadControlLength);
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push(FeedbackEntry {
                    link_id: r.u8()?,
                    highest_link_seq: r.u32()?,
                    packets: r.u32()?,
                    bytes: r.u64()?,
                    owd_us: r.u32()? as i32,
                    jitter_us: r.u32()?,
                    min_owd_us: r.u32()? as i32,
                });
            }
            Control::Feedback(Feedback {
                recv_time_us,
                entries,
            })
        }
        ctype::NACK => {
            let link_id = r.u8()?;
            let first_link_seq = r.u32()?;
            let count = r.u16()?;
            if count == 0 || count > MAX_NACK_RUN {
                return Err(DecodeError::BadControlLength);
            }
            Control::Nack(Nack {
                link_id,
                first_link_seq,
                count,
            })
        }
        ctype::ORDERED_ON => Control::OrderedOn { link_id: r.u8()? },
        ctype::TAIL => Control::Tail {
            link_id: r.u8()?,
            link_seq: r.u32()?,
        },
        ctype::FEATURES => {
            let bits = r.u8()?;
            // A later version may say more after the first byte: not ours to read.
            r.buf = &[];
            Control::Features { bits }
        }
        _ => return Err(DecodeError::UnknownType),
    };
    if !r.is_empty() {
        return Err(DecodeError::BadControlLength);
    }
    Ok(msg)
}

/// Appends `packet` and its trailer to `out` (cleared first), compact if `trailer.compact`
/// (the low bits of `seq` and `link_seq`). `packet` must be an IP packet whose header length
/// equals `packet.len()`; the caller checked it with [`ip_packet_len`].
pub fn encode_data(packet: &[u8], trailer: &Trailer, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(packet.len() + TRAILER_LEN);
    out.extend_from_slice(packet);
    if trailer.compact {
        out.extend_from_slice(&(trailer.seq as u32).to_be_bytes());
        out.extend_from_slice(&(trailer.link_seq as u16).to_be_bytes());
        out.extend_from_slice(&trailer.send_time_us.to_be_bytes());
        out.push(trailer.link_id);
        out.push(trailer.flags & COMPACT_FLAGS);
        return;
    }
    out.extend_from_slice(&trailer.seq.to_be_bytes());
    out.extend_from_slice(&trailer.link_seq.to_be_bytes());
    out.extend_from_slice(&trailer.send_time_us.to_be_bytes());
    out.push(trailer.link_id);
    out.push(trailer.flags);
    out.push(0);
    out.push(VERSION);
}

/// Writes a control message into `out` (cleared first).
pub fn encode_control(msg: &Control, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0u8; CTRL_IP_LEN]);
    out.push(VERSION);
    match msg {
        Control::Hello(h) => {
            out.push(ctype::HELLO);
            out.push(h.link_id);
            out.extend_from_slice(&h.bond_id.to_be_bytes());
            // Names are validated at config time; cut on a char boundary all the same.
            let mut end = h.name.len().min(MAX_LINK_NAME);
            while !h.name.is_char_boundary(end) {
                end -= 1;
            }
            out.push(end as u8);
            out.extend_from_slice(&h.name.as_bytes()[..end]);
        }
        Control::HelloAck {
            link_id,
            bond_id,
            acker_bond_id,
        } => {
            out.push(ctype::HELLO_ACK);
            out.push(*link_id);
            out.extend_from_slice(&bond_id.to_be_bytes());
            out.extend_from_slice(&acker_bond_id.to_be_bytes());
        }
        Control::Probe(p) => {
            out.push(ctype::PROBE);
            out.push(p.link_id);
            out.extend_from_slice(&p.probe_seq.to_be_bytes());
            out.extend_from_slice(&p.send_time_us.to_be_bytes());
        }
        Control::ProbeReply(p) => {
            out.push(ctype::PROBE_REPLY);
            out.push(p.link_id);
            out.extend_from_slice(&p.probe_seq.to_be_bytes());
            out.extend_from_slice(&p.echo_time_us.to_be_bytes());
            out.extend_from_slice(&p.hold_us.to_be_bytes());
        }
        Control::Feedback(fb) => {
            out.push(ctype::FEEDBACK);
            out.extend_from_slice(&fb.recv_time_us.to_be_bytes());
            let n = fb.entries.len().min(MAX_FEEDBACK_ENTRIES);
            out.push(n as u8);
            for e in &fb.entries[..n] {
                out.push(e.link_id);
                out.extend_from_slice(&e.highest_link_seq.to_be_bytes());
                out.extend_from_slice(&e.packets.to_be_bytes());
                out.extend_from_slice(&e.bytes.to_be_bytes());
                out.extend_from_slice(&(e.owd_us as u32).to_be_bytes());
                out.extend_from_slice(&e.jitter_us.to_be_bytes());
                out.extend_from_slice(&(e.min_owd_us as u32).to_be_bytes());
            }
        }
        Control::Nack(n) => {
            out.push(ctype::NACK);
            out.push(n.link_id);
            out.extend_from_slice(&n.first_link_seq.to_be_bytes());
            out.extend_from_slice(&n.count.clamp(1, MAX_NACK_RUN).to_be_bytes());
        }
        Control::OrderedOn { link_id } => {
            out.push(ctype::ORDERED_ON);
            out.push(*link_id);
        }
        Control::Tail { link_id, link_seq } => {
            out.push(ctype::TAIL);
            out.push(*link_id);
            out.extend_from_slice(&link_seq.to_be_bytes());
        }
        Control::Features { bits } => {
            out.push(ctype::FEATURES);
            out.push(*bits);
        }
    }
    let total = out.len() as u16;
    let ip = &mut out[..CTRL_IP_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 1; // TTL: never forwarded, never leaves the tunnel
    ip[9] = CONTROL_PROTO;
    let csum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
}

/// Internet checksum of an IPv4 header (checksum field zero on input).
fn ipv4_checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 = hdr
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Bounds-checked big-endian reader; every read past the end is `BadControlLength`.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::BadControlLength);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

/// Bytes of a hello with an empty name (for tests and size checks).
pub const HELLO_MIN_LEN: usize = CTRL_IP_LEN + CTRL_HDR_LEN + 1 + 8 + 1;
/// Bytes of a feedback message with `n` entries.
pub const fn feedback_len(n: usize) -> usize {
    CTRL_IP_LEN + CTRL_HDR_LEN + 4 + 1 + n * FEEDBACK_ENTRY_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[9] = 17;
        p
    }

    fn ipv6(payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        p
    }

    fn trailer() -> Trailer {
        Trailer {
            seq: 0x0102_0304_0506_0708,
            link_seq: 77,
            send_time_us: 123_456,
            link_id: 3,
            flags: FLAG_DUPLICATE,
            compact: false,
        }
    }

    /// What a compact trailer of `trailer()` decodes to: the low bits of the sequence numbers.
    fn compact_trailer() -> Trailer {
        Trailer {
            seq: 0x0506_0708,
            link_seq: 77,
            compact: true,
            ..trailer()
        }
    }

    fn all_controls() -> Vec<Control> {
        vec![
            Control::Hello(Hello {
                link_id: 2,
                bond_id: 99,
                name: "lte-ü".into(),
            }),
            Control::HelloAck {
                link_id: 2,
                bond_id: 99,
                acker_bond_id: 7,
            },
            Control::Probe(Probe {
                link_id: 1,
                probe_seq: 5,
                send_time_us: u32::MAX,
            }),
            Control::ProbeReply(ProbeReply {
                link_id: 1,
                probe_seq: 5,
                echo_time_us: 7,
                hold_us: 12,
            }),
            Control::Feedback(Feedback {
                recv_time_us: 42,
                entries: vec![
                    FeedbackEntry {
                        link_id: 0,
                        highest_link_seq: 10,
                        packets: 9,
                        bytes: 1 << 40,
                        owd_us: -5000,
                        jitter_us: 300,
                        min_owd_us: -6000,
                    };
                    3
                ],
            }),
            Control::Feedback(Feedback::default()),
            Control::Nack(Nack {
                link_id: 1,
                first_link_seq: u32::MAX,
                count: MAX_NACK_RUN,
            }),
            Control::OrderedOn { link_id: 3 },
            Control::Tail {
                link_id: 2,
                link_seq: u32::MAX,
            },
            Control::Features {
                bits: FEATURE_COMPACT_TRAILER,
            },
        ]
    }

    #[test]
    fn data_round_trip_v4_and_v6() {
        for pkt in [ipv4(20), ipv4(1400), ipv6(0), ipv6(1200)] {
            let mut out = Vec::new();
            encode_data(&pkt, &trailer(), &mut out);
            assert_eq!(out.len(), pkt.len() + TRAILER_LEN);
            match decode(&out) {
                Ok(Message::Data { packet, trailer: t }) => {
                    assert_eq!(packet, &pkt[..]);
                    assert_eq!(t, trailer());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn compact_data_round_trip_keeps_the_low_bits() {
        for pkt in [ipv4(20), ipv4(1400), ipv6(0), ipv6(1200)] {
            let mut out = Vec::new();
            let sent = Trailer {
                link_seq: 0x0003_004d, // 77 in the low 16 bits
                flags: FLAG_UNORDERED | FLAG_RESENT,
                compact: true,
                ..trailer()
            };
            encode_data(&pkt, &sent, &mut out);
            assert_eq!(out.len(), pkt.len() + COMPACT_TRAILER_LEN);
            match decode(&out) {
                Ok(Message::Data { packet, trailer: t }) => {
                    assert_eq!(packet, &pkt[..]);
                    assert_eq!(
                        t,
                        Trailer {
                            flags: FLAG_UNORDERED | FLAG_RESENT,
                            ..compact_trailer()
                        }
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn compact_trailer_with_unknown_flag_bits_is_another_version() {
        let mut out = Vec::new();
        encode_data(&ipv4(60), &compact_trailer(), &mut out);
        assert!(decode(&out).is_ok());
        for bit in 3..8 {
            let mut t = out.clone();
            let last = t.len() - 1;
            t[last] |= 1 << bit;
            assert_eq!(decode(&t), Err(DecodeError::BadVersion), "bit {bit}");
        }
    }

    #[test]
    fn control_round_trip() {
        for msg in all_controls() {
            let mut out = Vec::new();
            encode_control(&msg, &mut out);
            // Must look like an IPv4 packet whose length covers everything (boringtun's rule).
            assert_eq!(ip_packet_len(&out), Ok(out.len()));
            assert_eq!(ipv4_checksum(&out[..20]), 0, "header checksum verifies");
            assert_eq!(decode(&out), Ok(Message::Control(msg)));
        }
    }

    #[test]
    fn feedback_len_matches_encoding() {
        let mut out = Vec::new();
        if let Control::Feedback(fb) = &all_controls()[4] {
            encode_control(&Control::Feedback(fb.clone()), &mut out);
            assert_eq!(out.len(), feedback_len(fb.entries.len()));
        }
        encode_control(
            &Control::Hello(Hello {
                link_id: 0,
                bond_id: 0,
                name: String::new(),
            }),
            &mut out,
        );
        assert_eq!(out.len(), HELLO_MIN_LEN);
    }

    #[test]
    fn rejects_truncated_and_non_ip() {
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x45; 19]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x60; 39]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x00; 60]), Err(DecodeError::NotIp));
        assert_eq!(decode(&[0xff; 60]), Err(DecodeError::NotIp));
    }

    #[test]
    fn rejects_bad_ip_lengths() {
        let mut p = ipv4(40);
        p[2..4].copy_from_slice(&41u16.to_be_bytes());
        assert_eq!(decode(&p), Err(DecodeError::BadIpLength));
        p[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(decode(&p), Err(DecodeError::BadIpLength));
        let mut p = ipv4(40);
        p[0] = 0x4f; // IHL 60 bytes > total length 40
        assert_eq!(decode(&p), Err(DecodeError::BadIpLength));
        let mut p = ipv6(10);
        p[4..6].copy_from_slice(&11u16.to_be_bytes());
        assert_eq!(decode(&p), Err(DecodeError::BadIpLength));
    }

    #[test]
    fn rejects_bad_trailer_length_and_version() {
        let mut out = Vec::new();
        encode_data(&ipv4(60), &trailer(), &mut out);
        for cut in (1..TRAILER_LEN).filter(|&c| c != TRAILER_LEN - COMPACT_TRAILER_LEN) {
            assert_eq!(
                decode(&out[..out.len() - cut]),
                Err(DecodeError::BadTrailerLength)
            );
        }
        let mut long = out.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::BadTrailerLength));
        let last = out.len() - 1;
        out[last] = VERSION + 1;
        assert_eq!(decode(&out), Err(DecodeError::BadVersion));
    }

    #[test]
    fn rejects_plain_ip_without_trailer() {
        assert_eq!(decode(&ipv4(40)), Err(DecodeError::NotControl));
        assert_eq!(decode(&ipv6(8)), Err(DecodeError::NotControl));
    }

    #[test]
    fn rejects_bad_control_bodies() {
        for msg in all_controls() {
            let mut out = Vec::new();
            encode_control(&msg, &mut out);
            // Every truncation (with the IP length fixed up) is rejected, never a panic.
            for len in 20..out.len() {
                let mut t = out[..len].to_vec();
                t[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                assert_eq!(
                    decode(&t),
                    Err(DecodeError::BadControlLength),
                    "{msg:?} {len}"
                );
            }
            // One byte too many: refused, but for Features, which leaves room for more.
            let mut t = out.clone();
            t.push(0);
            let len = t.len() as u16;
            t[2..4].copy_from_slice(&len.to_be_bytes());
            if matches!(msg, Control::Features { .. }) {
                assert_eq!(decode(&t), Ok(Message::Control(msg.clone())));
            } else {
                assert_eq!(decode(&t), Err(DecodeError::BadControlLength));
            }
            // Bad version.
            let mut t = out.clone();
            t[20] = 9;
            assert_eq!(decode(&t), Err(DecodeError::BadVersion));
        }
        let mut out = Vec::new();
        encode_control(&all_controls()[2], &mut out);
        out[21] = 200;
        assert_eq!(decode(&out), Err(DecodeError::UnknownType));
    }

    #[test]
    fn rejects_bad_hello_names_and_feedback_counts() {
        let mut out = Vec::new();
        encode_control(
            &Control::Hello(Hello {
                link_id: 0,
                bond_id: 0,
                name: "ab".into(),
            }),
            &mut out,
        );
        let name_at = HELLO_MIN_LEN - 1;
        let mut bad = out.clone();
        bad[name_at + 1] = 0xff; // invalid UTF-8
        assert_eq!(decode(&bad), Err(DecodeError::BadName));
        let mut long = out.clone();
        long[name_at] = (MAX_LINK_NAME + 1) as u8;
        assert_eq!(decode(&long), Err(DecodeError::BadName));

        let mut fb = Vec::new();
        encode_control(&Control::Feedback(Feedback::default()), &mut fb);
        let n_at = fb.len() - 1;
        fb[n_at] = (MAX_FEEDBACK_ENTRIES + 1) as u8;
        assert_eq!(decode(&fb), Err(DecodeError::BadControlLength));
    }

    #[test]
    fn control_must_be_plain_ipv4_proto_253() {
        let mut out = Vec::new();
        encode_control(&all_controls()[2], &mut out);
        let mut t = out.clone();
        t[9] = 17;
        assert_eq!(decode(&t), Err(DecodeError::NotControl));
        let mut t = out.clone();
        t[0] = 0x46; // options present: not ours
        assert_eq!(decode(&t), Err(DecodeError::NotControl));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_ip_shaped_input(
            mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 20..200),
            cut in 0usize..60,
        ) {
            bytes[0] = 0x45;
            let len = (bytes.len().saturating_sub(cut)).max(20) as u16;
            bytes[2..4].copy_from_slice(&len.to_be_bytes());
            bytes[9] = CONTROL_PROTO;
            let _ = decode(&bytes);
        }
    }
}
