//! `meshpeer export`: the members as other tools read them: hosts(5)
//! lines, an Ansible INI inventory, an Open MPI hostfile, Slurm `NodeName`
//! lines, an ssh_config(5) fragment.
//!
//! Pure functions of a status snapshot (`crate::status::Status`, as the
//! daemon answers it on the control socket). The output is stable: members
//! in natural name order (`node2` before `node10`), groups in name order,
//! no timestamps, so regenerating a file changes it only when the mesh did.
//!
//! Which members: the live ones (every state but `down`), this node
//! included; a member whose name or address another member holds
//! (`conflict`) is left out. [`Filter::with_tags`] keeps the members that
//! carry every tag given.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write;

use crate::status::{MemberState, MemberStatus, Status};

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// hosts(5) lines: `IP NAME`.
    Hosts,
    /// An Ansible INI inventory: `[all]` with `ansible_host=`, one group per tag.
    Ansible,
    /// An Open MPI hostfile: `IP slots=N` (slots with --slots).
    MpiHostfile,
    /// Slurm `NodeName=` lines (slurm.conf), tags as `Features=`.
    Slurm,
    /// An ssh_config(5) fragment: `Host NAME` / `HostName IP`.
    SshConfig,
}

/// Which members to export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Keep members carrying every one of these tags (none: everyone).
    pub with_tags: Vec<String>,
}

impl Filter {
    pub fn matches(&self, m: &MemberStatus) -> bool {
        self.with_tags.iter().all(|t| m.tags.contains(t))
    }

    /// `status` with only the members the filter keeps (for `status
    /// --with-tag`).
    pub fn apply(&self, status: &Status) -> Status {
        let mut s = status.clone();
        s.members.retain(|m| self.matches(m));
        s
    }
}

/// Options of the formats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Slots per node (MPI hostfile `slots=`, Slurm `CPUs=`); unset: left
    /// out (Open MPI then counts cores, Slurm asks the node).
    pub slots: Option<u32>,
}

/// Compares names so that digit runs compare as numbers (`n2` < `n10`).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..da], &b[..db]);
                let ta = trim_zeros(na);
                let tb = trim_zeros(nb);
                let o = ta.len().cmp(&tb.len()).then(ta.cmp(tb)).then(da.cmp(&db));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|c| **c == b'0').count();
    &d[z..]
}

/// The members to export, in natural name order.
pub fn members<'a>(status: &'a Status, filter: &Filter) -> Vec<&'a MemberStatus> {
    let mut v: Vec<&MemberStatus> = status
        .members
        .iter()
        .filter(|m| m.state != MemberState::Down && m.conflict.is_none() && filter.matches(m))
        .collect();
    v.sort_by(|a, b| natural_cmp(&a.name, &b.name).then(a.overlay_ip.cmp(&b.overlay_ip)));
    v
}

/// An Ansible group name for a tag: letters, digits and `_`, not starting
/// with a digit, not `all` or `ungrouped` (Ansible's own).
pub fn ansible_group(tag: &str) -> String {
    let mut g: String = tag
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if g.starts_with(|c: char| c.is_ascii_digit()) || g == "all" || g == "ungrouped" {
        g.insert_str(0, "tag_");
    }
    g
}

/// Renders `status` in `format`.
pub fn render(format: Format, status: &Status, filter: &Filter, opts: &Options) -> String {
    let ms = members(status, filter);
    let mut out = String::new();
    let what = match format {
        Format::Hosts => "hosts",
        Format::Ansible => "ansible",
        Format::MpiHostfile => "mpi-hostfile",
        Format::Slurm => "slurm",
        Format::SshConfig => "ssh-config",
    };
    let mut header = format!(
        "# meshpeer export {what}: members of {} (overlay addresses)",
        status.network
    );
    if !filter.with_tags.is_empty() {
        header.push_str(&format!(" with tag {}", filter.with_tags.join(", ")));
    }
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{header}");
    match format {
        Format::Hosts => {
            for m in &ms {
                let _ = writeln!(out, "{}\t{}", m.overlay_ip, m.name);
            }
        }
        Format::Ansible => {
            let _ = writeln!(out, "[all]");
            for m in &ms {
                let _ = writeln!(out, "{} ansible_host={}", m.name, m.overlay_ip);
            }
            let mut groups: BTreeMap<String, Vec<&str>> = BTreeMap::new();
            for m in &ms {
                for t in &m.tags {
                    groups.entry(ansible_group(t)).or_default().push(&m.name);
                }
            }
            for (g, names) in &mut groups {
                names.dedup();
                let _ = writeln!(out, "\n[{g}]");
                for n in names.iter() {
                    let _ = writeln!(out, "{n}");
                }
            }
        }
        Format::MpiHostfile => {
            for m in &ms {
                match opts.slots {
                    Some(n) => {
                        let _ = writeln!(out, "{} slots={n}", m.overlay_ip);
                    }
                    None => {
                        let _ = writeln!(out, "{}", m.overlay_ip);
                    }
                }
            }
        }
        Format::Slurm => {
            for m in &ms {
                let _ = write!(out, "NodeName={} NodeAddr={}", m.name, m.overlay_ip);
                if let Some(n) = opts.slots {
                    let _ = write!(out, " CPUs={n}");
                }
                if !m.tags.is_empty() {
                    let _ = write!(out, " Features={}", m.tags.join(","));
                }
                out.push('\n');
            }
        }
        Format::SshConfig => {
            for (i, m) in ms.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                let _ = writeln!(out, "Host {}\n    HostName {}", m.name, m.overlay_ip);
            }
        }
    }
    out
}

