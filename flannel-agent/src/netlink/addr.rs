//! Addresses of one link: list, add, delete.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::AddressMessageBuilder;

use super::{Netlink, NetlinkError};

impl Netlink {
    /// The addresses on link `index`, as `(address, prefix length)`.
    pub async fn link_addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>, NetlinkError> {
        let mut out = Vec::new();
        let mut dump = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetlinkError::request(format!("address dump of link {index}"), e))?
        {
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(address) {
                out.push((ip, msg.header.prefix_len));
            }
        }
        Ok(out)
    }

    /// `ip addr add <ip>/<len> dev <index> nodad`; an address already there is not
    /// an error. No duplicate address detection: the overlay has no other owner
    /// of the address, and a tentative address could not be used for a second.
    pub async fn add_address(&self, index: u32, ip: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
        let mut msg = address_message(index, ip, prefix_len);
        if ip.is_ipv6() {
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        let mut req = self.handle.address().add(index, ip, prefix_len);
        *req.message_mut() = msg;
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NetlinkError::request(format!("add address {ip}/{prefix_len} to link {index}"), e);
                if e.raw_os_error() == Some(libc::EEXIST) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// `ip addr del <ip>/<len> dev <index>`; an address already gone is not an error.
    pub async fn delete_address(&self, index: u32, ip: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
        let msg = address_message(index, ip, prefix_len);
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NetlinkError::request(format!("delete address {ip}/{prefix_len} from link {index}"), e);
                if matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::ENOENT)) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

fn address_message(index: u32, ip: IpAddr, prefix_len: u8) -> AddressMessage {
    match ip {
        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, prefix_len)
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(a, prefix_len)
            .build(),
    }
}
