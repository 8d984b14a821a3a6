//! Harness of the browser tests: a private network namespace per test (veth
//! pair 198.18.0.1 ↔ 198.18.0.2, both ends inside, and 198.18.0.3 on its
//! loopback for the publisher, where Chromium never looks), cascade and a
//! WHIP publisher started in it, and the Chromium runner (run.mjs).

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// cascade's address (and the page origin of our own pages).
pub(crate) const CASCADE_IP: &str = "198.18.0.1";
/// The other end of the veth pair: "another origin" for CORS tests.
pub(crate) const STATIC_IP: &str = "198.18.0.2";
/// The publisher's address, on the namespace's loopback device: Chromium
/// gathers no candidates there, so UDP rules can tell the two apart.
pub(crate) const PUBLISHER_IP: &str = "198.18.0.3";
/// Publish token of the tests.
pub(crate) const TOKEN: &str = "browser-test-token";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Where a screenshot of a page goes: docs/screenshots/ (committed) when
/// `CASCADE_SCREENSHOTS=1`, else a temporary directory, so a test run
/// leaves the work tree as it was.
pub(crate) fn screenshot(name: &str) -> String {
    let dir = if std::env::var("CASCADE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
    } else {
        std::env::temp_dir().join("cascade-screenshots")
    };
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name).to_string_lossy().into_owned()
}

