//! The device: its shared state, `start`/`shutdown`, and applying UAPI
//! requests to the running device.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::allowed_ips::AllowedIps;
use super::config::{DeviceConfig, Key, PeerConfig};
use super::dataplane;
use super::error::{UapiError, UserspaceError};
use super::ipc;
use super::net::{self, Bound};
use super::peer::{lock, random_index, DeviceKey, Peer};
use super::uapi::{self, PeerStats};

/// Where UAPI sockets live (shared by all network namespaces).
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// MTU given to the TUN interface.
pub const MTU: u16 = 1420;

/// A datagram received on the device's UDP socket that is not a WireGuard
/// message: source address and payload.
pub type RawDatagram = (SocketAddr, Vec<u8>);

pub(crate) struct State {
    /// Last applied configuration; peer endpoints here may be stale (roaming
    /// updates `PeerInner::endpoint`), `Shared::snapshot` has the live ones.
    pub config: DeviceConfig,
    pub key: Option<DeviceKey>,
    pub peers: HashMap<Key, Arc<Peer>>,
    pub by_index: HashMap<u32, Arc<Peer>>,
    pub routes: AllowedIps<Arc<Peer>>,
    pub bound: Option<Bound>,
}

pub(crate) struct Shared {
    pub ifname: String,
    pub tun: tun::AsyncDevice,
    pub state: RwLock<State>,
    /// Serialises UAPI operations (like wireguard-go's ipcMutex).
    ipc_lock: tokio::sync::Mutex<()>,
    pub raw_tx: Mutex<Option<mpsc::Sender<RawDatagram>>>,
    udp_tasks: Mutex<Vec<JoinHandle<()>>>,
}

