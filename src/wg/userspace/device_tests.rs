//! Tests of the running device. They need root and /dev/net/tun and create
//! TUN interfaces, so each runs on its own thread inside a private network
//! namespace (`unshare(CLONE_NEWNET)`), which vanishes with the thread: the
//! host's interfaces are never touched. Without root they are skipped with a
//! message, except under `CI=true`, where that is a failure.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::device::UserspaceDevice;
use super::error::UserspaceError;

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mpw-devtest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn start_retry(name: &str, dir: &Path) -> UserspaceDevice {
    // After a drop, the TUN is deleted once the aborted tasks are gone.
    for _ in 0..50 {
        match UserspaceDevice::start_in(name, dir).await {
            Ok(d) => return d,
            Err(UserspaceError::Tun { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("start failed: {e}"),
        }
    }
    panic!("TUN {name} never became free");
}

async fn raw_request(path: &Path, req: &str) -> String {
    let mut s = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.ends_with(b"\n\n") {
        let n = s.read(&mut buf).await.expect("read");
        assert!(
            n > 0,
            "connection closed early: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).expect("utf-8 answer")
}

/// Runs `body` on a fresh thread in a private network namespace with `lo` up.
fn in_private_netns<F: std::future::Future<Output = ()>>(
    name: &str,
    body: impl FnOnce() -> F + Send + 'static,
) {
    if !crate::testing::require_root(name) {
        return;
    }
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespace membership.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(body());
    });
    if let Err(p) = handle.join() {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn lifecycle_uapi_and_raw_datagrams() {
    in_private_netns("lifecycle_uapi_and_raw_datagrams", lifecycle_body);
}

async fn lifecycle_body() {
    use std::os::unix::fs::PermissionsExt;

    let dir = scratch_dir("life");
    let name = "mpwt0";
    let sock = dir.join(format!("{name}.sock"));

    // A stale socket file (nobody listening) is replaced.
    std::fs::create_dir_all(&dir).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
    assert!(sock.exists());
    let dev = UserspaceDevice::start_in(name, &dir).await.expect("start");
    assert!(crate::wg::link_exists("mpwt0"));
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);

    // A live socket is not.
    match UserspaceDevice::start_in(name, &dir).await {
        Err(UserspaceError::SocketInUse { .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("second device started"),
    }

    assert_eq!(dev.listen_port(), None);
    let to: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    assert!(matches!(
        dev.send_raw(to, b"x").await,
        Err(UserspaceError::NotBound)
    ));

    // Configure over the socket, as `wg` does.
    let peer = hex::encode([0x42u8; 32]);
    let answer = raw_request(
        &sock,
        &format!(
            "set=1\nprivate_key={}\nlisten_port=0\npublic_key={peer}\n\
             allowed_ip=10.77.0.2/32\nendpoint=127.0.0.1:9\n\n",
            hex::encode([0x11u8; 32])
        ),
    )
    .await;
    assert_eq!(answer, "errno=0\n\n");
    let port = dev.listen_port().expect("bound after set");
    assert_ne!(port, 0);
    let got = raw_request(&sock, "get=1\n\n").await;
    assert!(got.contains(&format!("listen_port={port}\n")), "{got}");
    assert!(got.contains("allowed_ip=10.77.0.2/32\n"), "{got}");
    assert!(got.ends_with("errno=0\n\n"));
    assert_eq!(got, format!("{}errno=0\n\n", dev.uapi_get().await));

    // An invalid request changes nothing.
    let before = dev.uapi_get().await;
    let err = dev
        .uapi_set(&format!(
            "listen_port=1\npublic_key={peer}\nendpoint=1.1.1.1:1\nallowed_ip=x"
        ))
        .await
        .expect_err("invalid");
    assert_eq!(err.errno(), -22);
    assert_eq!(dev.uapi_get().await, before);
    assert_eq!(dev.listen_port(), Some(port));

    // Non-WireGuard datagrams reach the subscriber; send_raw answers.
    let mut raw = dev.subscribe_raw(8);
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dev_addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    client
        .send_to(&[1, 0, 0, 0, 0xde, 0xad], dev_addr)
        .await
        .expect("send");
    client.send_to(b"hello", dev_addr).await.expect("send");
    let (from, bytes) = tokio::time::timeout(Duration::from_secs(2), raw.recv())
        .await
        .expect("raw datagram in time")
        .expect("channel open");
    assert_eq!(
        bytes, b"hello",
        "the WireGuard-typed junk must not be forwarded"
    );
    assert_eq!(from, client.local_addr().expect("addr"));
    dev.send_raw(from, b"world").await.expect("send_raw");
    let mut buf = [0u8; 16];
    let (n, src) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
        .await
        .expect("reply in time")
        .expect("recv");
    assert_eq!(&buf[..n], b"world");
    assert_eq!(src, dev_addr);

    // Rebinding on a port change.
    dev.uapi_set("listen_port=0").await.expect("rebind");
    assert!(dev.listen_port().is_some());

    // Dropping removes the socket file.
    drop(dev);
    assert!(!sock.exists());

    // Shutdown removes the socket and deletes the TUN.
    let dev = start_retry(name, &dir).await;
    assert!(sock.exists());
    dev.shutdown().await;
    assert!(!sock.exists());
    assert!(!crate::wg::link_exists("mpwt0"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn rejects_bad_interface_names() {
    let dir = scratch_dir("names");
    for bad in ["", "a/b", "waytoolonginterfacename", "..", "with space"] {
        assert!(matches!(
            UserspaceDevice::start_in(bad, &dir).await,
            Err(UserspaceError::InvalidName(_))
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_poke_is_sent_even_when_the_peer_pokes_first() {
    in_private_netns("a_poke_is_sent_even_when_the_peer_pokes_first", poke_body);
}

/// Two devices on loopback with a session; both poke (keepalive off, then
/// on) in the same instant, as members do on the shared beat. Each must
/// send its keepalive: one arriving from the other side first must not
/// cancel it (it did, and one side then heard nothing for 25 s).
async fn poke_body() {
    let dir = scratch_dir("poke");
    let secret = |b: u8| x25519_dalek::StaticSecret::from([b; 32]);
    let public = |b: u8| hex::encode(x25519_dalek::PublicKey::from(&secret(b)).as_bytes());
    // Timer runs half a period apart, as two members' are: the poke of the
    // one whose timer runs first reaches the other before its own run.
    let a = UserspaceDevice::start_in("mpwt1", &dir).await.expect("a");
    tokio::time::sleep(Duration::from_millis(125)).await;
    let b = UserspaceDevice::start_in("mpwt2", &dir).await.expect("b");
    for (dev, me) in [(&a, 1u8), (&b, 2u8)] {
        dev.uapi_set(&format!(
            "private_key={}\nlisten_port=0",
            hex::encode(secret(me).to_bytes())
        ))
        .await
        .expect("key");
    }
    let (pa, pb) = (
        a.listen_port().expect("a port"),
        b.listen_port().expect("b port"),
    );
    let peer_of = |other: u8, port: u16, ka: u16| {
        format!(
            "public_key={}\nendpoint=127.0.0.1:{port}\npersistent_keepalive_interval={ka}\n\
             allowed_ip=10.99.0.{other}/32",
            public(other)
        )
    };
    a.uapi_set(&peer_of(2, pb, 25)).await.expect("a peer");
    b.uapi_set(&peer_of(1, pa, 25)).await.expect("b peer");
    let rx = |dump: String| -> u64 {
        dump.lines()
            .find_map(|l| l.strip_prefix("rx_bytes="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // The session: a keepalive right after the peer is added starts it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rx(a.uapi_get().await) == 0 || rx(b.uapi_get().await) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no session");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for round in 0..5 {
        // Let earlier packets settle, then poke both at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (ra, rb) = (rx(a.uapi_get().await), rx(b.uapi_get().await));
        for (dev, other, port) in [(&a, 2u8, pb), (&b, 1u8, pa)] {
            dev.uapi_set(&peer_of(other, port, 0)).await.expect("off");
            dev.uapi_set(&peer_of(other, port, 25)).await.expect("on");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let (na, nb) = (rx(a.uapi_get().await), rx(b.uapi_get().await));
            if na > ra && nb > rb {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: a poke was not sent (a heard {} bytes, b heard {})",
                na - ra,
                nb - rb
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    a.shutdown().await;
    b.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
