//! Agent configuration: a TOML file, and command-line flags that override it.
//!
//! ```toml
//! name = "a"
//! listen = "0.0.0.0:7401"
//! certs = "/etc/pagewire/certs"   # ca.pem, a.pem, a.key (or give ca/cert/key one by one)
//! control = "/run/pagewire.sock"
//! chunk_size = "64KiB"
//! bulk_window = "auto"          # or a fixed size, e.g. "1MiB"
//! idle_timeout = "10s"
//! fault_mechanism = "auto"      # lazy mounts: auto | userfaultfd | mprotect
//! fault_timeout = "60s"         # a fault waits this long for an unreachable peer
//! urgent_pause = "2ms"          # local links: a bulk copy waits this long at most for an urgent fetch ("0s": never)
//! congestion = "cubic"          # QUIC congestion controller: cubic | newreno | bbr
//! link_bandwidth = "1gbit"      # with link_rtt: size QUIC windows to 2 x bandwidth x RTT
//! link_rtt = "50ms"
//!
//! [peers]          # name = "host:port"; every peer must list us too
//! b = "10.0.0.2:7401"
//!
//! [regions]        # name = "path"
//! demo = "/dev/shm/demo"
//!
//! [replicate.demo]  # replicate region "demo" (this agent owns it) to peers
//! to = ["b"]
//! tracker = "inotify"           # or "hash-scan"
//! interval = "50ms"
//! scan_interval = "10s"         # inotify only: also hash-scan this often ("0s": never)
//! window = "256MiB"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::proto::valid_name;
use crate::region::DEFAULT_CHUNK_SIZE;
use crate::transport::{Congestion, Link, Tuning};

/// The configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML for an agent.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A required setting is missing.
    #[error("missing setting: {0}")]
    Missing(&'static str),
    /// A setting has a bad value.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
}

fn invalid(what: &'static str, value: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        what,
        value: value.into(),
        why: why.into(),
    }
}

/// A number of bytes: an integer or a string like `64KiB`, `8MiB`, `1GiB`, `4k`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A duration: `250ms`, `10s`, `2m`, `500us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    Ok(match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "" if n == 0 => Duration::ZERO,
        // A bare number used to mean seconds, and `--downtime-budget 50` stopped a
        // writer for 12 s: say which unit.
        "" => return Err(format!("{s:?} needs a unit: {n}ms, {n}s, {n}m ...")),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        u => return Err(format!("unknown duration unit {u:?}")),
    })
}

/// `NAME=VALUE` (for `--peer` and `--region`).
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    if !valid_name(k) {
        return Err(format!(
            "{k:?} is not a valid name (letters, digits, '.', '_', '-')"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Int(u64),
    Text(String),
}

impl SizeValue {
    fn get(&self, what: &'static str) -> Result<u64, ConfigError> {
        match self {
            SizeValue::Int(n) => Ok(*n),
            SizeValue::Text(s) if s == "auto" => Ok(0),
            SizeValue::Text(s) => parse_size(s).map_err(|e| invalid(what, s, e)),
        }
    }
}

/// A rate in bits per second: an integer or a string like `1gbit`, `200mbit`, `50MBps`
/// (see [`crate::wan::parse_rate`]).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RateValue {
    Int(u64),
    Text(String),
}

impl RateValue {
    fn get(&self, what: &'static str) -> Result<u64, ConfigError> {
        match self {
            RateValue::Int(n) => Ok(*n),
            RateValue::Text(s) => parse_rate(s).map_err(|e| invalid(what, s, e)),
        }
    }
}

/// A link rate in bits per second: `1gbit`, `200mbit`, `100Mbps` (bits), `50MBps` (bytes).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    crate::wan::parse_rate(s)
}

