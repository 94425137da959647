//! Nexthop objects (`ip nexthop`, Linux 5.3 and later): dump, create, replace, delete.
//!
//! Why they exist here: an IPv4 route with its own gateway gets its own `fib_info`, and the
//! kernel hashes those on the output device only, so 10,000 per-peer gateways through
//! `flannel.<VNI>` land in one hash chain and inserting them is quadratic. A route that
//! points at a nexthop object (`nhid`) shares no such chain.
//!
//! Hand-written messages: netlink-packet-route 0.34 has no `RTM_*NEXTHOP` messages (its
//! `RouteNetlinkMessage` cannot carry them, so rtnetlink's handle cannot send them). The
//! format is small (`struct nhmsg` and a few attributes, see `include/uapi/linux/nexthop.h`),
//! so [`NexthopMessage`] encodes it and goes over a second netlink-proto connection: the
//! same request/answer matching rtnetlink uses, so these writes pipeline like the others
//! ([`super::pipelined`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::StreamExt;
use rtnetlink::packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::proto::ConnectionHandle;
use rtnetlink::sys::SocketAddr;

use super::{Netlink, NetlinkError};

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;

const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;

/// `RTNH_F_ONLINK` in `nh_flags`.
const RTNH_F_ONLINK: u32 = 4;
/// `sizeof(struct nhmsg)`: family, scope, protocol, reserved (u8 each), flags (u32).
const NHMSG_LEN: usize = 8;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// The handle of the connection that carries nexthop messages.
pub(super) type NexthopHandle = ConnectionHandle<NexthopMessage>;

/// Opens the nexthop connection and spawns its task on the current tokio runtime.
pub(super) fn connect() -> std::io::Result<NexthopHandle> {
    let (mut connection, handle, _) =
        rtnetlink::proto::new_connection::<NexthopMessage>(rtnetlink::sys::protocols::NETLINK_ROUTE)?;
    super::grow_receive_buffer(std::os::fd::AsRawFd::as_raw_fd(connection.socket_mut()));
    tokio::spawn(connection);
    Ok(handle)
}

/// A nexthop object, as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NexthopEntry {
    /// `NHA_ID`.
    pub id: u32,
    /// `NHA_GATEWAY`, if any.
    pub gateway: Option<IpAddr>,
    /// `NHA_OIF`, if any.
    pub oif: Option<u32>,
    /// `RTNH_F_ONLINK`.
    pub onlink: bool,
    /// `nh_protocol`: who installed it (`RTPROT_*`).
    pub protocol: u8,
    /// A group (`NHA_GROUP`) or a blackhole (`NHA_BLACKHOLE`) rather than one gateway.
    pub special: bool,
}

/// An IPv4 gateway nexthop to install: `ip nexthop add id <id> via <gateway> dev <oif>
/// onlink proto <protocol>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NexthopSpec {
    /// The object's id (never 0).
    pub id: u32,
    /// The gateway, taken to be on the link (`onlink`).
    pub gateway: Ipv4Addr,
    /// Output interface.
    pub oif: u32,
    /// `nh_protocol` to mark it with.
    pub protocol: u8,
}

impl NexthopEntry {
    /// Whether the object is exactly `s`.
    pub fn is(&self, s: &NexthopSpec) -> bool {
        self.id == s.id
            && !self.special
            && self.gateway == Some(IpAddr::V4(s.gateway))
            && self.oif == Some(s.oif)
            && self.onlink
            && self.protocol == s.protocol
    }
}

/// One nexthop message: the `struct nhmsg` fields and the raw attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NexthopMessage {
    kind: u16,
    family: u8,
    scope: u8,
    protocol: u8,
    flags: u32,
    attrs: Vec<(u16, Vec<u8>)>,
}

impl NexthopMessage {
    fn new(kind: u16) -> Self {
        Self {
            kind,
            family: 0,
            scope: 0,
            protocol: 0,
            flags: 0,
            attrs: Vec::new(),
        }
    }

    fn attr(&self, kind: u16) -> Option<&[u8]> {
        self.attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.as_slice())
    }

    fn entry(&self) -> Option<NexthopEntry> {
        let u32_of = |v: &[u8]| Some(u32::from_ne_bytes(v.try_into().ok()?));
        let id = self.attr(NHA_ID).and_then(u32_of)?;
        let gateway = match (self.family, self.attr(NHA_GATEWAY)) {
            (AF_INET, Some(v)) => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).ok()?))),
            (AF_INET6, Some(v)) => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).ok()?))),
            _ => None,
        };
        Some(NexthopEntry {
            id,
            gateway,
            oif: self.attr(NHA_OIF).and_then(u32_of),
            onlink: self.flags & RTNH_F_ONLINK != 0,
            protocol: self.protocol,
            special: self.attr(NHA_GROUP).is_some() || self.attr(NHA_BLACKHOLE).is_some(),
        })
    }
}