/// A network namespace, deleted on drop.
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    /// Creates the namespace, or prints why the test is skipped and returns
    /// `None` (only when not root outside CI; under `CI=true` a missing
    /// privilege fails the test, as in tests/netns_cluster.rs).
    pub(crate) fn create(tag: &str) -> Option<Self> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if uid.as_deref().ok() != Some("0") {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "browser test {tag} needs root to create a network namespace; CI runs as root"
            );
            eprintln!("SKIP browser test {tag}: needs root to create a network namespace (CI runs as root)");
            return None;
        }
        assert!(
            browser_dir().join("node_modules/playwright-core").exists(),
            "tests/browser/node_modules missing: run `npm ci` in tests/browser (scripts/test.sh does)"
        );
        assert!(
            std::path::Path::new("/usr/bin/chromium").exists(),
            "Debian chromium missing (scripts/test.sh installs it)"
        );
        let name = format!(
            "cascade-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Self { name };
        let n = ns.name.as_str();
        let ok = sh(&["ip", "netns", "add", n])
            && sh(&["ip", "-n", n, "link", "set", "lo", "up"])
            && sh(&[
                "ip", "-n", n, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
            ])
            && sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{CASCADE_IP}/24"),
                "dev",
                "v0",
            ])
            && sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{STATIC_IP}/24"),
                "dev",
                "v1",
            ])
            && sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{PUBLISHER_IP}/32"),
                "dev",
                "lo",
            ])
            && sh(&["ip", "-n", n, "link", "set", "v0", "up"])
            && sh(&["ip", "-n", n, "link", "set", "v1", "up"]);
        assert!(
            ok,
            "setting up network namespace {n} failed (ip netns / veth)"
        );
        Some(ns)
    }

    /// `program` to be run inside the namespace.
    pub(crate) fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Drops every UDP packet in the namespace except the publisher's, so
    /// a browser can reach cascade only over ICE-TCP.
    pub(crate) fn drop_udp(&self) {
        let rules = format!(
            "table inet cascade_test {{\n chain out {{\n  type filter hook output priority 0;\n  meta l4proto udp ip saddr != {PUBLISHER_IP} ip daddr != {PUBLISHER_IP} drop\n }}\n}}\n"
        );
        let ok = self
            .cmd("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin piped")
                    .write_all(rules.as_bytes())?;
                c.wait()
            })
            .is_ok_and(|s| s.success());
        assert!(ok, "nft rules load (nftables installed?)");
    }

    /// Runs this test binary's `helper_whip_publisher` inside the namespace:
    /// a WHIP publisher of test media to `stream` for `secs`, returned once
    /// it is connected.
    pub(crate) fn publisher(&self, cascade: &Cascade, stream: &str, secs: u64) -> Proc {
        self.publisher_with_profile(cascade, stream, secs, "baseline")
    }

    /// [`Netns::publisher`] with the H.264 profile of its media: `baseline`
    /// (constrained, `42e01f`), `main` (`4d001f`) or `high` (`64001f`).
    pub(crate) fn publisher_with_profile(
        &self,
        cascade: &Cascade,
        stream: &str,
        secs: u64,
        profile: &str,
    ) -> Proc {
        let exe = std::env::current_exe().expect("test binary path");
        let mut c = self.cmd(exe.to_str().expect("utf-8 path"));
        c.args([
            "helper_whip_publisher",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "CASCADE_BT_PUBLISH",
            format!("{}/whip/{stream}", cascade.base),
        )
        .env("CASCADE_BT_SECS", secs.to_string())
        .env("CASCADE_BT_PROFILE", profile);
        let mut p = Proc::spawn(c);
        p.wait_line(
            |l| l.contains("PUBLISHER CONNECTED"),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|lines| panic!("publisher did not connect: {lines:?}"));
        p
    }

    /// Runs run.mjs (Chromium) with `job` inside the namespace and returns its JSON.
    pub(crate) fn run_browser(&self, job: Value, within: Duration) -> Value {
        self.run_script("run.mjs", job, within)
    }

    /// Runs a node script of tests/browser with `job` inside the namespace
    /// and returns the JSON object it prints.
    pub(crate) fn run_script(&self, script: &str, mut job: Value, within: Duration) -> Value {
        job["timeoutSecs"] = Value::from(within.as_secs().saturating_sub(5));
        let mut c = self.cmd("node");
        c.current_dir(browser_dir())
            .arg(script)
            .arg(job.to_string());
        let mut p = Proc::spawn(c);
        let line = p
            .wait_line(|l| l.starts_with('{'), within)
            .unwrap_or_else(|lines| panic!("browser runner printed no result: {lines:?}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("runner output {line}: {e}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A child process whose stdout lines are read on a thread; killed on drop.
pub(crate) struct Proc {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    pub(crate) fn spawn(mut c: Command) -> Self {
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout piped");
        // Bounded: a reader that falls behind only slows the child's prints.
        let (tx, lines) = std::sync::mpsc::sync_channel(1024);
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.by_ref().take(16 << 20).read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx
                            .send(String::from_utf8_lossy(&buf).trim_end().to_string())
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line matching `pred`; on timeout or exit returns every line seen.
    pub(crate) fn wait_line(
        &mut self,
        pred: impl Fn(&str) -> bool,
        within: Duration,
    ) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if pred(&l) {
                        return Ok(l);
                    }
                    self.seen.push(l);
                }
                Err(_) => return Err(std::mem::take(&mut self.seen)),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// cascade (`all`, or any role with [`Cascade::start_role`]) running
/// inside a namespace; killed (SIGKILL) on drop.
pub(crate) struct Cascade {
    /// `http://198.18.0.1:PORT`
    pub(crate) base: String,
    /// The ports of WebRTC media: UDP and ICE-TCP.
    pub(crate) media_ports: (u16, u16),
    /// `198.18.0.1:PORT` of the relay, when the node serves it.
    #[allow(dead_code)] // read by tests/browser_failover.rs only
    pub(crate) quic: Option<String>,
    _proc: Proc,
}

impl Cascade {
    pub(crate) fn start(ns: &Netns, extra: &[&str]) -> Self {
        Self::start_role(ns, "all", extra)
    }

    /// `cascade ROLE` with the namespace's defaults plus `extra`.
    pub(crate) fn start_role(ns: &Netns, role: &str, extra: &[&str]) -> Self {
        let mut c = ns.cmd(env!("CARGO_BIN_EXE_cascade"));
        let any = format!("{CASCADE_IP}:0");
        // Defaults, each left out when `extra` sets the flag itself.
        let defaults = [
            ("--http", any.as_str()),
            ("--rtmp", any.as_str()),
            ("--udp", any.as_str()),
            ("--tcp", any.as_str()),
            ("--advertise", CASCADE_IP),
            ("--publish-token", TOKEN),
        ];
        c.arg(role);
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                c.args([flag, value]);
            }
        }
        c.args(extra).env_remove("RUST_LOG").env(
            "CASCADE_LOG",
            std::env::var("CASCADE_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut p = Proc::spawn(c);
        let health = p
            .wait_line(|l| l.trim().starts_with("Health:"), Duration::from_secs(30))
            .unwrap_or_else(|lines| panic!("cascade did not start: {lines:?}"));
        let base = health
            .trim()
            .trim_start_matches("Health:")
            .split_whitespace()
            .next()
            .and_then(|u| u.strip_suffix("/healthz"))
            .expect("health url")
            .to_string();
        // "WebRTC media: udp IP:PORT / ice-tcp IP:PORT — candidates: …"
        let port_after = |key: &str| -> u16 {
            p.seen
                .iter()
                .find_map(|l| l.split(key).nth(1))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        };
        let media_ports = (port_after("udp "), port_after("ice-tcp "));
        let quic = p.seen.iter().find_map(|l| {
            l.trim()
                .strip_prefix("Relay (QUIC):")
                .map(|a| a.trim().to_string())
        });
        Self {
            base,
            media_ports,
            quic,
            _proc: p,
        }
    }
}

/// Body of `helper_whip_publisher`: does nothing unless started by
/// [`Netns::publisher`].
pub(crate) fn publisher_main() {
    let Ok(url) = std::env::var("CASCADE_BT_PUBLISH") else {
        return;
    };
    let secs: u64 = std::env::var("CASCADE_BT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    // Unset (other test files' publishers): constrained baseline, as before.
    let profile = match std::env::var("CASCADE_BT_PROFILE").as_deref() {
        Ok("high") => loadtest::media::Profile::High,
        Ok("main") => loadtest::media::Profile::Main,
        _ => loadtest::media::Profile::ConstrainedBaseline,
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let media = std::sync::Arc::new(
            loadtest::media::TestMedia::generate(loadtest::media::Options {
                gop_frames: 30,
                profile,
                ..Default::default()
            })
            .await
            .expect("ffmpeg makes test media"),
        );
        let mut o = loadtest::whip::PublisherOptions::new(url);
        o.token = Some(TOKEN.into());
        o.bind = PUBLISHER_IP.parse().expect("ip");
        o.duration = Some(Duration::from_secs(secs));
        let mut p = loadtest::whip::Publisher::start(o, media)
            .await
            .expect("whip publish accepted");
        tokio::time::timeout(Duration::from_secs(15), p.wait_connected())
            .await
            .expect("publisher connects in time")
            .expect("publisher connects");
        println!("PUBLISHER CONNECTED");
        let _ = tokio::time::timeout(Duration::from_secs(secs + 5), p.finish()).await;
    });
}

/// Percent-encodes `s` for a query value (a URL inside a page's query).
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
