use super::*;

fn e(ip: &str, name: &str) -> Entry {
    Entry {
        ip: ip.parse().unwrap(),
        name: name.into(),
    }
}

const HEAD: &str = "# members of the mesh on mp0, kept by meshpeer: edits here are replaced";

fn block(lines: &[&str]) -> String {
    let mut s = format!("# BEGIN meshpeer mp0\n{HEAD}\n");
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("# END meshpeer mp0\n");
    s
}

#[test]
fn appends_a_sorted_block_and_keeps_every_other_line() {
    let text = "127.0.0.1\tlocalhost\n# a comment\n192.0.2.5 db01 db01.example\n";
    let entries = [
        e("10.77.0.10", "node10"),
        e("10.77.0.2", "node2"),
        e("10.77.0.1", "node1"),
    ];
    let r = rewrite(text, "mp0", Some(&entries));
    assert_eq!(
        r.text,
        format!(
            "{text}{}",
            block(&["10.77.0.1\tnode1", "10.77.0.2\tnode2", "10.77.0.10\tnode10"])
        )
    );
    assert!(r.shadowed.is_empty());
    // Idempotent: the same entries give the same text.
    assert_eq!(rewrite(&r.text, "mp0", Some(&entries)).text, r.text);
    // Removed: the file as it was.
    assert_eq!(rewrite(&r.text, "mp0", None).text, text);
}

#[test]
fn replaces_the_block_where_it_was_and_collapses_duplicates() {
    let text = format!(
        "127.0.0.1 localhost\n{}192.0.2.5 db01\n{}# tail\n",
        block(&["10.77.0.9\told"]),
        block(&["10.77.0.8\tolder"])
    );
    let r = rewrite(&text, "mp0", Some(&[e("10.77.0.1", "a")]));
    assert_eq!(
        r.text,
        format!(
            "127.0.0.1 localhost\n{}192.0.2.5 db01\n# tail\n",
            block(&["10.77.0.1\ta"])
        )
    );
    // Another interface's block is someone else's: untouched.
    let other = "# BEGIN meshpeer wg1\n10.1.0.1\tx\n# END meshpeer wg1\n";
    let r = rewrite(other, "mp0", Some(&[e("10.77.0.1", "a")]));
    assert_eq!(r.text, format!("{other}{}", block(&["10.77.0.1\ta"])));
    assert_eq!(rewrite(&r.text, "mp0", None).text, other);
}

#[test]
fn a_file_without_a_final_newline_and_crlf_files() {
    let r = rewrite("127.0.0.1 localhost", "mp0", Some(&[e("10.77.0.1", "a")]));
    assert_eq!(
        r.text,
        format!("127.0.0.1 localhost\n{}", block(&["10.77.0.1\ta"]))
    );
    let crlf = "127.0.0.1 localhost\r\n::1 localhost\r\n";
    let r = rewrite(crlf, "mp0", Some(&[e("10.77.0.1", "a")]));
    assert_eq!(
        r.text,
        format!("{crlf}{}", block(&["10.77.0.1\ta"]).replace('\n', "\r\n"))
    );
    assert_eq!(rewrite(&r.text, "mp0", None).text, crlf);
    // An empty file.
    let r = rewrite("", "mp0", Some(&[e("10.77.0.1", "a")]));
    assert_eq!(r.text, block(&["10.77.0.1\ta"]));
    assert_eq!(rewrite(&r.text, "mp0", None).text, "");
}