pub(crate) fn read(l: &RwLock<State>) -> RwLockReadGuard<'_, State> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(l: &RwLock<State>) -> RwLockWriteGuard<'_, State> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// The configuration with live endpoints, and the live counters.
    fn snapshot(&self) -> (DeviceConfig, HashMap<u64, PeerStats>) {
        let st = read(&self.state);
        let mut cfg = st.config.clone();
        let mut stats = HashMap::new();
        for pc in &mut cfg.peers {
            if let Some(peer) = st.peers.get(&pc.public_key) {
                let inner = lock(&peer.inner);
                pc.endpoint = inner.endpoint;
                stats.insert(pc.id, inner.stats);
            }
        }
        (cfg, stats)
    }

    pub(crate) async fn uapi_get(&self) -> String {
        let _guard = self.ipc_lock.lock().await;
        let (cfg, stats) = self.snapshot();
        uapi::render_get(&cfg, &|id| stats.get(&id).copied().unwrap_or_default())
    }

    /// Applies the lines of a `set=1` request, all or nothing.
    pub(crate) async fn uapi_set(self: &Arc<Self>, lines: &[&str]) -> Result<(), UapiError> {
        let req = uapi::parse_set(lines.iter().copied())?;
        let _guard = self.ipc_lock.lock().await;
        let (old, _) = self.snapshot();
        let mut new = old.apply(&req)?;

        // Everything that can fail happens before anything is changed.
        let current = read(&self.state).bound.clone();
        let new_bound = match &current {
            Some(b) if b.port == new.listen_port => {
                if new.fwmark != old.fwmark {
                    if let Err(e) = b.set_mark(new.fwmark) {
                        let _ = b.set_mark(old.fwmark);
                        return Err(UapiError::Bind(e));
                    }
                }
                None
            }
            _ => Some(net::bind(new.listen_port, new.fwmark).map_err(UapiError::Bind)?),
        };
        if let Some(b) = &new_bound {
            new.listen_port = b.port;
        }
        self.commit(&old, new, new_bound);
        Ok(())
    }

    fn commit(self: &Arc<Self>, old: &DeviceConfig, new: DeviceConfig, new_bound: Option<Bound>) {
        let mut st = write(&self.state);
        let st = &mut *st;

        if new.private_key != old.private_key {
            st.key = new.private_key.as_ref().map(DeviceKey::new);
            for peer in st.peers.values() {
                let mut inner = lock(&peer.inner);
                let inner = &mut *inner;
                match (&st.key, inner.tunn.as_mut()) {
                    (Some(k), Some(t)) => {
                        t.set_static_private(
                            k.secret.clone(),
                            k.public,
                            Some(Arc::clone(&k.tunn_limiter)),
                        );
                    }
                    (Some(k), None) => {
                        inner.tunn =
                            Some(k.new_tunn(&peer.public_key, &inner.preshared_key, peer.index));
                    }
                    (None, _) => inner.tunn = None,
                }
            }
            tracing::info!(ifname = %self.ifname, has_key = st.key.is_some(), "private key changed");
        }

        for (key, peer) in &st.peers {
            if new.peer(key).is_none_or(|p| p.id != peer.id) {
                tracing::info!(ifname = %self.ifname, peer = %peer.short_key(), "peer removed");
            }
        }
        let mut peers = HashMap::with_capacity(new.peers.len());
        let mut by_index = HashMap::with_capacity(new.peers.len());
        for pc in &new.peers {
            let existing = st
                .peers
                .get(&pc.public_key)
                .filter(|p| p.id == pc.id)
                .cloned();
            let peer = match existing {
                Some(peer) => {
                    if let Some(before) = old.peer(&pc.public_key) {
                        update_peer(&self.ifname, &peer, before, pc, st.key.as_ref());
                    }
                    peer
                }
                None => {
                    let index = loop {
                        let i = random_index();
                        if !by_index.contains_key(&i) && !st.by_index.contains_key(&i) {
                            break i;
                        }
                    };
                    let peer = Arc::new(Peer::new(pc, index, st.key.as_ref()));
                    tracing::info!(
                        ifname = %self.ifname,
                        peer = %peer.short_key(),
                        endpoint = ?pc.endpoint,
                        allowed_ips = ?pc.allowed_ips,
                        keepalive = pc.persistent_keepalive,
                        "peer added"
                    );
                    peer
                }
            };
            by_index.insert(peer.index, Arc::clone(&peer));
            peers.insert(pc.public_key, peer);
        }
        let mut routes = AllowedIps::new();
        for pc in &new.peers {
            if let Some(peer) = peers.get(&pc.public_key) {
                for net in &pc.allowed_ips {
                    routes.insert(*net, Arc::clone(peer));
                }
            }
        }
        st.peers = peers;
        st.by_index = by_index;
        st.routes = routes;
        if let Some(k) = st.key.as_mut() {
            k.fit(st.peers.len());
        }

        if let Some(bound) = new_bound {
            let mut tasks = lock(&self.udp_tasks);
            for t in tasks.drain(..) {
                t.abort();
            }
            tasks.push(tokio::spawn(dataplane::udp_loop(
                Arc::clone(self),
                Arc::clone(&bound.v4),
            )));
            if let Some(v6) = &bound.v6 {
                tasks.push(tokio::spawn(dataplane::udp_loop(
                    Arc::clone(self),
                    Arc::clone(v6),
                )));
            }
            tracing::info!(
                ifname = %self.ifname,
                port = bound.port,
                ipv6 = bound.v6.is_some(),
                "listening"
            );
            st.bound = Some(bound);
        }
        st.config = new;
    }

    fn take_udp_tasks(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *lock(&self.udp_tasks))
    }
}

/// Updates an existing peer in place: its session survives, except when the
/// preshared key changes (boringtun cannot change it in a live `Tunn`).
fn update_peer(
    ifname: &str,
    peer: &Peer,
    before: &super::config::PeerConfig,
    after: &super::config::PeerConfig,
    key: Option<&DeviceKey>,
) {
    if before == after {
        return;
    }
    let mut inner = lock(&peer.inner);
    if before.endpoint != after.endpoint {
        inner.endpoint = after.endpoint;
    }
    if before.persistent_keepalive != after.persistent_keepalive {
        if before.persistent_keepalive == 0 {
            // As wireguard-go and the kernel: send a keepalive when turned
            // on (at the next timer run).
            inner.keepalive_now = true;
        }
        inner.persistent_keepalive = after.persistent_keepalive;
    }
    if before.preshared_key != after.preshared_key {
        inner.preshared_key = after.preshared_key;
        if let Some(k) = key {
            inner.tunn = Some(k.new_tunn(&peer.public_key, &after.preshared_key, peer.index));
        }
    }
    tracing::debug!(
        ifname = %ifname,
        peer = %peer.short_key(),
        endpoint = ?after.endpoint,
        allowed_ips = ?after.allowed_ips,
        keepalive = after.persistent_keepalive,
        psk_changed = before.preshared_key != after.preshared_key,
        "peer updated"
    );
}

