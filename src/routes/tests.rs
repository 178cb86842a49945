use super::*;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn route(s: &str) -> Route {
    let n: ipnet::IpNet = s.parse().unwrap();
    Route {
        addr: n.addr(),
        prefix: n.prefix_len(),
    }
}

fn routes(list: &[&str]) -> Vec<Route> {
    list.iter().map(|s| route(s)).collect()
}

/// A member `k` advertising `adv`, admitted at `at` with a token allowing
/// `allow`.
struct M {
    key: u8,
    name: String,
    adv: Vec<Route>,
    allow: Vec<Route>,
    by_network: bool,
    at: u64,
    active: bool,
    underlay: Vec<IpAddr>,
}

fn m(key: u8, adv: &[&str], allow: &[&str]) -> M {
    M {
        key,
        name: format!("n{key}"),
        adv: routes(adv),
        allow: routes(allow),
        by_network: false,
        at: 100 + u64::from(key),
        active: true,
        underlay: vec![IpAddr::from([203, 0, 113, key])],
    }
}

fn adv(ms: &[M]) -> Vec<Advertiser<'_>> {
    ms.iter()
        .map(|m| Advertiser {
            key: [m.key; 32],
            name: &m.name,
            routes: &m.adv,
            allow_routes: &m.allow,
            by_network: m.by_network,
            admitted_at: m.at,
            active: m.active,
            underlay: &m.underlay,
        })
        .collect()
}

const SELF: u8 = 1;

/// Member `k` reached here at `a`.
fn ep(a: &str, k: u8) -> Endpoint {
    Endpoint {
        addr: a.parse().unwrap(),
        node: [k; 32],
        name: format!("n{k}"),
    }
}

fn host<'a>(
    connected: &'a [Ipv4Net],
    endpoints: &'a [Endpoint],
    foreign: &'a [Ipv4Net],
) -> Host<'a> {
    Host {
        self_key: [SELF; 32],
        overlay: net("10.77.0.0/16"),
        connected,
        endpoints,
        foreign,
    }
}

fn verdict(p: &Plan, key: u8, r: &str) -> Verdict {
    p.outcomes
        .iter()
        .find(|o| o.node == [key; 32] && o.route == r)
        .unwrap_or_else(|| panic!("no outcome for n{key} {r}: {:?}", p.outcomes))
        .verdict
        .clone()
}

#[test]
fn authorized_routes_install_and_others_are_refused_with_the_reason() {
    let ms = [
        m(SELF, &[], &[]),
        m(
            2,
            &["192.168.1.0/24", "192.168.9.0/24"],
            &["192.168.1.0/24"],
        ),
        // Inside a wider allowed subnet: allowed.
        m(3, &["172.16.5.0/24"], &["172.16.0.0/12"]),
        // No allowed routes at all.
        m(4, &["192.168.2.0/24"], &[]),
    ];
    let p = plan(&host(&[], &[], &[]), &adv(&ms));
    assert_eq!(p.installs_for(&[2; 32]), [net("192.168.1.0/24")]);
    assert_eq!(p.installs_for(&[3; 32]), [net("172.16.5.0/24")]);
    assert!(p.installs_for(&[4; 32]).is_empty());
    assert_eq!(
        p.routes(),
        [net("172.16.5.0/24"), net("192.168.1.0/24")].into()
    );
    let v = verdict(&p, 2, "192.168.9.0/24");
    assert_eq!(
        v,
        Verdict::Refused(Refusal::NotAllowed {
            allowed: vec!["192.168.1.0/24".into()]
        })
    );
    assert_eq!(
        v.reason().unwrap(),
        "not allowed by its token (allowed: 192.168.1.0/24)"
    );
    let v = verdict(&p, 4, "192.168.2.0/24");
    assert!(v.reason().unwrap().contains("allows no routes"), "{v:?}");
    assert_eq!(verdict(&p, 2, "192.168.1.0/24"), Verdict::Installed);
    assert_eq!(verdict(&p, 2, "192.168.1.0/24").as_str(), "installed");
}

