//! The `pagewire` binary end to end: certificates, two agent processes, pull, status,
//! errors, clean shutdown on SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_pagewire");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "pagewire {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs a command that must fail; its stderr.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "pagewire {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Kills the agents if the test panics.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sigterm(c: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "agent ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_peer(sock: &Path, peer: &str) {
    let t0 = Instant::now();
    loop {
        let o = run(&["status", "--json", "--control", sock.to_str().unwrap()]);
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let up = v["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == peer && p["connected"] == true);
            if up {
                return;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{peer} never connected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn certs_agents_pull_status_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    let cs = certs.to_str().unwrap();
    ok(&["certs", "init", "--dir", cs]);
    ok(&["certs", "issue", "a", "--dir", cs, "--san", "127.0.0.1"]);
    ok(&["certs", "issue", "b", "--dir", cs]);
    // Refuses to overwrite keys.
    assert!(!run(&["certs", "issue", "b", "--dir", cs]).status.success());

    let region = d.join("region.bin");
    random_file(&region, (3 << 20) + 123, 5);
    let (pa, pb) = (free_port(), free_port());
    let (sa, sb) = (d.join("a.sock"), d.join("b.sock"));
    // Agent b from flags; agent a from a config file.
    let b = Command::new(BIN)
        .args([
            "agent",
            "--name",
            "b",
            "--listen",
            &format!("127.0.0.1:{pb}"),
        ])
        .args(["--certs", cs, "--peer", &format!("a=127.0.0.1:{pa}")])
        .args(["--control", sb.to_str().unwrap()])
        .args(["--region", &format!("demo={}", region.display())])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let conf = d.join("a.toml");
    std::fs::write(
        &conf,
        format!(
            "name = \"a\"\nlisten = \"127.0.0.1:{pa}\"\ncerts = \"{cs}\"\ncontrol = \"{}\"\n[peers]\nb = \"127.0.0.1:{pb}\"\n",
            sa.display()
        ),
    )
    .unwrap();
    let a = Command::new(BIN)
        .args(["agent", "--config", conf.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut procs = Procs(vec![a, b]);
    wait_for_peer(&sa, "b");

    let out = d.join("out.bin");
    let json = ok(&[
        "pull",
        "--from",
        "b",
        "--region",
        "demo",
        "--to",
        out.to_str().unwrap(),
        "--json",
        "--control",
        sa.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["size"], (3 << 20) + 123);
    assert_eq!(v["region"], "demo");
    assert_eq!(v["peer"], "b");
    assert_same(&region, &out);

    // A relative --to is resolved against the caller's directory, not the agent's.
    let rel = Command::new(BIN)
        .current_dir(d)
        .args([
            "pull", "--from", "b", "--region", "demo", "--to", "rel.bin", "--json",
        ])
        .args(["--control", sa.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        rel.status.success(),
        "{}",
        String::from_utf8_lossy(&rel.stderr)
    );
    assert_same(&region, &d.join("rel.bin"));

    let human = ok(&["status", "--control", sa.to_str().unwrap()]);
    assert!(human.contains("connected"), "{human}");
    assert!(human.contains("done"), "{human}");
    let sj: serde_json::Value = serde_json::from_str(&ok(&[
        "status",
        "--json",
        "--control",
        sb.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(sj["regions"][0]["name"], "demo");

    // Errors are reported, with a non-zero exit.
    let bad = run(&[
        "pull",
        "--from",
        "b",
        "--region",
        "nope",
        "--to",
        d.join("x").to_str().unwrap(),
        "--control",
        sa.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown region"), "{err}");
    let bad = run(&["status", "--control", d.join("none.sock").to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot reach the agent"));

    // A second agent on the same control socket is refused.
    let dup = Command::new(BIN)
        .args([
            "agent",
            "--name",
            "a",
            "--listen",
            "127.0.0.1:0",
            "--certs",
            cs,
        ])
        .args(["--control", sa.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("another agent"));

    for c in &mut procs.0 {
        assert!(sigterm(c).success());
    }
    assert!(!sa.exists() && !sb.exists(), "control sockets left behind");
}

#[test]
fn help_explains_every_command() {
    let top = ok(&["--help"]);
    for cmd in ["certs", "agent", "pull", "status"] {
        assert!(top.contains(cmd), "{top}");
        ok(&[cmd, "--help"]);
    }
    let agent = ok(&["agent", "--help"]);
    for flag in [
        "--peer",
        "--region",
        "--control",
        "--certs",
        "--config",
        "--listen",
    ] {
        assert!(agent.contains(flag), "{agent}");
    }
    let _ = PathBuf::new();
}

/// Errors are one line that names the problem once and says what to do.
#[test]
fn errors_name_their_cause_once_and_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let o = run(&["status", "--control", sock.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(err.contains("is `pagewire agent` running"), "{err}");
    let o = run(&["certs", "issue", "x", "--dir", dir.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("run `pagewire certs init"), "{err}");
}

/// Arguments that would make a command look hung are refused before anything starts.
#[test]
fn a_migration_cap_too_low_to_progress_is_refused() {
    let migrate = |flag: &str, value: &str, sock: &str| {
        fails(&[
            "migrate",
            "--region",
            "r",
            "--to",
            "b",
            flag,
            value,
            "--control",
            sock,
        ])
    };
    let err = migrate("--max-bandwidth", "1", "none.sock");
    assert!(err.contains("below the least a migration accepts"), "{err}");
    // A duration without a unit (it used to mean seconds: a 50 s downtime budget).
    let err = migrate("--downtime-budget", "50", "none.sock");
    assert!(err.contains("needs a unit: 50ms, 50s"), "{err}");
    // The lowest accepted cap gets past the argument check (to the missing agent).
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let err = migrate("--max-bandwidth", "1mbit", sock.to_str().unwrap());
    assert!(err.contains("is `pagewire agent` running"), "{err}");
}

/// Every command's `--json` prints one JSON object on stdout even when it fails.
#[test]
fn a_failed_command_still_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let sock = sock.to_str().unwrap();
    let to = dir.path().join("out").to_str().unwrap().to_string();
    for args in [
        vec!["status"],
        vec!["pull", "--from", "b", "--region", "r", "--to", &to],
        vec!["mount", "--from", "b", "--region", "r", "--to", &to],
        vec!["replicate", "--region", "r", "--to", "b"],
        vec!["replicate", "--region", "r", "--stop"],
        vec!["flush", "--region", "r"],
        vec!["epoch", "--region", "r"],
        vec!["receive", "--from", "b", "--region", "r", "--to", &to],
    ] {
        let mut args = args.clone();
        args.extend(["--json", "--control", sock]);
        let o = run(&args);
        assert!(!o.status.success(), "{args:?}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(out.lines().count(), 1, "{args:?}: {out}");
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"));
        assert!(
            v["error"].as_str().unwrap().contains("pagewire agent"),
            "{args:?}: {v}"
        );
    }
}

/// `pagewire migrate --json` prints one JSON object on stdout even when it fails.
#[test]
fn a_failed_migration_still_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let o = run(&[
        "migrate",
        "--region",
        "r",
        "--to",
        "b",
        "--json",
        "--control",
        sock.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["outcome"], "failed", "{v}");
    assert_eq!(v["region"], "r", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("pagewire agent"),
        "{v}"
    );
}

/// `pagewire mount` waiting for a peer that is not connected ends on SIGTERM (it used to
/// go on until the agent gave up on the peer, 30 s later), and leaves no file. A command
/// whose agent stops while it waits says so.
#[test]
fn a_mount_waiting_for_its_peer_can_be_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    let cs = certs.to_str().unwrap();
    ok(&["certs", "init", "--dir", cs]);
    ok(&["certs", "issue", "a", "--dir", cs]);
    ok(&["certs", "issue", "b", "--dir", cs]);
    let sa = d.join("a.sock");
    let region = d.join("r.bin");
    random_file(&region, 1 << 20, 3);
    // b never runs.
    let a = Command::new(BIN)
        .args(["agent", "--name", "a"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--certs",
            cs,
            "--peer",
            &format!("b=127.0.0.1:{}", free_port()),
        ])
        .args(["--control", sa.to_str().unwrap()])
        .args(["--region", &format!("r={}", region.display())])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut procs = Procs(vec![a]);
    let t0 = Instant::now();
    while !run(&["status", "--control", sa.to_str().unwrap()])
        .status
        .success()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "agent a did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let to = d.join("out.bin");
    let mut mount = Command::new(BIN)
        .args(["mount", "--from", "b", "--region", "r"])
        .args(["--to", to.to_str().unwrap()])
        .args(["--control", sa.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let status = sigterm(&mut mount);
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(mount.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("interrupted before the region was attached"),
        "{err}"
    );
    assert!(!to.exists());
    // An epoch that will not come, and the agent stops meanwhile.
    let epoch = Command::new(BIN)
        .args(["epoch", "--region", "r", "--wait", "1", "--timeout", "60s"])
        .args(["--control", sa.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(sigterm(&mut procs.0[0]).success());
    let out = epoch.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the agent closed the control connection"),
        "{err}"
    );
}
