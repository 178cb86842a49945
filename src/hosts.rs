//! Members' names in a hosts(5) file: a block of `IP NAME` lines that
//! meshpeer manages between two marker lines, so that members reach each
//! other by name (`ssh node02`, an MPI hostfile of names) with nothing to
//! configure in the resolver: glibc, musl and systemd-resolved all read
//! /etc/hosts.
//!
//! ```text
//! # BEGIN meshpeer mp0
//! # members of the mesh on mp0, kept by meshpeer: edits here are replaced
//! 10.77.0.1<TAB>node01
//! 10.77.0.2<TAB>node02
//! # END meshpeer mp0
//! ```
//!
//! * [`rewrite`] is the pure part: file text and entries in, file text out.
//!   Lines outside the block are kept byte for byte (CRLF files stay CRLF,
//!   a file without a final newline keeps its last line as it was); every
//!   block of this interface is replaced by one, where the first one was
//!   (else at the end); a marker without its partner is dropped alone.
//! * A name that a line outside the block already has (`localhost`, a
//!   host the admin wrote by hand) is left out: the file's own lines win,
//!   and a member cannot take over a name the machine already resolves.
//! * [`update`] applies it to a file: under a lock on the file's directory
//!   (several meshpeer daemons on one machine), only when the text
//!   changes, atomically (a temporary file in the same directory, renamed
//!   over the file, with the file's mode and owner), and, where the file
//!   is a mount point of its own (containers bind-mount /etc/hosts, which
//!   cannot be replaced by a rename: EBUSY or EXDEV), rewritten in place.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One `IP NAME` line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub ip: Ipv4Addr,
    pub name: String,
}

/// The first line of the block of interface `iface`.
pub fn begin_marker(iface: &str) -> String {
    format!("# BEGIN meshpeer {iface}")
}

/// The last line of the block of interface `iface`.
pub fn end_marker(iface: &str) -> String {
    format!("# END meshpeer {iface}")
}

/// What [`rewrite`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub text: String,
    /// Names left out because a line outside the block has them.
    pub shadowed: Vec<String>,
}

/// The names on a hosts(5) line (after the address; comments cut).
fn names_on(line: &str) -> impl Iterator<Item = String> + '_ {
    let line = line.split('#').next().unwrap_or("");
    line.split_whitespace()
        .skip(1)
        .map(|n| n.to_ascii_lowercase())
}

/// The file `text` with the block of `iface` holding `entries` (sorted as
/// given by [`crate::export::natural_cmp`] on the name), or with no block
/// when `entries` is `None`.
pub fn rewrite(text: &str, iface: &str, entries: Option<&[Entry]>) -> Rewrite {
    let begin = begin_marker(iface);
    let end = end_marker(iface);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let bare = |l: &str| l.trim_end_matches(['\n', '\r']).trim().to_string();
    // Which lines are ours: each BEGIN up to its END; a lone marker alone.
    let mut ours = vec![false; lines.len()];
    let mut first_block: Option<usize> = None;
    let mut i = 0;
    while i < lines.len() {
        let l = bare(lines[i]);
        if l == begin {
            let close = (i + 1..lines.len()).find(|&j| {
                let b = bare(lines[j]);
                b == end || b == begin
            });
            match close {
                Some(j) if bare(lines[j]) == end => {
                    first_block.get_or_insert(i);
                    ours[i..=j].iter_mut().for_each(|o| *o = true);
                    i = j + 1;
                    continue;
                }
                _ => {
                    first_block.get_or_insert(i);
                    ours[i] = true;
                }
            }
        } else if l == end {
            ours[i] = true;
        }
        i += 1;
    }
    let crlf = text.contains("\r\n");
    let nl = if crlf { "\r\n" } else { "\n" };
    let foreign: BTreeSet<String> = lines
        .iter()
        .zip(&ours)
        .filter(|(_, o)| !**o)
        .flat_map(|(l, _)| names_on(l))
        .collect();
    let mut shadowed = Vec::new();
    let block = entries.map(|entries| {
        let mut list: Vec<&Entry> = entries.iter().collect();
        list.sort_by(|a, b| crate::export::natural_cmp(&a.name, &b.name).then(a.ip.cmp(&b.ip)));
        list.dedup();
        let mut b = format!("{begin}{nl}# members of the mesh on {iface}, kept by meshpeer: edits here are replaced{nl}");
        let mut written = BTreeSet::new();
        for e in list {
            if foreign.contains(&e.name.to_ascii_lowercase()) {
                shadowed.push(e.name.clone());
                continue;
            }
            if written.insert(e.name.clone()) {
                b.push_str(&format!("{}\t{}{nl}", e.ip, e.name));
            }
        }
        b.push_str(&format!("{end}{nl}"));
        b
    });
    let mut out = String::with_capacity(text.len() + block.as_ref().map_or(0, String::len));
    let mut placed = false;
    let put_block = |out: &mut String| {
        if let Some(b) = &block {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push_str(nl);
            }
            out.push_str(b);
        }
    };
    for (i, l) in lines.iter().enumerate() {
        if Some(i) == first_block {
            put_block(&mut out);
            placed = true;
        }
        if !ours[i] {
            out.push_str(l);
        }
    }
    if !placed {
        put_block(&mut out);
    }
    Rewrite {
        text: out,
        shadowed,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not UTF-8 text; left alone")]
    NotText(PathBuf),
}

