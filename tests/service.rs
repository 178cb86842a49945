//! The systemd unit (contrib/systemd/meshpeer.service): `systemd-analyze
//! verify` accepts it (with ExecStart pointing at this build), and it keeps
//! its hardening. No systemd needs to run. Skipped without systemd-analyze,
//! unless CI=true.

use std::process::Command;

const UNIT: &str = include_str!("../contrib/systemd/meshpeer.service");

use meshpeer::testing::require_program;

#[test]
fn the_unit_is_hardened_and_verifies() {
    // The settings that matter, each present exactly as meant.
    for line in [
        "ExecStart=/usr/local/bin/meshpeer up --config /etc/meshpeer/meshpeer.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "CapabilityBoundingSet=CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/net/tun rw",
        "RuntimeDirectory=wireguard",
        "StateDirectory=meshpeer",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "ProtectKernelModules=yes",
        "ProtectKernelTunables=yes",
        "SystemCallFilter=@system-service",
    ] {
        assert!(UNIT.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    // Every exception to the hardening is explained right above it.
    for exception in [
        "ReadWritePaths=/etc",
        "ReadWritePaths=/proc/sys/net/ipv4/ip_forward",
        "PrivateDevices=no",
        "RuntimeDirectory=wireguard",
    ] {
        let lines: Vec<&str> = UNIT.lines().collect();
        let i = lines
            .iter()
            .position(|l| *l == exception)
            .unwrap_or_else(|| panic!("no {exception}"));
        assert!(
            lines[i - 1].starts_with('#'),
            "{exception} is not explained"
        );
    }

    if !require_program(
        "the_unit_is_hardened_and_verifies (verify)",
        "systemd-analyze",
        "systemd",
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mp-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = dir.join("meshpeer.service");
    std::fs::write(
        &unit,
        UNIT.replace("/usr/local/bin/meshpeer", env!("CARGO_BIN_EXE_meshpeer")),
    )
    .unwrap();
    // --man=no: the man page (Documentation=) is not installed here.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
