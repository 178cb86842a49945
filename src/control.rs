//! The local control socket (`<state-dir>/control.sock`, mode 0600): how
//! `meshpeer status` and `meshpeer leave` talk to the running daemon.
//! One JSON request line, one JSON reply line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "lowercase")]
pub enum Reply {
    Status(Box<Status>),
    Left,
    Revoked,
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
pub type Incoming = (Request, Pending);

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
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(Request::Status) => match status.borrow().clone() {
                    Some(s) => Reply::Status(Box::new(s)),
                    None => Reply::Error {
                        message: "starting up (joining the mesh or creating the interface)".into(),
                    },
                },
                Ok(req) => {
                    let (rtx, rrx) = oneshot::channel();
                    if tx.send((req, Pending(rtx))).await.is_err() {
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
