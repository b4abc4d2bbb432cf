//! The replication demos run end to end (two agents on loopback each) and report what
//! they checked: `file_sync` (writers in other processes, the replica converges) and
//! `shared_buffer` (published memory, the reader checks every generation). Built by
//! `cargo test` next to this test binary.

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples")
        .join(name);
    assert!(p.exists(), "{} not built", p.display());
    p
}

/// Runs an example; its stdout and stderr together, after checking it succeeded.
fn run(name: &str, args: &[&str]) -> String {
    let o = Command::new(example(name)).args(args).output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{name} {args:?} failed:\n{out}");
    out
}

/// The sha256 printed after `label` on its own line.
fn sha(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(label).map(|h| h.trim().to_string()))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
}

#[test]
fn file_sync_converges_while_other_processes_write() {
    for tracker in ["inotify", "hash-scan"] {
        let out = run(
            "file_sync",
            &["--size", "2MiB", "--seconds", "2", "--tracker", tracker],
        );
        let owner = sha(&out, "owner   sha256");
        assert_eq!(owner.len(), 64, "{out}");
        assert_eq!(owner, sha(&out, "replica sha256"), "{out}");
        assert!(out.contains("the replica converged"), "{out}");
    }
}

#[test]
fn shared_buffer_reader_checks_every_generation() {
    for tracker in ["auto", "mprotect", "uffd-wp-sync"] {
        let out = run("shared_buffer", &["--rounds", "5", "--tracker", tracker]);
        assert!(
            out.contains("done: the reader saw the writer's generations with matching checksums"),
            "{out}"
        );
        assert!(out.contains("5 generations checked"), "{tracker}: {out}");
    }
}