#[test]
fn the_network_key_holder_may_advertise_any_route_but_not_a_capture() {
    let mut init = m(2, &["192.168.7.0/24", "0.0.0.0/0", "10.0.0.0/8"], &[]);
    init.by_network = true;
    let ms = [m(SELF, &[], &[]), init];
    let eps = [ep("198.51.100.7", 2)];
    let p = plan(&host(&[], &eps, &[]), &adv(&ms));
    assert_eq!(verdict(&p, 2, "192.168.7.0/24"), Verdict::Installed);
    // 0.0.0.0/0 and 10.0.0.0/8 contain the overlay.
    for r in ["0.0.0.0/0", "10.0.0.0/8"] {
        assert_eq!(
            verdict(&p, 2, r),
            Verdict::Refused(Refusal::Overlay(net("10.77.0.0/16"))),
            "{r}"
        );
    }
    assert_eq!(p.routes(), [net("192.168.7.0/24")].into());
}

#[test]
fn never_the_overlay_a_member_address_or_a_special_block() {
    let all = &["0.0.0.0/0"];
    let ms = [
        m(SELF, &[], &[]),
        m(
            2,
            &[
                "10.77.0.5/32",
                "10.77.128.0/17",
                "10.76.0.0/15",
                "127.0.0.0/8",
                "169.254.0.0/16",
                "224.0.0.0/24",
                "240.0.0.0/4",
                "0.0.0.0/8",
                "192.0.2.0/24",
            ],
            all,
        ),
    ];
    let p = plan(&host(&[], &[], &[]), &adv(&ms));
    for r in ["10.77.0.5/32", "10.77.128.0/17", "10.76.0.0/15"] {
        assert!(
            matches!(verdict(&p, 2, r), Verdict::Refused(Refusal::Overlay(_))),
            "{r}"
        );
    }
    for r in [
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/24",
        "240.0.0.0/4",
        "0.0.0.0/8",
    ] {
        assert!(
            matches!(verdict(&p, 2, r), Verdict::Refused(Refusal::Special(_))),
            "{r}"
        );
    }
    assert_eq!(p.routes(), [net("192.0.2.0/24")].into());
}

#[test]
fn no_route_covers_an_endpoint_a_connected_network_or_a_foreign_route() {
    let any = &["0.0.0.0/0"];
    let ms = [
        m(SELF, &[], &[]),
        m(
            2,
            &[
                "198.51.100.0/24",  // covers n3's endpoint
                "192.168.1.0/24",   // our LAN
                "192.168.0.0/16",   // contains our LAN
                "192.168.1.128/25", // inside our LAN
                "172.16.0.0/24",    // already routed here by someone else
                "172.17.0.0/24",
            ],
            any,
        ),
    ];
    let eps = [ep("198.51.100.9", 3), ep("2001:db8::1", 3)];
    let connected = [net("192.168.1.10/24")];
    let foreign = [net("172.16.0.0/24")];
    let p = plan(&host(&connected, &eps, &foreign), &adv(&ms));
    let v = verdict(&p, 2, "198.51.100.0/24");
    assert_eq!(
        v,
        Verdict::Refused(Refusal::Endpoint {
            member: "n3".into(),
            addr: "198.51.100.9".parse().unwrap()
        })
    );
    assert!(v
        .reason()
        .unwrap()
        .contains("n3's underlay address 198.51.100.9"));
    for r in ["192.168.1.0/24", "192.168.0.0/16", "192.168.1.128/25"] {
        assert_eq!(
            verdict(&p, 2, r),
            Verdict::Refused(Refusal::Connected(net("192.168.1.0/24"))),
            "{r}"
        );
    }
    assert_eq!(
        verdict(&p, 2, "172.16.0.0/24"),
        Verdict::Refused(Refusal::Foreign)
    );
    assert_eq!(p.routes(), [net("172.17.0.0/24")].into());
    // Local refusals are this host's; the others every member makes.
    assert!(!Refusal::Foreign.mesh_wide());
    assert!(Refusal::Overlay(net("10.77.0.0/16")).mesh_wide());
}