/// The TOML file, every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    listen: Option<String>,
    certs: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    control: Option<PathBuf>,
    chunk_size: Option<SizeValue>,
    bulk_window: Option<SizeValue>,
    idle_timeout: Option<String>,
    fault_mechanism: Option<String>,
    fault_timeout: Option<String>,
    urgent_pause: Option<String>,
    congestion: Option<String>,
    link_bandwidth: Option<RateValue>,
    link_rtt: Option<String>,
    #[serde(default)]
    peers: BTreeMap<String, String>,
    #[serde(default)]
    regions: BTreeMap<String, PathBuf>,
    #[serde(default)]
    replicate: BTreeMap<String, FileReplication>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReplication {
    to: Vec<String>,
    tracker: Option<String>,
    interval: Option<String>,
    scan_interval: Option<String>,
    window: Option<SizeValue>,
}

/// A replication the agent starts by itself (`[replicate.NAME]` in the config).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationConfig {
    pub region: String,
    pub to: Vec<String>,
    /// `inotify` or `hash-scan`.
    pub tracker: String,
    pub interval: Duration,
    /// `None`: no periodic hash scan.
    pub scan_interval: Option<Duration>,
    pub window: u64,
}

/// Command-line overrides (each `Some`/non-empty value wins over the file).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub name: Option<String>,
    pub listen: Option<String>,
    pub certs: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub control: Option<PathBuf>,
    pub chunk_size: Option<u64>,
    /// A fixed window in bytes; `Some(0)` means automatic.
    pub bulk_window: Option<u64>,
    pub idle_timeout: Option<Duration>,
    pub fault_mechanism: Option<crate::fault::Mechanism>,
    pub fault_timeout: Option<Duration>,
    /// QUIC congestion controller.
    pub congestion: Option<Congestion>,
    /// Link bandwidth in bits/s (with `link_rtt`: windows sized for the link).
    pub link_bandwidth: Option<u64>,
    /// Link round-trip time.
    pub link_rtt: Option<Duration>,
    /// `NAME=HOST:PORT`; a name already in the file gets the new address.
    pub peers: Vec<(String, String)>,
    /// `NAME=PATH`.
    pub regions: Vec<(String, PathBuf)>,
}

/// A peer we expect, and where to dial it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    /// `HOST:PORT`; resolved at each dial, so DNS changes are followed.
    pub addr: String,
}

/// A resolved agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    /// `HOST:PORT` to bind (port 0 picks one; see `Agent::local_addr`).
    pub listen: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub peers: Vec<PeerSpec>,
    pub regions: Vec<(String, PathBuf)>,
    /// Unix control socket; `None` runs without one (library use).
    pub control: Option<PathBuf>,
    pub chunk_size: u32,
    /// How many bulk bytes a pull lets a peer have in flight (credit window).
    pub bulk_window: crate::engine::pull::Window,
    pub tuning: Tuning,
    /// Reconnect backoff: first and longest wait.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long a new pull waits for its peer to be connected.
    pub peer_wait: Duration,
    /// Lazy mounts: the mechanism to use (`Auto` lets the application pick; the
    /// application's explicit choice wins over this).
    pub fault_mechanism: crate::fault::Mechanism,
    /// Lazy mounts: how long a fault waits for an unreachable peer before the faulting
    /// thread gets SIGBUS.
    pub fault_timeout: Duration,
    /// On a local link (min RTT up to 1 ms), a pull's bulk copy stops taking chunks while
    /// an urgent fetch of it is in flight, for at most this long (zero: never). See
    /// `agent::pull::urgent_pause`.
    pub urgent_pause: Duration,
    /// Replications to start with the agent.
    pub replications: Vec<ReplicationConfig>,
}

/// Default bulk credit window: adaptive (see [`crate::engine::pull::Window`]).
pub const DEFAULT_BULK_WINDOW: crate::engine::pull::Window = crate::engine::pull::AUTO_WINDOW;

/// Default for [`AgentConfig::urgent_pause`]: a loopback urgent fetch takes well under it.
pub const DEFAULT_URGENT_PAUSE: Duration = Duration::from_millis(2);
/// Longest `urgent_pause` accepted: longer would only starve the bulk copy.
const MAX_URGENT_PAUSE: Duration = Duration::from_millis(100);

