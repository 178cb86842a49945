//! The local control socket (`<state-dir>/control.sock`, mode 0600): how
//! `meshpeer status`, `leave`, `revoke`, `ping`, `netcheck` and the exports
//! talk to the running daemon. One JSON request line, one JSON reply line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::status::Status;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Leave,
    /// A new revocation list (signed by the network key, gossip text).
    Revoke {
        list: String,
    },
    /// Probe one member over the overlay (a liveness probe) and report the
    /// round trip and the path (`meshpeer ping`). `member`: a name, node id
    /// or overlay address.
    Ping {
        member: String,
        /// How long to wait for the answer (default [`DEFAULT_PING_TIMEOUT`]).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// This node's NAT as STUN measured it (`meshpeer netcheck`).
    Netcheck,
}

/// How long the daemon waits for a ping's answer unless told.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest wait a ping may ask for.
pub const MAX_PING_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to [`Request::Ping`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    pub name: String,
    pub node_id: String,
    pub overlay_ip: std::net::Ipv4Addr,
    /// The round trip, or null when no answer came in time.
    pub rtt_us: Option<u64>,
    /// As in `status`: the member's state, "direct" / "relayed" / "trying",
    /// the relay's name, the WireGuard endpoint in use, why not direct.
    pub state: crate::status::MemberState,
    pub path: Option<String>,
    pub relay: Option<String>,
    pub endpoint: Option<String>,
    pub why_not_direct: Option<String>,
}

/// The answer to [`Request::Netcheck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetcheckReport {
    /// public, endpoint-independent, symmetric or unknown.
    pub nat: String,
    /// Our server-reflexive WireGuard endpoints, most often seen first.
    pub mapped_endpoints: Vec<String>,
    /// The address other members are told to use, and our ports.
    pub advertise_addr: String,
    pub wg_port: u16,
    pub gossip_port: u16,
    /// Whether this member relays for others.
    pub relaying: bool,
    /// Outside STUN servers configured (`--stun-server`).
    pub stun_servers: Vec<String>,
    /// The STUN answers the NAT picture comes from (the last minute).
    pub answers: Vec<StunAnswer>,
}