#[test]
fn a_route_never_covers_its_own_public_address_but_a_one_armed_gateway_is_fine() {
    let any = &["0.0.0.0/0"];
    // Its public address: the tunnel to it would carry its own packets.
    let mut gw = m(2, &["198.51.100.0/24", "192.168.50.0/24"], any);
    gw.underlay = vec![
        IpAddr::from([198, 51, 100, 20]),
        IpAddr::from([192, 168, 50, 2]),
    ];
    // We use its LAN address as its endpoint (tried before a handshake).
    let eps = [ep("192.168.50.2", 2)];
    let ms = [m(SELF, &[], &[]), gw];
    let p = plan(&host(&[], &eps, &[]), &adv(&ms));
    let v = verdict(&p, 2, "198.51.100.0/24");
    assert_eq!(
        v,
        Verdict::Refused(Refusal::Endpoint {
            member: "n2".into(),
            addr: "198.51.100.20".parse().unwrap()
        })
    );
    assert!(v.reason().unwrap().contains("WireGuard would loop"));
    // Its private address on the LAN it advertises (a gateway with one
    // interface, behind the LAN's router): installed, and that address is
    // never used as a WireGuard endpoint.
    assert_eq!(verdict(&p, 2, "192.168.50.0/24"), Verdict::Installed);
    assert!(!p.usable_endpoint(&"192.168.50.2".parse().unwrap()));
    assert!(p.usable_endpoint(&"198.51.100.20".parse().unwrap()));

    // What this host reaches members at: the device's endpoints (private or
    // not) and members' public addresses; other members' private host
    // addresses (their home LANs) do not count.
    let home: &[IpAddr] = &[
        IpAddr::from([192, 168, 1, 50]),
        IpAddr::from([100, 64, 3, 4]),
        IpAddr::from([198, 51, 100, 9]),
    ];
    let eps = reachable_endpoints(
        [(IpAddr::from([10, 99, 0, 3]), [3; 32], "n3")],
        [([4; 32], "n4", home)],
    );
    let addrs: Vec<String> = eps
        .iter()
        .map(|e| format!("{}={}", e.addr, e.name))
        .collect();
    assert_eq!(addrs, ["10.99.0.3=n3", "198.51.100.9=n4"]);
    let ms = [
        m(SELF, &[], &[]),
        m(2, &["192.168.1.0/24", "10.99.0.0/24"], any),
    ];
    let p = plan(&host(&[], &eps, &[]), &adv(&ms));
    assert_eq!(verdict(&p, 2, "192.168.1.0/24"), Verdict::Installed);
    assert!(matches!(
        verdict(&p, 2, "10.99.0.0/24"),
        Verdict::Refused(Refusal::Endpoint { .. })
    ));
    for (a, private) in [
        ("10.1.2.3", true),
        ("172.31.0.1", true),
        ("192.168.0.1", true),
        ("100.64.0.1", true),
        ("100.127.255.254", true),
        ("100.128.0.1", false),
        ("169.254.1.1", true),
        ("8.8.8.8", false),
        ("fd00::1", true),
        ("2001:db8::1", false),
    ] {
        assert_eq!(is_private(&a.parse().unwrap()), private, "{a}");
    }
}

