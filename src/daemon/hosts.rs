//! The members' names in the hosts file (`--hosts-file`, default
//! /etc/hosts; see [`crate::hosts`]): the block is written from each new
//! status snapshot when the live members' names or addresses changed (and
//! checked again every minute, in case something rewrote the file), and
//! removed when this node leaves the mesh. A node that stops and stays a
//! member keeps its block: the names resolve to addresses that come back
//! with it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::Node;
use crate::hosts::{self, Entry, Update};
use crate::status::{MemberState, Status};

/// How often the file is checked even when nothing changed.
const RECHECK: Duration = Duration::from_secs(60);

/// The hosts side of [`Node`].
pub(super) struct HostsState {
    path: PathBuf,
    /// What the block holds (as last written or found).
    last: Option<Vec<Entry>>,
    checked: Instant,
    /// Names already reported as shadowed by the file's own lines.
    shadowed: BTreeSet<String>,
    /// The last error reported (each reported once).
    error: Option<String>,
}

impl HostsState {
    pub fn new(path: Option<PathBuf>) -> Option<Self> {
        path.map(|path| HostsState {
            path,
            last: None,
            checked: Instant::now(),
            shadowed: BTreeSet::new(),
            error: None,
        })
    }
}

/// The block's entries: the live members (every state but down) whose name
/// and address are theirs here (no conflict), this node included.
pub(super) fn entries(status: &Status) -> Vec<Entry> {
    let mut v: Vec<Entry> = status
        .members
        .iter()
        .filter(|m| m.state != MemberState::Down && m.conflict.is_none())
        .map(|m| Entry {
            ip: m.overlay_ip,
            name: m.name.clone(),
        })
        .collect();
    v.sort();
    v
}

impl Node {
    /// Writes the block if the members changed (or a minute passed).
    pub(super) fn sync_hosts(&mut self, status: &Status) {
        let iface = self.cfg.interface.clone();
        let Some(h) = self.hosts.as_mut() else {
            return;
        };
        let want = entries(status);
        if h.last.as_ref() == Some(&want) && h.checked.elapsed() < RECHECK {
            return;
        }
        h.checked = Instant::now();
        match hosts::update(&h.path, &iface, Some(&want)) {
            Ok(u) => {
                if let Update::Written { shadowed } = &u {
                    tracing::info!(file = %h.path.display(), names = want.len(), "wrote the members' names");
                    for n in shadowed {
                        if h.shadowed.insert(n.clone()) {
                            tracing::warn!(file = %h.path.display(), name = %n,
                                "a member's name is already in the hosts file outside meshpeer's block; the file's line wins, the member is left out");
                        }
                    }
                }
                h.last = Some(want);
                h.error = None;
            }
            Err(e) => {
                let text = e.to_string();
                if h.error.as_deref() != Some(&text) {
                    tracing::warn!(error = %text, "cannot write the members' names (--hosts-file; `none` turns this off)");
                    h.error = Some(text);
                }
            }
        }
    }

    /// Removes the block (this node leaves the mesh).
    pub(super) fn remove_hosts_block(&mut self) {
        let iface = self.cfg.interface.clone();
        let Some(h) = self.hosts.as_mut() else {
            return;
        };
        match hosts::update(&h.path, &iface, None) {
            Ok(Update::Written { .. }) => {
                tracing::info!(file = %h.path.display(), "removed the members' names")
            }
            Ok(Update::Unchanged) => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove the members' names"),
        }
        h.last = None;
    }
}