#[test]
fn lone_markers_go_alone_and_the_files_names_win() {
    // A BEGIN without END (hand-edited): only the marker goes, the lines
    // after it are not ours to remove.
    let text =
        "# BEGIN meshpeer mp0\n192.0.2.7 keepme\n# END meshpeer mp0 extra\n# END meshpeer mp0\n";
    let r = rewrite(text, "mp0", None);
    // BEGIN .. END is a block (the line with "extra" is inside it).
    assert_eq!(r.text, "");
    let text = "# BEGIN meshpeer mp0\n192.0.2.7 keepme\n";
    assert_eq!(rewrite(text, "mp0", None).text, "192.0.2.7 keepme\n");
    let text = "192.0.2.7 keepme\n# END meshpeer mp0\n";
    assert_eq!(rewrite(text, "mp0", None).text, "192.0.2.7 keepme\n");
    // BEGIN, BEGIN, END: the first BEGIN is alone, the second opens the block.
    let text = "# BEGIN meshpeer mp0\n192.0.2.7 keepme\n# BEGIN meshpeer mp0\n10.77.0.1 a\n# END meshpeer mp0\n";
    assert_eq!(rewrite(text, "mp0", None).text, "192.0.2.7 keepme\n");

    // Names the file already has (outside our block) are left out.
    let text = "127.0.0.1 localhost\n192.0.2.5 DB01 # the database\n";
    let entries = [
        e("10.77.0.1", "localhost"),
        e("10.77.0.2", "db01"),
        e("10.77.0.3", "web"),
        e("10.77.0.3", "web"),
    ];
    let r = rewrite(text, "mp0", Some(&entries));
    assert_eq!(
        r.shadowed,
        vec!["db01".to_string(), "localhost".to_string()]
    );
    assert_eq!(r.text, format!("{text}{}", block(&["10.77.0.3\tweb"])));
    // ... but names in our own old block are not "the file's".
    let again = rewrite(&r.text, "mp0", Some(&[e("10.77.0.4", "web")]));
    assert!(again.shadowed.is_empty());
    assert_eq!(again.text, format!("{text}{}", block(&["10.77.0.4\tweb"])));
}

#[test]
fn update_writes_atomically_keeps_the_mode_and_only_on_change() {
    let dir = std::env::temp_dir().join(format!("meshpeer-hosts-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let f = dir.join("hosts");
    fs::write(&f, "127.0.0.1 localhost\n").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    let entries = [e("10.77.0.1", "a"), e("10.77.0.2", "localhost")];
    assert_eq!(
        update(&f, "mp0", Some(&entries)).unwrap(),
        Update::Written {
            shadowed: vec!["localhost".into()]
        }
    );
    let text = fs::read_to_string(&f).unwrap();
    assert!(
        text.starts_with("127.0.0.1 localhost\n# BEGIN meshpeer mp0\n"),
        "{text}"
    );
    assert!(text.contains("10.77.0.1\ta\n"), "{text}");
    assert_eq!(
        fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let inode = fs::metadata(&f).unwrap().ino();
    assert_eq!(
        update(&f, "mp0", Some(&entries)).unwrap(),
        Update::Unchanged
    );
    assert_eq!(
        fs::metadata(&f).unwrap().ino(),
        inode,
        "unchanged: not rewritten"
    );
    // Through a symlink: the target is written, the link stays.
    let link = dir.join("hosts-link");
    std::os::unix::fs::symlink(&f, &link).unwrap();
    update(&link, "mp0", None).unwrap();
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_to_string(&f).unwrap(), "127.0.0.1 localhost\n");
    // No temporary files left; a missing file with nothing to write stays missing.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
    let missing = dir.join("none");
    assert_eq!(update(&missing, "mp0", None).unwrap(), Update::Unchanged);
    assert!(!missing.exists());
    update(&missing, "mp0", Some(&entries[..1])).unwrap();
    assert_eq!(
        fs::metadata(&missing).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // Not text: left alone, with an error.
    fs::write(&f, b"\xff\xfe").unwrap();
    assert!(matches!(
        update(&f, "mp0", Some(&entries)),
        Err(HostsError::NotText(_))
    ));
    assert!(update(&dir.join("no/such/dir/hosts"), "mp0", Some(&entries)).is_err());
    fs::remove_dir_all(&dir).unwrap();
}