/// A userspace WireGuard interface: a TUN device, its UDP sockets and its
/// UAPI socket at `/var/run/wireguard/<ifname>.sock`.
/// Sends datagrams from the device's UDP socket; see [`UserspaceDevice::raw_sender`].
#[derive(Clone)]
pub struct RawSender {
    shared: Arc<Shared>,
}

impl RawSender {
    pub async fn send(&self, to: SocketAddr, bytes: &[u8]) -> Result<(), UserspaceError> {
        let sock = read(&self.shared.state)
            .bound
            .as_ref()
            .and_then(|b| b.for_addr(&to).cloned())
            .ok_or(UserspaceError::NotBound)?;
        sock.send_to(bytes, to)
            .await
            .map_err(UserspaceError::io("sending a raw datagram"))?;
        Ok(())
    }

    /// Sends a fresh handshake initiation to the peer with `public_key` at
    /// `endpoint` now, and makes that the peer's endpoint (as a UAPI set
    /// would). WireGuard on its own retries a lost initiation only after
    /// 5 s (`REKEY_TIMEOUT`); NAT traversal calls this when a connectivity
    /// check found the candidate that answers, and when a relay granted an
    /// allocation (its port is the peer's new endpoint). Returns false when the peer
    /// is unknown or the device has no key or socket yet.
    pub async fn initiate_handshake(&self, public_key: &Key, endpoint: SocketAddr) -> bool {
        let mut out = vec![0u8; 256];
        let (sock, packet) = {
            let st = read(&self.shared.state);
            let Some(peer) = st.peers.get(public_key) else {
                return false;
            };
            let Some(sock) = st
                .bound
                .as_ref()
                .and_then(|b| b.for_addr(&endpoint))
                .cloned()
            else {
                return false;
            };
            let mut inner = lock(&peer.inner);
            inner.endpoint = Some(endpoint);
            let Some(tunn) = inner.tunn.as_mut() else {
                return false;
            };
            let packet = match tunn.format_handshake_initiation(&mut out, true) {
                boringtun::noise::TunnResult::WriteToNetwork(b) => b.to_vec(),
                _ => return false,
            };
            inner.stats.tx_bytes += packet.len() as u64;
            inner.tx_at = Some(std::time::Instant::now());
            (sock, packet)
        };
        tracing::debug!(ifname = %self.shared.ifname, peer = %super::peer::short_key(public_key), %endpoint, "handshake initiation sent at once (a connectivity check answered, or a relay allocation was granted)");
        sock.send_to(&packet, endpoint).await.is_ok()
    }
}

pub struct UserspaceDevice {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    socket: Option<ipc::SocketFile>,
}

impl UserspaceDevice {
    /// Creates the TUN interface `ifname` (MTU 1420, no address, not up)
    /// and serves UAPI on its socket. Fails with `SocketInUse` if another
    /// live device answers on that socket; a stale socket file is replaced.
    pub async fn start(ifname: &str) -> Result<UserspaceDevice, UserspaceError> {
        Self::start_in(ifname, Path::new(SOCKET_DIR)).await
    }