/// One STUN server (a member's WireGuard port, or an outside server) that
/// answered, and what it saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StunAnswer {
    pub server: String,
    /// The member whose WireGuard port that is (null: an outside server).
    pub member: Option<String>,
    /// Our endpoint as that server saw it.
    pub mapped: String,
    pub age_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum Reply {
    Status(Box<Status>),
    Left,
    Revoked,
    Pong(Box<PingReply>),
    Netcheck(Box<NetcheckReport>),
    Error { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no meshpeer daemon is running for {0} (start it with `meshpeer up`)")]
    NotRunning(PathBuf),
    #[error("a meshpeer daemon already runs with this state directory ({0} answers)")]
    AlreadyRunning(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon sent a reply this version does not understand: {0}")]
    Protocol(String),
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
}

/// A request from a client, with the way to answer it.
pub type Incoming = (Command, Pending);

/// What the daemon's loop is asked to do: a [`Request`] other than
/// `status`, which [`serve`] answers itself from the last status.
#[derive(Debug, Clone)]
pub enum Command {
    Leave,
    Revoke {
        list: String,
    },
    Ping {
        member: String,
        timeout_ms: Option<u64>,
    },
    Netcheck,
}

impl Command {
    /// The command behind a request; `None` for `status`.
    pub fn of(req: Request) -> Option<Self> {
        match req {
            Request::Status => None,
            Request::Leave => Some(Self::Leave),
            Request::Revoke { list } => Some(Self::Revoke { list }),
            Request::Ping { member, timeout_ms } => Some(Self::Ping { member, timeout_ms }),
            Request::Netcheck => Some(Self::Netcheck),
        }
    }
}

/// The answer slot of a request: [`Pending::answer`] waits (up to 2 s) until
/// the reply is written to the client, so a daemon that answers `leave` and
/// then exits cannot lose the reply.
pub struct Pending(oneshot::Sender<(Reply, oneshot::Sender<()>)>);

impl Pending {
    pub async fn answer(self, reply: Reply) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.0.send((reply, done_tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
        }
    }
}

/// Binds the control socket, refusing if another daemon answers on it.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if UnixStream::connect(path).await.is_ok() {
        return Err(ControlError::AlreadyRunning(path.to_path_buf()));
    }
    let _ = std::fs::remove_file(path);
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves clients until the daemon drops the receiver. `status` is answered
/// from the latest published snapshot, so it never waits on the daemon's
/// loop (and answers "starting" while a join is still under way); `leave`
/// goes to the daemon through `tx`.
/// Longest request line the daemon reads (a `revoke` carries a revocation
/// list of at most 48 KiB, about 64 KiB of base64). Without a bound a
/// client could make the daemon buffer any amount (found while fuzzing the
/// control requests, FUZZING.md).
pub const MAX_REQUEST_LINE: u64 = 1 << 20;

pub async fn serve(
    listener: UnixListener,
    tx: mpsc::Sender<Incoming>,
    status: tokio::sync::watch::Receiver<Option<Status>>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let tx = tx.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(r.take(MAX_REQUEST_LINE))
                .read_line(&mut line)
                .await
                .is_err()
            {
                return;
            }
            if line.len() as u64 >= MAX_REQUEST_LINE && !line.ends_with('\n') {
                let message = format!("request longer than {MAX_REQUEST_LINE} bytes");
                write_reply(&mut w, &Reply::Error { message }).await;
                return;
            }
            let reply = match serde_json::from_str::<Request>(&line).map(Command::of) {
                Ok(None) => match status.borrow().clone() {
                    Some(s) => Reply::Status(Box::new(s)),
                    None => Reply::Error {
                        message: "starting up (joining the mesh or creating the interface)".into(),
                    },
                },
                Ok(Some(cmd)) => {
                    let (rtx, rrx) = oneshot::channel();
                    if tx.send((cmd, Pending(rtx))).await.is_err() {
                        return;
                    }
                    match rrx.await {
                        Ok((r, done)) => {
                            write_reply(&mut w, &r).await;
                            let _ = done.send(());
                            return;
                        }
                        Err(_) => return,
                    }
                }
                Err(e) => Reply::Error {
                    message: format!("bad request: {e}"),
                },
            };
            write_reply(&mut w, &reply).await;
        });
    }
}

async fn write_reply(w: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) {
    let Ok(mut text) = serde_json::to_string(reply) else {
        return;
    };
    text.push('\n');
    let _ = w.write_all(text.as_bytes()).await;
    let _ = w.flush().await;
}

/// Sends one request to the daemon behind `path`.
pub async fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ControlError> {
    let fut = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|_| ControlError::NotRunning(path.to_path_buf()))?;
        let io = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (r, mut w) = stream.into_split();
        let mut text =
            serde_json::to_string(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
        text.push('\n');
        w.write_all(text.as_bytes()).await.map_err(io)?;
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await.map_err(io)?;
        serde_json::from_str(&line).map_err(|e| ControlError::Protocol(format!("{e}: {line:?}")))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ControlError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request line is read up to [`MAX_REQUEST_LINE`] bytes, not without
    /// end; shorter requests are answered as before.
    #[tokio::test]
    async fn request_lines_are_bounded() {
        let dir = std::env::temp_dir().join(format!("meshpeer-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = bind(&path).await.unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let (_status_tx, status) = tokio::sync::watch::channel(None);
        let server = tokio::spawn(serve(listener, tx, status));
        let ask = |body: Vec<u8>| {
            let path = path.clone();
            async move {
                let mut s = UnixStream::connect(&path).await.unwrap();
                // The server may answer and close before all is written.
                let _ = s.write_all(&body).await;
                let mut reply = String::new();
                let _ = BufReader::new(s).read_line(&mut reply).await;
                reply
            }
        };
        let long = vec![b'x'; MAX_REQUEST_LINE as usize + 4096];
        // Before the bound, the daemon went on reading (and buffering).
        let reply = tokio::time::timeout(Duration::from_secs(10), ask(long))
            .await
            .expect("the daemon answers a request that is too long");
        assert!(reply.contains("request longer than"), "{reply}");
        let reply = ask(b"{\"cmd\":\"status\"}\n".to_vec()).await;
        assert!(reply.contains("starting up"), "{reply}");
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