impl AgentConfig {
    /// A configuration with defaults for everything but identity and address.
    pub fn new(name: &str, listen: &str, ca: &Path, cert: &Path, key: &Path) -> AgentConfig {
        AgentConfig {
            name: name.into(),
            listen: listen.into(),
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
            peers: Vec::new(),
            regions: Vec::new(),
            control: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            bulk_window: DEFAULT_BULK_WINDOW,
            tuning: Tuning::default(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            peer_wait: Duration::from_secs(30),
            fault_mechanism: crate::fault::Mechanism::Auto,
            fault_timeout: Duration::from_secs(60),
            urgent_pause: DEFAULT_URGENT_PAUSE,
            replications: Vec::new(),
        }
    }

    /// Reads `file` (if any) and applies `o` on top.
    pub fn load(file: Option<&Path>, o: &Overrides) -> Result<AgentConfig, ConfigError> {
        let fc: FileConfig = match file {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.into(),
                    message: e.to_string(),
                })?
            }
        };
        let name = o.name.clone().or(fc.name).ok_or(ConfigError::Missing(
            "name (--name or `name =` in the config)",
        ))?;
        if !valid_name(&name) || name.contains('_') {
            return Err(invalid("name", &name, "use letters, digits, '.', '-'"));
        }
        let listen = o
            .listen
            .clone()
            .or(fc.listen)
            .ok_or(ConfigError::Missing("listen address (--listen HOST:PORT)"))?;
        let certs = o.certs.clone().or(fc.certs);
        let pick = |flag: &Option<PathBuf>, file: Option<PathBuf>, default: &str, what| {
            flag.clone()
                .or(file)
                .or_else(|| certs.as_ref().map(|d| d.join(default)))
                .ok_or(ConfigError::Missing(what))
        };
        let ca = pick(
            &o.ca,
            fc.ca,
            "ca.pem",
            "CA certificate (--ca FILE or --certs DIR)",
        )?;
        let cert = pick(
            &o.cert,
            fc.cert,
            &format!("{name}.pem"),
            "node certificate (--cert FILE or --certs DIR)",
        )?;
        let key = pick(
            &o.key,
            fc.key,
            &format!("{name}.key"),
            "node key (--key FILE or --certs DIR)",
        )?;
        let mut cfg = AgentConfig::new(&name, &listen, &ca, &cert, &key);
        cfg.control = o.control.clone().or(fc.control);
        if let Some(v) = o
            .chunk_size
            .map(Ok)
            .or(fc.chunk_size.map(|v| v.get("chunk_size")))
        {
            let v = v?;
            crate::region::Geometry::new(0, v)
                .map_err(|e| invalid("chunk_size", &v.to_string(), e.to_string()))?;
            cfg.chunk_size = v as u32;
        }
        if let Some(v) = o
            .bulk_window
            .map(Ok)
            .or(fc.bulk_window.map(|v| v.get("bulk_window")))
        {
            let v = v?;
            cfg.bulk_window = if v == 0 {
                DEFAULT_BULK_WINDOW
            } else if (64 << 10..=1 << 30).contains(&v) {
                crate::engine::pull::Window::Fixed(v)
            } else {
                return Err(invalid(
                    "bulk_window",
                    &v.to_string(),
                    "must be auto or 64KiB..1GiB",
                ));
            };
        }
        let idle = match (o.idle_timeout, fc.idle_timeout) {
            (Some(d), _) => Some(d),
            (None, Some(s)) => {
                Some(parse_duration(&s).map_err(|e| invalid("idle_timeout", &s, e))?)
            }
            _ => None,
        };
        if let Some(d) = idle {
            cfg.tuning.idle_timeout = d.max(Duration::from_millis(500));
            cfg.tuning.keep_alive = (d / 4).max(Duration::from_millis(100));
        }
        if let Some(m) = o.fault_mechanism {
            cfg.fault_mechanism = m;
        } else if let Some(s) = &fc.fault_mechanism {
            cfg.fault_mechanism =
                crate::fault::Mechanism::parse(s).map_err(|e| invalid("fault_mechanism", s, e))?;
        }
        if let Some(d) = o.fault_timeout {
            cfg.fault_timeout = d;
        } else if let Some(s) = &fc.fault_timeout {
            cfg.fault_timeout = parse_duration(s).map_err(|e| invalid("fault_timeout", s, e))?;
        }
        if let Some(s) = &fc.urgent_pause {
            let d = parse_duration(s).map_err(|e| invalid("urgent_pause", s, e))?;
            if d > MAX_URGENT_PAUSE {
                return Err(invalid(
                    "urgent_pause",
                    s,
                    format!("at most {MAX_URGENT_PAUSE:?}"),
                ));
            }
            cfg.urgent_pause = d;
        }
        if let Some(c) = o.congestion {
            cfg.tuning.congestion = c;
        } else if let Some(s) = &fc.congestion {
            cfg.tuning.congestion =
                Congestion::parse(s).map_err(|e| invalid("congestion", s, e))?;
        }
        let bandwidth = match (o.link_bandwidth, &fc.link_bandwidth) {
            (Some(b), _) => Some(b),
            (None, Some(v)) => Some(v.get("link_bandwidth")?),
            _ => None,
        };
        let rtt = match (o.link_rtt, &fc.link_rtt) {
            (Some(d), _) => Some(d),
            (None, Some(s)) => Some(parse_duration(s).map_err(|e| invalid("link_rtt", s, e))?),
            _ => None,
        };
        match (bandwidth, rtt) {
            (None, None) => {}
            (Some(bandwidth_bps), Some(rtt)) => {
                let link = Link { bandwidth_bps, rtt };
                link.validate()
                    .map_err(|e| invalid("link", &format!("{bandwidth_bps} bit/s, {rtt:?}"), e))?;
                cfg.tuning.size_for_link(link);
            }
            (Some(b), None) => {
                return Err(invalid(
                    "link_bandwidth",
                    &b.to_string(),
                    "give link_rtt too (--link-rtt): windows are sized to bandwidth x RTT",
                ))
            }
            (None, Some(d)) => return Err(invalid(
                "link_rtt",
                &format!("{d:?}"),
                "give link_bandwidth too (--link-bandwidth): windows are sized to bandwidth x RTT",
            )),
        }
        let mut peers: BTreeMap<String, String> = fc.peers;
        for (k, v) in &o.peers {
            peers.insert(k.clone(), v.clone());
        }
        for (k, v) in peers {
            if !valid_name(&k) {
                return Err(invalid("peer name", &k, "use letters, digits, '.', '-'"));
            }
            if k == name {
                return Err(invalid("peer", &k, "an agent cannot be its own peer"));
            }
            if !v.contains(':') {
                return Err(invalid("peer address", &v, "expected HOST:PORT"));
            }
            cfg.peers.push(PeerSpec { name: k, addr: v });
        }
        let mut regions: BTreeMap<String, PathBuf> = fc.regions;
        // A flag overrides the config file's entry of the same name; two flags for one
        // name are a mistake.
        let mut flagged = std::collections::BTreeSet::new();
        for (k, v) in &o.regions {
            if !flagged.insert(k.as_str()) {
                return Err(invalid("region", k, "given twice with --region"));
            }
            regions.insert(k.clone(), v.clone());
        }
        for (k, v) in regions {
            if !valid_name(&k) {
                return Err(invalid(
                    "region name",
                    &k,
                    "use letters, digits, '.', '_', '-'",
                ));
            }
            cfg.regions.push((k, v));
        }
        for (region, r) in fc.replicate {
            if !cfg.regions.iter().any(|(n, _)| *n == region) {
                return Err(invalid(
                    "replicate",
                    &region,
                    "not a region of this agent (add it under [regions])",
                ));
            }
            for p in &r.to {
                if !cfg.peers.iter().any(|x| x.name == *p) {
                    return Err(invalid("replicate.to", p, "not a peer of this agent"));
                }
            }
            let tracker = r.tracker.unwrap_or_else(|| "inotify".into());
            if tracker != "inotify" && tracker != "hash-scan" {
                return Err(invalid("tracker", &tracker, "inotify or hash-scan"));
            }
            let dur = |v: &Option<String>, what, default: Duration| match v {
                Some(s) => parse_duration(s).map_err(|e| invalid(what, s, e)),
                None => Ok(default),
            };
            let scan = dur(&r.scan_interval, "scan_interval", Duration::from_secs(10))?;
            cfg.replications.push(ReplicationConfig {
                region,
                to: r.to,
                tracker,
                interval: dur(&r.interval, "interval", Duration::from_millis(50))?
                    .max(Duration::from_millis(1)),
                scan_interval: (!scan.is_zero()).then_some(scan),
                window: match &r.window {
                    Some(w) => w.get("window")?,
                    None => 256 << 20,
                },
            });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("8m"), Ok(8 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1zb").is_err());
        assert!(parse_size("99999999999999999999t").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("3").unwrap_err().contains("needs a unit"));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("3h"), Ok(Duration::from_secs(3 * 3600)));
        assert!(parse_duration("3d").is_err());
        assert_eq!(parse_pair("a=1:2"), Ok(("a".into(), "1:2".into())));
        assert!(parse_pair("a").is_err());
        assert!(parse_pair("a b=c").is_err());
    }

    #[test]
    fn congestion_and_link() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        let base = "name = \"a\"\nlisten = \"127.0.0.1:7000\"\ncerts = \"/c\"\n";
        let load = |extra: &str, o: &Overrides| {
            std::fs::write(&p, format!("{base}{extra}")).unwrap();
            AgentConfig::load(Some(&p), o)
        };
        let none = Overrides::default();
        // Defaults: no link, default controller and windows.
        let c = load("", &none).unwrap();
        let d = Tuning::default();
        assert_eq!(c.tuning.congestion, crate::transport::DEFAULT_CONGESTION);
        assert_eq!(c.tuning.stream_window, d.stream_window);
        assert_eq!(c.tuning.initial_rtt, None);

        // From the file: 10 Gbit/s x 80 ms = 100 MB BDP.
        let c = load(
            "congestion = \"bbr\"\nlink_bandwidth = \"10gbit\"\nlink_rtt = \"80ms\"\n",
            &none,
        )
        .unwrap();
        assert_eq!(c.tuning.congestion, Congestion::Bbr);
        assert_eq!(c.tuning.stream_window, 200_000_000);
        assert_eq!(c.tuning.conn_window, 400_000_000);
        assert_eq!(c.tuning.send_window, 400_000_000);
        assert_eq!(c.tuning.initial_rtt, Some(Duration::from_millis(80)));
        // An integer rate is bits per second.
        let c = load("link_bandwidth = 10000000000\nlink_rtt = \"80ms\"\n", &none).unwrap();
        assert_eq!(c.tuning.stream_window, 200_000_000);

        // Flags win over the file.
        let o = Overrides {
            congestion: Some(Congestion::NewReno),
            link_bandwidth: Some(20_000_000_000),
            ..Default::default()
        };
        let c = load(
            "congestion = \"bbr\"\nlink_bandwidth = \"10gbit\"\nlink_rtt = \"80ms\"\n",
            &o,
        )
        .unwrap();
        assert_eq!(c.tuning.congestion, Congestion::NewReno);
        assert_eq!(c.tuning.stream_window, 400_000_000);

        // Errors name the setting.
        let bad = |extra: &str, o: &Overrides, what: &str| match load(extra, o) {
            Err(ConfigError::Invalid { what: w, why, .. }) => {
                assert_eq!(w, what, "{why}");
                why
            }
            other => panic!("{extra}: expected an invalid {what}, got {other:?}"),
        };
        let why = bad("congestion = \"vegas\"\n", &none, "congestion");
        assert!(why.contains("cubic, newreno or bbr"), "{why}");
        let why = bad("link_bandwidth = \"1gbit\"\n", &none, "link_bandwidth");
        assert!(why.contains("link_rtt"), "{why}");
        let why = bad("link_rtt = \"50ms\"\n", &none, "link_rtt");
        assert!(why.contains("link_bandwidth"), "{why}");
        bad(
            "link_bandwidth = \"fast\"\nlink_rtt = \"50ms\"\n",
            &none,
            "link_bandwidth",
        );
        bad(
            "link_bandwidth = \"1gbit\"\nlink_rtt = \"soon\"\n",
            &none,
            "link_rtt",
        );
        let why = bad(
            "link_bandwidth = \"1gbit\"\nlink_rtt = \"0ms\"\n",
            &none,
            "link",
        );
        assert!(why.contains("RTT"), "{why}");
        let why = bad("link_bandwidth = 10\nlink_rtt = \"50ms\"\n", &none, "link");
        assert!(why.contains("bandwidth"), "{why}");
        let o = Overrides {
            link_rtt: Some(Duration::from_millis(50)),
            ..Default::default()
        };
        bad("", &o, "link_rtt");
        assert_eq!(parse_rate("200mbit"), Ok(200_000_000));
        assert!(parse_rate("200 parsecs").is_err());

        // The urgent pause: default, set, off, capped.
        assert_eq!(load("", &none).unwrap().urgent_pause, DEFAULT_URGENT_PAUSE);
        let c = load("urgent_pause = \"5ms\"\n", &none).unwrap();
        assert_eq!(c.urgent_pause, Duration::from_millis(5));
        assert!(load("urgent_pause = \"0s\"\n", &none)
            .unwrap()
            .urgent_pause
            .is_zero());
        let why = bad("urgent_pause = \"1s\"\n", &none, "urgent_pause");
        assert!(why.contains("at most"), "{why}");
        bad("urgent_pause = \"often\"\n", &none, "urgent_pause");
    }

    #[test]
    fn file_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(
            &p,
            r#"
name = "a"
listen = "127.0.0.1:7000"
certs = "/c"
chunk_size = "16KiB"
[peers]
b = "127.0.0.1:7001"
c = "127.0.0.1:7002"
[regions]
r = "/dev/shm/r"
"#,
        )
        .unwrap();
        let o = Overrides {
            listen: Some("127.0.0.1:9000".into()),
            peers: vec![("b".into(), "10.1.1.1:1".into())],
            ..Default::default()
        };
        let c = AgentConfig::load(Some(&p), &o).unwrap();
        assert_eq!(c.name, "a");
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.ca, PathBuf::from("/c/ca.pem"));
        assert_eq!(c.cert, PathBuf::from("/c/a.pem"));
        assert_eq!(c.key, PathBuf::from("/c/a.key"));
        assert_eq!(c.chunk_size, 16384);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].addr, "10.1.1.1:1");
        assert_eq!(c.regions, vec![("r".into(), PathBuf::from("/dev/shm/r"))]);
        // A flag overrides the file's region of the same name; two flags for one name
        // are refused.
        let mut o = Overrides {
            regions: vec![("r".into(), "/dev/shm/r2".into())],
            ..Default::default()
        };
        let c = AgentConfig::load(Some(&p), &o).unwrap();
        assert_eq!(c.regions, vec![("r".into(), PathBuf::from("/dev/shm/r2"))]);
        o.regions.push(("r".into(), "/dev/shm/r3".into()));
        let e = AgentConfig::load(Some(&p), &o).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");

        std::fs::write(&p, "name = \"a\"\nbogus = 1\n").unwrap();
        assert!(matches!(
            AgentConfig::load(Some(&p), &Overrides::default()),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            AgentConfig::load(None, &Overrides::default()),
            Err(ConfigError::Missing(_))
        ));
        let o = Overrides {
            name: Some("a".into()),
            listen: Some("x:1".into()),
            certs: Some("/c".into()),
            chunk_size: Some(5000),
            ..Default::default()
        };
        assert!(matches!(
            AgentConfig::load(None, &o),
            Err(ConfigError::Invalid { .. })
        ));
    }
}
