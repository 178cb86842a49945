//! Longest-prefix-match table for allowed IPs (cryptokey routing).

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Maps prefixes to values and finds the value of the longest prefix that
/// contains an address. One hash map per prefix length, searched from the
/// longest length down: a handful of lengths is the common case.
#[derive(Debug, Clone)]
pub struct AllowedIps<V> {
    v4: Vec<(u8, HashMap<u32, V>)>,
    v6: Vec<(u8, HashMap<u128, V>)>,
}

impl<V> Default for AllowedIps<V> {
    fn default() -> Self {
        AllowedIps {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask4(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

fn mask6(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len.min(128)))
    }
}

fn bucket<K, V>(buckets: &mut Vec<(u8, HashMap<K, V>)>, len: u8) -> &mut HashMap<K, V> {
    // Kept sorted by prefix length, longest first.
    let pos = match buckets.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(pos) => pos,
        Err(pos) => {
            buckets.insert(pos, (len, HashMap::new()));
            pos
        }
    };
    &mut buckets[pos].1
}

impl<V> AllowedIps<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `net` (host bits are ignored), replacing any previous value.
    pub fn insert(&mut self, net: IpNet, value: V) {
        match net.trunc() {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                bucket(&mut self.v4, len).insert(u32::from(n.network()), value);
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                bucket(&mut self.v6, len).insert(u128::from(n.network()), value);
            }
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .find_map(|(len, map)| map.get(&(a & mask4(*len))))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .iter()
                    .find_map(|(len, map)| map.get(&(a & mask6(*len))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), "default");
        t.insert(net("10.0.0.0/8"), "ten");
        t.insert(net("10.1.2.3/24"), "ten-one-two");
        t.insert(net("10.1.2.7/32"), "host");
        assert_eq!(t.lookup(ip("10.1.2.7")), Some(&"host"));
        assert_eq!(t.lookup(ip("10.1.2.8")), Some(&"ten-one-two"));
        assert_eq!(t.lookup(ip("10.9.9.9")), Some(&"ten"));
        assert_eq!(t.lookup(ip("192.168.1.1")), Some(&"default"));
        assert_eq!(t.lookup(ip("::1")), None);
    }

    #[test]
    fn ipv6_and_replace() {
        let mut t = AllowedIps::new();
        t.insert(net("fd00::/8"), 1);
        t.insert(net("fd00:1::/32"), 2);
        t.insert(net("fd00:1::5/128"), 3);
        assert_eq!(t.lookup(ip("fd00:1::5")), Some(&3));
        assert_eq!(t.lookup(ip("fd00:1::6")), Some(&2));
        assert_eq!(t.lookup(ip("fd77::1")), Some(&1));
        assert_eq!(t.lookup(ip("fe80::1")), None);
        t.insert(net("fd00:1::/32"), 4);
        assert_eq!(t.lookup(ip("fd00:1::6")), Some(&4));
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
    }
}