#[test]
fn identical_subnets_go_to_the_first_admitted_member_whatever_the_order() {
    let lan = &["192.168.5.0/24"];
    let mut a = m(3, lan, lan);
    let mut b = m(2, lan, lan);
    a.at = 50; // admitted first, despite the larger key
    b.at = 60;
    let ms = [m(SELF, &[], &[]), a, b];
    let p = plan(&host(&[], &[], &[]), &adv(&ms));
    assert_eq!(verdict(&p, 3, "192.168.5.0/24"), Verdict::Installed);
    assert_eq!(
        verdict(&p, 2, "192.168.5.0/24"),
        Verdict::Refused(Refusal::Taken {
            holder: "n3".into()
        })
    );
    // Same inputs in another order: the same plan.
    let mut rev = adv(&ms);
    rev.reverse();
    assert_eq!(plan(&host(&[], &[], &[]), &rev), p);

    // Same stamp time: the smaller key wins.
    let (mut a, mut b) = (m(3, lan, lan), m(2, lan, lan));
    a.at = 50;
    b.at = 50;
    let ms = [m(SELF, &[], &[]), a, b];
    let p = plan(&host(&[], &[], &[]), &adv(&ms));
    assert_eq!(p.installs_for(&[2; 32]), [net("192.168.5.0/24")]);

    // The holder gone (no WireGuard peer here): the standby takes over.
    let (mut a, mut b) = (m(3, lan, lan), m(2, lan, lan));
    a.at = 50;
    a.active = false;
    b.at = 60;
    let ms = [m(SELF, &[], &[]), a, b];
    let p = plan(&host(&[], &[], &[]), &adv(&ms));
    assert_eq!(verdict(&p, 3, "192.168.5.0/24"), Verdict::Inactive);
    assert_eq!(verdict(&p, 2, "192.168.5.0/24"), Verdict::Installed);

    // An unauthorized claim never takes a subnet from its holder.
    let (mut a, mut b) = (m(3, lan, lan), m(2, lan, &[]));
    a.at = 50;
    b.at = 10;
    let ms = [m(SELF, &[], &[]), a, b];
    let p = plan(&host(&[], &[], &[]), &adv(&ms));
    assert_eq!(verdict(&p, 3, "192.168.5.0/24"), Verdict::Installed);
}

#[test]
fn overlapping_prefixes_are_just_routing() {
    let any = &["0.0.0.0/0"];
    let ms = [
        m(SELF, &[], &[]),
        m(2, &["172.20.0.0/16"], any),
        m(3, &["172.20.5.0/24"], any),
    ];
    let p = plan(&host(&[], &[], &[]), &adv(&ms));
    assert_eq!(p.installs_for(&[2; 32]), [net("172.20.0.0/16")]);
    assert_eq!(p.installs_for(&[3; 32]), [net("172.20.5.0/24")]);
}

#[test]
fn our_own_routes_are_advertised_not_installed() {
    let lan = &["192.168.1.0/24"];
    let mut me = m(SELF, &["192.168.1.0/24", "192.168.3.0/24"], lan);
    me.at = 10;
    let ms = [me, m(2, lan, lan)];
    let connected = [net("192.168.1.1/24")];
    let p = plan(&host(&connected, &[], &[]), &adv(&ms));
    assert_eq!(verdict(&p, SELF, "192.168.1.0/24"), Verdict::Advertised);
    assert!(matches!(
        verdict(&p, SELF, "192.168.3.0/24"),
        Verdict::Refused(Refusal::NotAllowed { .. })
    ));
    assert_eq!(
        verdict(&p, 2, "192.168.1.0/24"),
        Verdict::Refused(Refusal::Taken {
            holder: "n1".into()
        })
    );
    assert!(p.routes().is_empty());

    // We lost the subnet to a member admitted earlier: its route is
    // installed here too, unless it is our LAN.
    let mut me = m(SELF, &["192.168.4.0/24"], &["192.168.4.0/24"]);
    me.at = 90;
    let mut other = m(2, &["192.168.4.0/24"], &["192.168.4.0/24"]);
    other.at = 10;
    let ms = [me, other];
    let p = plan(&host(&[], &[], &[]), &adv(&ms));
    assert!(matches!(
        verdict(&p, SELF, "192.168.4.0/24"),
        Verdict::Refused(Refusal::Taken { .. })
    ));
    assert_eq!(p.installs_for(&[2; 32]), [net("192.168.4.0/24")]);

    // Our route covering a member's endpoint: we see why members refuse it.
    let me = m(SELF, &["198.51.100.0/24"], &["0.0.0.0/0"]);
    let eps = [ep("198.51.100.9", 3)];
    let p = plan(&host(&[], &eps, &[]), &adv(&[me]));
    assert!(matches!(
        verdict(&p, SELF, "198.51.100.0/24"),
        Verdict::Refused(Refusal::Endpoint { .. })
    ));
}