/// Writes `bytes` to `path` atomically (a temporary file in the same
/// directory, fsync, rename, fsync of the directory): readers see the old
/// file or the new one, never half of one. An existing file keeps its mode;
/// a new one gets 0644.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let tmp = dir.join(format!(
        ".{}.meshpeer-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, ip: &str, state: MemberState, tags: &[&str]) -> MemberStatus {
        MemberStatus {
            name: name.into(),
            node_id: format!("id-{name}"),
            overlay_ip: ip.parse().unwrap(),
            public_key: "k".into(),
            endpoint: None,
            state,
            path: None,
            relay: None,
            why_not_direct: None,
            nat: "public".into(),
            last_handshake_secs: None,
            rtt_us: None,
            rx_bytes: 0,
            tx_bytes: 0,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ephemeral: false,
            conflict: None,
            routes: vec![],
        }
    }

    fn status() -> Status {
        let mut conflicted = m("x", "10.77.0.9", MemberState::Connected, &["gpu"]);
        conflicted.conflict = Some("address 10.77.0.2".into());
        Status {
            node: "node1".into(),
            node_id: "id".into(),
            network: "10.77.0.0/16".into(),
            interface: "mp0".into(),
            backend: crate::wg::BackendKind::Userspace,
            listen_port: 51820,
            gossip_addr: "192.0.2.1:51821".into(),
            gossip_bytes_sent: 0,
            gossip_bytes_received: 0,
            gossip_rounds: 0,
            gossip_rounds_in_sync: 0,
            gossip_connections: 0,
            loop_wakeups: 0,
            loop_steps: 0,
            loop_step_ms: 0,
            gossip_values_stored: 0,
            gossip_values_rejected: 0,
            nat: "public".into(),
            mapped_endpoints: vec![],
            relaying: false,
            relay_allocations: 0,
            relay_forwarded: 0,
            relay_dropped: 0,
            routes_installed: 0,
            myself: None,
            members: vec![
                m("node1", "10.77.0.1", MemberState::Myself, &["login"]),
                m(
                    "node10",
                    "10.77.0.3",
                    MemberState::Idle,
                    &["compute", "gpu"],
                ),
                m("node2", "10.77.0.2", MemberState::Connected, &["compute"]),
                m("dead", "10.77.0.4", MemberState::Down, &["compute"]),
                m(
                    "node3",
                    "10.77.0.5",
                    MemberState::Connecting,
                    &["2fast", "all"],
                ),
                conflicted,
            ],
        }
    }

    fn body(s: &str) -> Vec<&str> {
        s.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn hosts_lists_live_members_in_natural_order() {
        let t = render(
            Format::Hosts,
            &status(),
            &Filter::default(),
            &Options::default(),
        );
        assert_eq!(
            body(&t),
            [
                "10.77.0.1\tnode1",
                "10.77.0.2\tnode2",
                "10.77.0.5\tnode3",
                "10.77.0.3\tnode10"
            ]
        );
        assert!(t.starts_with("# meshpeer export hosts: members of 10.77.0.0/16"));
    }

    #[test]
    fn ansible_has_all_and_a_group_per_tag() {
        let t = render(
            Format::Ansible,
            &status(),
            &Filter::default(),
            &Options::default(),
        );
        let want = "[all]
node1 ansible_host=10.77.0.1
node2 ansible_host=10.77.0.2
node3 ansible_host=10.77.0.5
node10 ansible_host=10.77.0.3

[compute]
node2
node10

[gpu]
node10

[login]
node1

[tag_2fast]
node3

[tag_all]
node3
";
        assert_eq!(t.split_once('\n').unwrap().1, want);
    }

    #[test]
    fn mpi_slurm_ssh_and_the_tag_filter() {
        let f = Filter {
            with_tags: vec!["compute".into()],
        };
        let o = Options { slots: Some(8) };
        let s = status();
        assert_eq!(
            body(&render(Format::MpiHostfile, &s, &f, &o)),
            ["10.77.0.2 slots=8", "10.77.0.3 slots=8"]
        );
        assert_eq!(
            body(&render(Format::MpiHostfile, &s, &f, &Options::default())),
            ["10.77.0.2", "10.77.0.3"]
        );
        assert_eq!(
            body(&render(Format::Slurm, &s, &f, &o)),
            [
                "NodeName=node2 NodeAddr=10.77.0.2 CPUs=8 Features=compute",
                "NodeName=node10 NodeAddr=10.77.0.3 CPUs=8 Features=compute,gpu"
            ]
        );
        assert_eq!(
            body(&render(Format::SshConfig, &s, &f, &o)),
            [
                "Host node2",
                "    HostName 10.77.0.2",
                "",
                "Host node10",
                "    HostName 10.77.0.3"
            ]
        );
        // Every tag must match.
        let both = Filter {
            with_tags: vec!["compute".into(), "gpu".into()],
        };
        assert_eq!(
            body(&render(Format::Hosts, &s, &both, &o)),
            ["10.77.0.3\tnode10"]
        );
        assert!(render(Format::Hosts, &s, &both, &o).contains("with tag compute, gpu"));
        // status --with-tag keeps the same members (down ones too).
        let names: Vec<String> = f.apply(&s).members.into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["node10", "node2", "dead"]);
    }

    #[test]
    fn atomic_write_replaces_and_keeps_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mp-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("hosts");
        write_atomic(&f, b"one\n").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"one\n");
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o644
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&f, b"two\n").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two\n");
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        assert!(write_atomic(&dir.join("missing/x"), b"").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["n10", "n2", "n1", "a", "n02", "n1b", "n1a", "b1"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a", "b1", "n1", "n1a", "n1b", "n2", "n02", "n10"]);
        assert_eq!(ansible_group("gpu-a100.x"), "gpu_a100_x");
    }
}
