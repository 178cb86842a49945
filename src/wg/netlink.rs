//! The interface's address and link state over rtnetlink, in-process.
//!
//! `ip address show/flush/add` and `ip link set` were four processes per
//! start: 102 ms (median) and up to 258 ms of a node's start when 40 start
//! at once on two cores (testnet, flat 40). The messages are those of
//! `netlink-packet-route`, sent with `netlink-request` (both already in the
//! tree for wireguard-control's kernel backend).

use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_request::netlink_request_rtnl;

/// The index of interface `name`.
pub fn index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i)
    }
}

fn address_message(index: u32, ip: Ipv4Addr, prefix_len: u8) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = prefix_len;
    m.header.index = index;
    m.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
    m.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
    m
}

/// The IPv4 addresses (with prefix lengths) on interface `index`.
pub fn ipv4_addresses(index: u32) -> io::Result<Vec<(Ipv4Addr, u8)>> {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    let answers = netlink_request_rtnl(
        RouteNetlinkMessage::GetAddress(m),
        Some(NLM_F_REQUEST | NLM_F_DUMP),
    )?;
    let mut out = Vec::new();
    for a in answers {
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) = a.payload else {
            continue;
        };
        if a.header.index != index {
            continue;
        }
        let local = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let address = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            out.push((ip, a.header.prefix_len));
        }
    }
    Ok(out)
}

/// Removes `ip/prefix_len` from interface `index`.
pub fn del_ipv4(index: u32, ip: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
    netlink_request_rtnl(
        RouteNetlinkMessage::DelAddress(address_message(index, ip, prefix_len)),
        Some(NLM_F_REQUEST | NLM_F_ACK),
    )
    .map(drop)
}

/// Puts `ip/prefix_len` on interface `index` (as `ip address replace`).
pub fn add_ipv4(index: u32, ip: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
    netlink_request_rtnl(
        RouteNetlinkMessage::NewAddress(address_message(index, ip, prefix_len)),
        Some(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE),
    )
    .map(drop)
}

/// Sets the MTU of interface `index` and brings it up.
pub fn set_up(index: u32, mtu: u32) -> io::Result<()> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    m.attributes.push(LinkAttribute::Mtu(mtu));
    netlink_request_rtnl(
        RouteNetlinkMessage::SetLink(m),
        Some(NLM_F_REQUEST | NLM_F_ACK),
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the loopback of a network namespace of its own (a thread that
    /// unshares its network namespace; nothing outside it changes): an
    /// address is added, listed and replaced by another, and the link set
    /// up with an MTU, all without the `ip` command; errors come back as
    /// errors.
    #[test]
    fn addresses_and_link_state_over_netlink() {
        if !crate::testing::require_root("addresses_and_link_state_over_netlink") {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare with CLONE_NEWNET moves this thread alone
            // into a new, empty network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let lo = index("lo").expect("lo");
            assert!(index("no-such-if0").is_err());
            let a = Ipv4Addr::new(10, 99, 0, 1);
            let b = Ipv4Addr::new(10, 99, 0, 2);
            add_ipv4(lo, a, 16).expect("add");
            add_ipv4(lo, a, 16).expect("adding it again is no error");
            assert_eq!(ipv4_addresses(lo).expect("list"), vec![(a, 16)]);
            // Replaced as `WgInterface::set_address` does: the old one
            // first (removing a primary address takes the secondaries of
            // its subnet with it), then the new one.
            del_ipv4(lo, a, 16).expect("del");
            assert!(del_ipv4(lo, a, 16).is_err(), "removing it twice fails");
            add_ipv4(lo, b, 16).expect("add the second");
            assert_eq!(ipv4_addresses(lo).expect("list"), vec![(b, 16)]);
            set_up(lo, 1420).expect("up");
            assert!(set_up(index("lo").unwrap() + 1000, 1420).is_err());
        })
        .join()
        .expect("the namespace thread");
    }
}