/// Rounds an attribute length up to the 4-byte alignment netlink uses.
fn align(len: usize) -> usize {
    (len + 3) & !3
}

impl NetlinkSerializable for NexthopMessage {
    fn message_type(&self) -> u16 {
        self.kind
    }

    fn buffer_len(&self) -> usize {
        NHMSG_LEN + self.attrs.iter().map(|(_, v)| align(4 + v.len())).sum::<usize>()
    }

    fn serialize(&self, buf: &mut [u8]) {
        buf[..NHMSG_LEN].fill(0);
        buf[0] = self.family;
        buf[1] = self.scope;
        buf[2] = self.protocol;
        buf[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        let mut at = NHMSG_LEN;
        for (kind, value) in &self.attrs {
            let len = 4 + value.len();
            // Attributes here are at most 16 bytes of value; the length always fits.
            buf[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
            buf[at + 2..at + 4].copy_from_slice(&kind.to_ne_bytes());
            buf[at + 4..at + len].copy_from_slice(value);
            buf[at + len..at + align(len)].fill(0);
            at += align(len);
        }
    }
}

/// A nexthop message the kernel sent that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("malformed nexthop message: {0}")]
pub struct NexthopDecodeError(&'static str);

impl NetlinkDeserializable for NexthopMessage {
    type Error = NexthopDecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        if payload.len() < NHMSG_LEN {
            return Err(NexthopDecodeError("shorter than struct nhmsg"));
        }
        let mut msg = NexthopMessage {
            kind: header.message_type,
            family: payload[0],
            scope: payload[1],
            protocol: payload[2],
            flags: u32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]),
            attrs: Vec::new(),
        };
        let mut rest = &payload[NHMSG_LEN..];
        while rest.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
            // NLA_F_NESTED and NLA_F_NET_BYTEORDER are flags, not part of the type.
            let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
            if len < 4 || len > rest.len() {
                return Err(NexthopDecodeError("attribute length out of bounds"));
            }
            msg.attrs.push((kind, rest[4..len].to_vec()));
            rest = &rest[align(len).min(rest.len())..];
        }
        Ok(msg)
    }
}