/// What [`update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The file already said so.
    Unchanged,
    /// Written; the names left out because the file has them elsewhere.
    Written { shadowed: Vec<String> },
}

/// Puts the block of `iface` holding `entries` into the hosts file `path`
/// (or removes it: `None`); see the module documentation. A missing file
/// is created (0644) unless there is no block to write.
pub fn update(path: &Path, iface: &str, entries: Option<&[Entry]>) -> Result<Update, HostsError> {
    // /etc/hosts may be a symlink: write where it points.
    let path = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_path_buf(),
        Err(source) => {
            return Err(HostsError::Io {
                path: path.to_path_buf(),
                action: "resolve",
                source,
            })
        }
    };
    let io = |action: &'static str| {
        let path = path.clone();
        move |source| HostsError::Io {
            path,
            action,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir_file = fs::File::open(&dir).map_err(io("open its directory"))?;
    let _lock = DirLock::take(&dir_file).map_err(io("lock its directory"))?;
    let (text, meta) = match fs::read(&path) {
        Ok(bytes) => {
            let meta = fs::metadata(&path).map_err(io("stat"))?;
            let text = String::from_utf8(bytes).map_err(|_| HostsError::NotText(path.clone()))?;
            (text, Some(meta))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if entries.is_none() {
                return Ok(Update::Unchanged);
            }
            (String::new(), None)
        }
        Err(source) => return Err(io("read")(source)),
    };
    let new = rewrite(&text, iface, entries);
    if new.text == text && meta.is_some() {
        return Ok(Update::Unchanged);
    }
    let mode = meta
        .as_ref()
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.meshpeer-{}.tmp", std::process::id()));
    let written = (|| -> Result<(), HostsError> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create a temporary file beside it"))?;
        if let Some(m) = &meta {
            // Keep the owner (root's, usually); only root can give it away,
            // and the file's mode is what matters to readers.
            let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
        }
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io("set the mode"))?;
        f.write_all(new.text.as_bytes()).map_err(io("write"))?;
        f.sync_all().map_err(io("sync"))?;
        match fs::rename(&tmp, &path) {
            Ok(()) => Ok(()),
            // A bind mount (the usual /etc/hosts of a container) cannot be
            // replaced by a rename: rewrite the file in place instead. Not
            // atomic: a reader may see it half-written for a moment.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EXDEV)) => {
                let _ = fs::remove_file(&tmp);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(io("open to rewrite in place"))?;
                f.write_all(new.text.as_bytes())
                    .map_err(io("rewrite in place"))?;
                f.sync_all().map_err(io("sync"))
            }
            Err(e) => Err(io("replace")(e)),
        }
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    let _ = dir_file.sync_all();
    Ok(Update::Written {
        shadowed: new.shadowed,
    })
}

/// An exclusive flock on a directory, released on drop: meshpeer daemons
/// of several interfaces on one machine take turns with the file.
struct DirLock<'a>(&'a fs::File);

impl<'a> DirLock<'a> {
    fn take(dir: &'a fs::File) -> std::io::Result<Self> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor we own for the lock's lifetime.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirLock(dir))
    }
}

impl Drop for DirLock<'_> {
    fn drop(&mut self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests;
