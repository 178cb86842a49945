//! The UAPI unix socket: claiming its path, listening, and serving
//! `get=1` / `set=1` operations as wireguard-go's `IpcHandle` does.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::device::Shared;
use super::error::{UapiError, UserspaceError};

/// Longest accepted line (Go's bufio.Scanner default).
const MAX_LINE: usize = 64 * 1024;
/// Largest accepted `set` request.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// The socket file we created; removed only if it is still ours.
pub(crate) struct SocketFile {
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn remove(self) {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove UAPI socket");
                }
            }
            _ => {
                tracing::debug!(path = %self.path.display(), "UAPI socket already gone or replaced")
            }
        }
    }
}

/// Creates `dir` (0700) if missing; fails with `SocketInUse` if `path`
/// answers a connection, removes it if it is stale.
pub(crate) fn claim_path(dir: &Path, path: &Path) -> Result<(), UserspaceError> {
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(UserspaceError::io("creating the UAPI socket directory"))?;
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(UserspaceError::io("checking the UAPI socket")(e)),
        Ok(_) => {}
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(UserspaceError::SocketInUse {
            path: path.to_owned(),
        }),
        // A full backlog means someone is listening.
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(UserspaceError::SocketInUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale UAPI socket");
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(UserspaceError::io("removing a stale UAPI socket")(e))
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(UserspaceError::io("probing the UAPI socket")(e)),
    }
}

/// Listens on `path` with mode 0700 (what wireguard-go's umask 077 gives).
pub(crate) fn listen(path: &Path) -> Result<(UnixListener, SocketFile), UserspaceError> {
    let listener = UnixListener::bind(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            UserspaceError::SocketInUse {
                path: path.to_owned(),
            }
        } else {
            UserspaceError::io("binding the UAPI socket")(e)
        }
    })?;
    let file = fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .and_then(|()| fs::symlink_metadata(path))
        .map(|m| SocketFile {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
        });
    match file {
        Ok(f) => Ok((listener, f)),
        Err(e) => {
            let _ = fs::remove_file(path);
            Err(UserspaceError::io("setting up the UAPI socket")(e))
        }
    }
}

/// Accepts UAPI connections until `stop` fires, then closes them all.
pub(crate) async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            res = listener.accept() => match res {
                Ok((stream, _)) => {
                    conns.spawn(handle_conn(stream, Arc::clone(&shared)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "UAPI accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// One line without its `\n`; `None` at end of input.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, UapiError> {
    let mut buf = Vec::new();
    let n = r
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(UapiError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE {
        return Err(UapiError::Protocol("line too long".into()));
    }
    Ok(Some(buf))
}

/// Reads the body of a `set` request up to its blank line (or end of
/// input), then applies it.
async fn handle_set<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    shared: &Arc<Shared>,
) -> Result<(), UapiError> {
    let mut lines = Vec::new();
    let mut total = 0usize;
    let mut utf8_ok = true;
    while let Some(line) = read_line(r).await? {
        if line.is_empty() {
            break;
        }
        total += line.len() + 1;
        if total > MAX_REQUEST {
            return Err(UapiError::Protocol("request too large".into()));
        }
        match String::from_utf8(line) {
            Ok(s) => lines.push(s),
            Err(_) => utf8_ok = false,
        }
    }
    if !utf8_ok {
        return Err(UapiError::invalid("request is not UTF-8"));
    }
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    shared.uapi_set(&refs).await
}

async fn handle_conn(stream: UnixStream, shared: Arc<Shared>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let op = match read_line(&mut r).await {
            Ok(Some(op)) => op,
            Ok(None) => return,
            Err(e) => {
                let _ = w
                    .write_all(format!("errno={}\n\n", e.errno()).as_bytes())
                    .await;
                return;
            }
        };
        let (body, result, fatal) = match op.as_slice() {
            b"set=1" => {
                let res = handle_set(&mut r, &shared).await;
                let fatal = matches!(res, Err(UapiError::Protocol(_) | UapiError::Io(_)));
                (String::new(), res, fatal)
            }
            b"get=1" => match read_line(&mut r).await {
                Ok(Some(l)) if l.is_empty() => (shared.uapi_get().await, Ok(()), false),
                Ok(_) => (
                    String::new(),
                    Err(UapiError::invalid("trailing characters in UAPI get")),
                    false,
                ),
                Err(e) => (String::new(), Err(e), true),
            },
            _ => {
                tracing::debug!(op = %String::from_utf8_lossy(&op), "invalid UAPI operation");
                return;
            }
        };
        let errno = match &result {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!(ifname = %shared.ifname, error = %e, "UAPI request failed");
                e.errno()
            }
        };
        let reply = format!("{body}errno={errno}\n\n");
        if w.write_all(reply.as_bytes()).await.is_err() || w.flush().await.is_err() || fatal {
            return;
        }
    }
}