#[test]
fn inactive_invalid_and_duplicate_routes() {
    let lan = &["192.168.1.0/24"];
    let mut gone = m(2, lan, lan);
    gone.active = false;
    let mut bad = m(3, &["192.168.3.0/24", "192.168.3.0/24"], &["0.0.0.0/0"]);
    bad.adv.push(Route {
        addr: "fd00::".parse().unwrap(),
        prefix: 64,
    });
    bad.adv.push(Route {
        addr: "192.168.8.1".parse().unwrap(),
        prefix: 24,
    });
    bad.adv.push(Route {
        addr: "192.168.9.0".parse().unwrap(),
        prefix: 40,
    });
    let ms = [m(SELF, &[], &[]), gone, bad];
    let p = plan(&host(&[], &[], &[]), &adv(&ms));
    assert_eq!(verdict(&p, 2, "192.168.1.0/24"), Verdict::Inactive);
    assert!(verdict(&p, 2, "192.168.1.0/24").reason().is_some());
    assert!(matches!(
        verdict(&p, 3, "fd00::/64"),
        Verdict::Refused(Refusal::Invalid(RouteError::Ipv6(_)))
    ));
    assert!(matches!(
        verdict(&p, 3, "192.168.8.1/24"),
        Verdict::Refused(Refusal::Invalid(RouteError::HostBits { .. }))
    ));
    assert!(matches!(
        verdict(&p, 3, "192.168.9.0/40"),
        Verdict::Refused(Refusal::Invalid(RouteError::BadPrefix { .. }))
    ));
    assert_eq!(
        p.outcomes_of(&[3; 32])
            .filter(|o| o.route == "192.168.3.0/24")
            .count(),
        1
    );
    assert_eq!(p.routes(), [net("192.168.3.0/24")].into());
}

#[test]
fn routes_as_users_give_them() {
    assert_eq!(parse_route("192.168.10.0/24"), Ok(net("192.168.10.0/24")));
    assert_eq!(parse_route(" 10.1.0.0/16 "), Ok(net("10.1.0.0/16")));
    let e = parse_route("192.168.10.7/24").unwrap_err();
    assert!(e.contains("did you mean 192.168.10.0/24"), "{e}");
    assert!(parse_route("192.168.10.0")
        .unwrap_err()
        .contains("prefix length"));
    assert!(parse_route("fd00::/64").unwrap_err().contains("IPv6"));
    assert!(parse_route("192.168.10.0/33")
        .unwrap_err()
        .contains("not an IPv4 subnet"));
    assert!(parse_route("lan").is_err());
    assert!(parse_route("127.0.0.0/8").unwrap_err().contains("loopback"));
    assert!(parse_route("0.0.0.0/0")
        .unwrap_err()
        .contains("default route"));
    let many: Vec<Ipv4Net> = (0..=32u8)
        .map(|i| Ipv4Net::new(Ipv4Addr::new(10, i, 0, 0), 16).unwrap())
        .collect();
    assert!(check_routes(&many).unwrap_err().contains("at most 32"));
    assert_eq!(
        check_routes(&[net("10.2.0.0/16"), net("10.1.0.0/16"), net("10.2.0.0/16")]),
        Ok(vec![net("10.1.0.0/16"), net("10.2.0.0/16")])
    );
    for r in [net("192.168.1.0/24"), net("0.0.0.0/0"), net("10.0.0.1/32")] {
        assert_eq!(to_net(&from_net(r)), Ok(r));
    }
}