impl Netlink {
    /// Every nexthop object of the namespace (`ip nexthop show`), of every family.
    /// Fails on kernels without nexthop objects (before 5.3): the probe.
    pub async fn nexthops(&self) -> Result<Vec<NexthopEntry>, NetlinkError> {
        let op = "nexthop dump";
        let mut out = Vec::new();
        let mut answers =
            self.nexthop_request(NexthopMessage::new(RTM_GETNEXTHOP), NLM_F_REQUEST | NLM_F_DUMP, || {
                op.to_owned()
            })?;
        while let Some(msg) = answers.next().await {
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => out.extend(m.entry()),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(kernel_error(op, e)),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Installs `s`. With `replace`, an existing object with that id is overwritten in
    /// place (routes using it follow); without, an existing id fails with `EEXIST`, so an
    /// object somebody else made since the last dump is never touched.
    pub async fn write_nexthop(&self, s: &NexthopSpec, replace: bool) -> Result<(), NetlinkError> {
        let op = || {
            format!(
                "{} nexthop id {} via {} dev {}",
                if replace { "replace" } else { "add" },
                s.id,
                s.gateway,
                s.oif
            )
        };
        let mut msg = NexthopMessage::new(RTM_NEWNEXTHOP);
        msg.family = AF_INET;
        // nh_scope stays 0: the kernel rejects a request with it set ("Invalid values in
        // header") and derives the scope itself.
        msg.protocol = s.protocol;
        msg.flags = RTNH_F_ONLINK;
        msg.attrs.push((NHA_ID, s.id.to_ne_bytes().to_vec()));
        msg.attrs.push((NHA_OIF, s.oif.to_ne_bytes().to_vec()));
        msg.attrs.push((NHA_GATEWAY, s.gateway.octets().to_vec()));
        let mode = if replace { NLM_F_REPLACE } else { NLM_F_EXCL };
        self.acked(msg, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | mode, op)
            .await
    }

    /// Deletes the object `id`; the kernel deletes every route still using it with it.
    /// An object already gone is not an error.
    pub async fn delete_nexthop(&self, id: u32) -> Result<(), NetlinkError> {
        let mut msg = NexthopMessage::new(RTM_DELNEXTHOP);
        msg.attrs.push((NHA_ID, id.to_ne_bytes().to_vec()));
        match self
            .acked(msg, NLM_F_REQUEST | NLM_F_ACK, || format!("delete nexthop id {id}"))
            .await
        {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    async fn acked(&self, msg: NexthopMessage, flags: u16, op: impl Fn() -> String) -> Result<(), NetlinkError> {
        // The description is built only for an error: this runs once per peer.
        let mut answers = self.nexthop_request(msg, flags, &op)?;
        while let Some(answer) = answers.next().await {
            if let NetlinkPayload::Error(e) = answer.payload {
                if e.code.is_some() {
                    return Err(kernel_error(op(), e));
                }
            }
        }
        Ok(())
    }

    fn nexthop_request(
        &self,
        msg: NexthopMessage,
        flags: u16,
        op: impl Fn() -> String,
    ) -> Result<impl futures::Stream<Item = NetlinkMessage<NexthopMessage>>, NetlinkError> {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        self.nexthop
            .request(req, SocketAddr::new(0, 0))
            .map_err(|_| NetlinkError::request(op(), rtnetlink::Error::RequestFailed))
    }
}

fn kernel_error(op: impl Into<String>, e: rtnetlink::packet_core::ErrorMessage) -> NetlinkError {
    NetlinkError::request(op, rtnetlink::Error::NetlinkError(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_message_reads_back_and_matches_iproute2s_layout() {
        let mut msg = NexthopMessage::new(RTM_NEWNEXTHOP);
        msg.family = AF_INET;
        msg.scope = 253;
        msg.protocol = 102;
        msg.flags = RTNH_F_ONLINK;
        msg.attrs.push((NHA_ID, 7u32.to_ne_bytes().to_vec()));
        msg.attrs.push((NHA_OIF, 3u32.to_ne_bytes().to_vec()));
        msg.attrs.push((NHA_GATEWAY, vec![10, 244, 5, 0]));
        let mut buf = vec![0xaa; msg.buffer_len()];
        msg.serialize(&mut buf);
        assert_eq!(buf.len(), 8 + 3 * 8);
        assert_eq!(&buf[..4], &[AF_INET, 253, 102, 0]);
        assert_eq!(&buf[8..10], &8u16.to_ne_bytes(), "NHA_ID length");
        assert_eq!(&buf[10..12], &NHA_ID.to_ne_bytes(), "NHA_ID type");
        let mut header = NetlinkHeader::default();
        header.message_type = RTM_NEWNEXTHOP;
        let back = NexthopMessage::deserialize(&header, &buf).unwrap();
        assert_eq!(back, msg);
        let e = back.entry().unwrap();
        assert!(e.is(&NexthopSpec {
            id: 7,
            gateway: Ipv4Addr::new(10, 244, 5, 0),
            oif: 3,
            protocol: 102
        }));
    }

    #[test]
    fn groups_blackholes_and_garbage() {
        let mut header = NetlinkHeader::default();
        header.message_type = RTM_NEWNEXTHOP;
        // A group: id 9, NHA_GROUP with one member (id 7, weight 0), padded.
        let nla = |len: u16, kind: u16| [len.to_ne_bytes(), kind.to_ne_bytes()].concat();
        let mut group = vec![0; 8];
        group.extend(nla(8, NHA_ID));
        group.extend(9u32.to_ne_bytes());
        group.extend(nla(12, NHA_GROUP));
        group.extend(7u32.to_ne_bytes());
        group.extend([0; 4]);
        let e = NexthopMessage::deserialize(&header, &group).unwrap().entry().unwrap();
        assert!(e.special && e.id == 9 && e.gateway.is_none());
        // Truncated header, and an attribute longer than the message.
        assert!(NexthopMessage::deserialize(&header, &[0; 5]).is_err());
        let mut bad = vec![0; 8];
        bad.extend(nla(40, NHA_ID));
        bad.extend(9u32.to_ne_bytes());
        assert!(NexthopMessage::deserialize(&header, &bad).is_err());
        // No id: not an object we can name.
        assert!(NexthopMessage::deserialize(&header, &[0; 8]).unwrap().entry().is_none());
    }
}