    /// Like `start`, with the UAPI socket in `socket_dir` instead.
    pub async fn start_in(
        ifname: &str,
        socket_dir: &Path,
    ) -> Result<UserspaceDevice, UserspaceError> {
        validate_ifname(ifname)?;
        let path = socket_dir.join(format!("{ifname}.sock"));
        ipc::claim_path(socket_dir, &path)?;

        let mut tun_cfg = tun::Configuration::default();
        tun_cfg.tun_name(ifname).mtu(MTU).layer(tun::Layer::L3);
        let tun = tun::create_as_async(&tun_cfg).map_err(|source| UserspaceError::Tun {
            name: ifname.to_owned(),
            source,
        })?;
        let (listener, socket) = ipc::listen(&path)?;

        let shared = Arc::new(Shared {
            ifname: ifname.to_owned(),
            tun,
            state: RwLock::new(State {
                config: DeviceConfig::default(),
                key: None,
                peers: HashMap::new(),
                by_index: HashMap::new(),
                routes: AllowedIps::new(),
                bound: None,
            }),
            ipc_lock: tokio::sync::Mutex::new(()),
            raw_tx: Mutex::new(None),
            udp_tasks: Mutex::new(Vec::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(dataplane::tun_loop(Arc::clone(&shared))),
            tokio::spawn(dataplane::timer_loop(Arc::clone(&shared))),
            tokio::spawn(ipc::serve(listener, Arc::clone(&shared), stop_rx)),
        ];
        tracing::info!(ifname, socket = %path.display(), "userspace WireGuard device started");
        Ok(UserspaceDevice {
            shared,
            tasks,
            stop,
            socket: Some(socket),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.ifname
    }

    /// Path of the UAPI socket.
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_ref().map(|s| s.path.as_path())
    }

    /// The bound UDP port, once bound.
    pub fn listen_port(&self) -> Option<u16> {
        read(&self.shared.state).bound.as_ref().map(|b| b.port)
    }

    /// The peers and their counters, read in process: the same data as a
    /// UAPI `get=1`, without rendering and parsing text (the daemon reads
    /// its device every tick; at hundreds of peers the text cost adds up).
    pub fn peer_snapshot(&self) -> Vec<(PeerConfig, PeerStats)> {
        let (cfg, stats) = self.shared.snapshot();
        cfg.peers
            .into_iter()
            .map(|p| {
                let s = stats.get(&p.id).copied().unwrap_or_default();
                (p, s)
            })
            .collect()
    }

    /// In-process UAPI `get=1`: the answer body, without the `errno=` line.
    pub async fn uapi_get(&self) -> String {
        self.shared.uapi_get().await
    }

    /// In-process UAPI `set=1`: `request` holds the `key=value` lines.
    pub async fn uapi_set(&self, request: &str) -> Result<(), UapiError> {
        let lines: Vec<&str> = request.lines().filter(|l| !l.is_empty()).collect();
        self.shared.uapi_set(&lines).await
    }

    /// Sends one datagram from the device's UDP socket (IPv4 or IPv6 one,
    /// following `to`), e.g. for NAT traversal probes.
    pub async fn send_raw(&self, to: SocketAddr, bytes: &[u8]) -> Result<(), UserspaceError> {
        self.raw_sender().send(to, bytes).await
    }

    /// A cloneable handle that sends raw datagrams from the device's socket
    /// (used by the STUN responder task).
    pub fn raw_sender(&self) -> RawSender {
        RawSender {
            shared: self.shared.clone(),
        }
    }

    /// Datagrams arriving on the UDP socket whose first 4 bytes are not a
    /// WireGuard message header are delivered here (replacing any previous
    /// subscriber); they are dropped when the channel is full or closed.
    pub fn subscribe_raw(&self, capacity: usize) -> mpsc::Receiver<RawDatagram> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        *lock(&self.shared.raw_tx) = Some(tx);
        rx
    }

    /// Stops all tasks, removes the UAPI socket and deletes the TUN
    /// interface (it is not persistent: closing its fd deletes it).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let mut tasks = std::mem::take(&mut self.tasks);
        // The UAPI server (last task) stops on the signal after closing its
        // connections; the data-plane tasks are simply aborted.
        let ipc_task = tasks.pop();
        tasks.extend(self.shared.take_udp_tasks());
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        if let Some(mut t) = ipc_task {
            if tokio::time::timeout(Duration::from_secs(2), &mut t)
                .await
                .is_err()
            {
                t.abort();
                let _ = t.await;
            }
        }
        if let Some(s) = self.socket.take() {
            s.remove();
        }
        let refs = Arc::strong_count(&self.shared);
        if refs != 1 {
            tracing::warn!(refs, "device state still referenced after shutdown");
        }
        tracing::info!(ifname = %self.shared.ifname, "userspace WireGuard device stopped");
    }
}

impl Drop for UserspaceDevice {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        for t in self.shared.take_udp_tasks() {
            t.abort();
        }
        if let Some(s) = self.socket.take() {
            s.remove();
        }
    }
}

fn validate_ifname(name: &str) -> Result<(), UserspaceError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(UserspaceError::InvalidName(name.to_owned()))
    }
}
