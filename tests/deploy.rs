//! Validates `deploy/` with the tools operators run it with, so a broken
//! manifest, alert or dashboard fails the suite instead of a deploy:
//!
//! - the Dockerfile's shape (multi-stage, non-root, the ports; no docker
//!   daemon here, so it is parsed, not built);
//! - `docker-compose config` (Debian's docker-compose) on `compose.yaml` with
//!   `.env.example`, and the services, ports and secrets it resolves to;
//! - `kubernetes-validate --strict` (PyPI, offline: it bundles the schemas)
//!   on every manifest, plus what the schemas cannot say (drain, probes,
//!   grace period, host IP);
//! - `promtool check rules` / `check config` / `test rules` (Debian's
//!   prometheus);
//! - every metric the Grafana dashboard, the alert rules and the autoscaler
//!   name is one the binary exports: scraped from a running origin, ingest
//!   and edge after a publish and a view, plus the names the source
//!   describes (`describe_metrics` in `src/node.rs`) for counters and
//!   histograms that have not fired yet.
//!
//! `scripts/test.sh` installs the tools (apt: docker-compose, prometheus,
//! python3-venv; pip: kubernetes-validate into `target/deploy-venv`). A
//! missing tool fails the test under `CI=true` and skips it elsewhere.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Kubernetes versions the manifests must be valid for: an old one still
/// offered by managed clusters and a current one (both bundled in
/// kubernetes-validate 1.37, so no network is needed).
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.33.0"];

/// Metrics named in the queries that Prometheus makes, not cascade.
const PROMETHEUS_METRICS: &[&str] = &["up"];

/// The services of `deploy/compose.yaml`.
const COMPOSE_SERVICES: &[&str] = &[
    "origin",
    "origin-standby",
    "ingest",
    "edge1",
    "edge2",
    "prometheus",
    "grafana",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The cargo target directory (the test binary's `cascade` is in
/// `<target>/debug/`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_cascade"))
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/cascade")
        .to_path_buf()
}

/// A tool the test needs, or `None` (skip) outside CI. Under `CI=true` a
/// missing tool fails: the suite must never pass without checking.
fn tool(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    let found = extra.iter().find(|p| p.is_file()).cloned().or(on_path);
    if found.is_none() {
        let why = format!("{name} is not installed (bash scripts/test.sh installs it)");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}");
        }
        eprintln!("SKIP: {why}");
    }
    found
}

/// kubernetes-validate: `CASCADE_KUBERNETES_VALIDATE`, the venv
/// scripts/test.sh makes under the target directory, or `PATH`.
fn kubernetes_validate() -> Option<PathBuf> {
    let mut extra = vec![target_dir().join("deploy-venv/bin/kubernetes-validate")];
    if let Some(p) = std::env::var_os("CASCADE_KUBERNETES_VALIDATE") {
        extra.insert(0, PathBuf::from(p));
    }
    tool("kubernetes-validate", &extra)
}

/// The Python that runs kubernetes-validate (its shebang): it has PyYAML,
/// which turns YAML into JSON for the checks below.
fn python_with_yaml(kv: &Path) -> PathBuf {
    let text = read(kv);
    let line = text.lines().next().unwrap_or_default();
    let interp = line
        .strip_prefix("#!")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{} has no shebang", kv.display()));
    PathBuf::from(interp)
}

/// Every YAML document of `text` as JSON.
fn yaml_docs(python: &Path, text: &str) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "YAML parses: {}", stderr(&out));
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        v => panic!("not a list: {v}"),
    }
}

fn yaml_file(python: &Path, path: &Path) -> Value {
    let mut docs = yaml_docs(python, &read(path));
    assert_eq!(docs.len(), 1, "{} holds one document", path.display());
    docs.remove(0)
}

fn stderr(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

// ------------------------------------------------------------ Dockerfile

/// One instruction per logical line (continuations joined, comments out).
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (word, rest) = cur.split_once(char::is_whitespace).unwrap_or((&cur, ""));
        out.push((word.to_ascii_uppercase(), rest.trim().to_string()));
        cur.clear();
    }
    out
}

#[test]
fn dockerfile_is_multi_stage_small_and_non_root() {
    let ins = dockerfile_instructions(&read(&deploy("Dockerfile")));
    let stages: Vec<usize> = (0..ins.len()).filter(|&i| ins[i].0 == "FROM").collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let build = &ins[stages[0]].1;
    assert!(
        build.starts_with("rust:") && build.contains("bookworm") && build.ends_with(" AS build"),
        "builder is rust on bookworm named build: {build}"
    );
    assert_eq!(ins[stages[1]].1, "debian:bookworm-slim AS runtime");
    let (build_stage, runtime) = ins.split_at(stages[1]);
    assert!(
        build_stage
            .iter()
            .any(|(w, r)| w == "RUN" && r.contains("cargo build --release")),
        "the binary is built in release"
    );
    let run_lines: Vec<&String> = runtime
        .iter()
        .filter(|(w, _)| w == "RUN")
        .map(|(_, r)| r)
        .collect();
    for pkg in ["ffmpeg", "ca-certificates"] {
        assert!(
            run_lines
                .iter()
                .any(|r| r.contains("--no-install-recommends") && r.contains(pkg)),
            "runtime installs {pkg} without recommends"
        );
    }
    assert!(
        run_lines
            .iter()
            .all(|r| !r.contains("apt-get install") || r.contains("rm -rf /var/lib/apt/lists")),
        "apt lists are removed in the layer that made them"
    );
    assert!(
        runtime
            .iter()
            .any(|(w, r)| w == "COPY" && r.starts_with("--from=build ")),
        "only the binary comes from the build stage"
    );
    assert!(
        !runtime
            .iter()
            .any(|(w, r)| w == "COPY" && !r.starts_with("--from=")),
        "no sources in the runtime image"
    );
    let users: Vec<&String> = runtime
        .iter()
        .filter(|(w, _)| w == "USER")
        .map(|(_, r)| r)
        .collect();
    let user = users.last().expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "root" && uid != "0" && !uid.is_empty(),
        "runs as a non-root user: {user}"
    );
    let exposed: BTreeSet<&str> = runtime
        .iter()
        .filter(|(w, _)| w == "EXPOSE")
        .flat_map(|(_, r)| r.split_whitespace())
        .collect();
    for port in ["8080/tcp", "1935/tcp", "8189/udp", "8189/tcp", "4433/udp"] {
        assert!(exposed.contains(port), "EXPOSE {port}: {exposed:?}");
    }
    let entry = runtime
        .iter()
        .rfind(|(w, _)| w == "ENTRYPOINT")
        .map(|(_, r)| r)
        .expect("ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry).expect("exec-form ENTRYPOINT (JSON)");
    assert!(
        entry.iter().any(|a| a.ends_with("/cascade")),
        "the entrypoint runs cascade: {entry:?}"
    );
    // The build context is the repository root: keep target/ (gigabytes)
    // and .git out of it.
    let ignore = read(&repo().join(".dockerignore"));
    for p in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == p),
            ".dockerignore has {p}"
        );
    }
}

// ------------------------------------------------------------ compose

/// Values the test gives the variables `.env.example` leaves empty.
const COMPOSE_ENV: &[(&str, &str)] = &[
    (
        "CASCADE_CLUSTER_SECRET",
        "test-compose-secret-0123456789abcdef0123456789",
    ),
    ("CASCADE_API_TOKEN", "test-compose-api-token"),
    ("CASCADE_PUBLISH_TOKEN", "test-compose-publish-token"),
    ("ADVERTISE_IP", "192.0.2.10"),
    ("GRAFANA_ADMIN_PASSWORD", "test-compose-grafana"),
];

fn compose_config(compose: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(compose);
    cmd.args(["--env-file"])
        .arg(deploy(".env.example"))
        .arg("-f")
        .arg(deploy("compose.yaml"))
        .arg("config")
        .current_dir(repo());
    for (k, _) in COMPOSE_ENV {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// `--flag VALUE` in a command list.
fn flag<'a>(args: &'a [Value], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.as_str()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn compose_config_resolves_to_the_cluster() {
    let Some(compose) = tool("docker-compose", &[]) else {
        return;
    };
    let Some(kv) = kubernetes_validate() else {
        return;
    };
    let python = python_with_yaml(&kv);

    // The example leaves every secret empty: compose refuses to start until
    // they are set, so nobody runs with a published example value.
    let out = compose_config(&compose, &[]);
    assert!(!out.status.success(), "the bare example must not resolve");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CASCADE_CLUSTER_SECRET"),
        "the error names the missing secret: {}",
        stderr(&out)
    );
    for line in read(&deploy(".env.example")).lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if !k.starts_with('#')
            && ["SECRET", "TOKEN", "PASSWORD"]
                .iter()
                .any(|s| k.contains(s))
        {
            assert!(v.is_empty(), ".env.example gives {k} no value");
        }
    }

    let out = compose_config(&compose, COMPOSE_ENV);
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        stderr(&out)
    );
    let config = yaml_docs(&python, &String::from_utf8_lossy(&out.stdout)).remove(0);
    let services = config["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(names, COMPOSE_SERVICES.iter().copied().collect());

    // Secrets only by reference in the file itself.
    let raw = yaml_file(&python, &deploy("compose.yaml"));
    for (name, svc) in raw["services"].as_object().unwrap() {
        for (k, v) in svc["environment"].as_object().into_iter().flatten() {
            if ["SECRET", "TOKEN", "PASSWORD"]
                .iter()
                .any(|s| k.contains(s))
            {
                let v = v.as_str().unwrap_or_default();
                assert!(
                    v.starts_with("${"),
                    "{name}: {k} comes from the environment, not the file"
                );
            }
        }
    }

    let env = |svc: &Value, k: &str| svc["environment"][k].as_str().map(str::to_string);
    let mut http_ports = BTreeMap::new();
    let mut media_ports = BTreeSet::new();
    let mut quic = None;
    let mut standby = None;
    for name in ["origin", "origin-standby", "ingest", "edge1", "edge2"] {
        let svc = &services[name];
        let cmd = svc["command"].as_array().expect("command list");
        let role = cmd[0].as_str().unwrap();
        assert_eq!(
            svc["network_mode"], "host",
            "{name}: host network (media port 1:1)"
        );
        assert_eq!(
            env(svc, "CASCADE_CLUSTER_SECRET").as_deref(),
            Some(COMPOSE_ENV[0].1),
            "{name} gets the cluster secret"
        );
        assert_eq!(
            env(svc, "CASCADE_API_TOKEN").as_deref(),
            Some(COMPOSE_ENV[1].1),
            "{name} guards /api and /metrics"
        );
        let http = flag(cmd, "--http").unwrap_or_else(|| panic!("{name} sets --http"));
        assert!(
            http_ports.insert(port_of(http), role).is_none(),
            "{name}: HTTP port {http} is its own"
        );
        match role {
            "origin" if name == "origin" => quic = flag(cmd, "--quic").map(port_of),
            "origin" => standby = flag(cmd, "--quic").map(port_of),
            "ingest" | "edge" => {
                let origin = flag(cmd, "--origin").unwrap_or_else(|| panic!("{name} --origin"));
                assert_eq!(
                    Some(port_of(origin)),
                    quic,
                    "{name} dials the origin's relay"
                );
                let second = flag(cmd, "--origin-standby")
                    .unwrap_or_else(|| panic!("{name} --origin-standby"));
                assert_eq!(
                    Some(port_of(second)),
                    standby,
                    "{name} knows the standby origin's relay"
                );
                let udp = flag(cmd, "--udp").unwrap_or_else(|| panic!("{name} sets --udp"));
                assert!(
                    media_ports.insert(port_of(udp)),
                    "{name}: media port {udp} is its own"
                );
                assert_eq!(
                    env(svc, "CASCADE_ADVERTISE").as_deref(),
                    Some("192.0.2.10"),
                    "{name} advertises ADVERTISE_IP"
                );
            }
            r => panic!("{name}: unexpected role {r}"),
        }
        if role == "ingest" {
            assert!(
                env(svc, "CASCADE_PUBLISH_TOKEN").is_some(),
                "ingest has a publish token"
            );
        }
        let grace = svc["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period");
        assert!(
            humantime(grace) > humantime(env(svc, "CASCADE_DRAIN_TIMEOUT").as_deref().unwrap()),
            "{name}: docker waits longer than the drain"
        );
    }
    assert_eq!(
        (
            quic.is_some(),
            standby.is_some() && standby != quic,
            media_ports.len(),
            http_ports.values().filter(|r| **r == "edge").count()
        ),
        (true, true, 3, 2)
    );

    // Prometheus scrapes exactly the nodes compose runs, with their roles.
    let prom = yaml_file(&python, &deploy("prometheus/prometheus.yml"));
    let mut scraped = BTreeMap::new();
    for job in prom["scrape_configs"].as_array().unwrap() {
        for sc in job["static_configs"].as_array().into_iter().flatten() {
            for t in sc["targets"].as_array().unwrap() {
                scraped.insert(
                    port_of(t.as_str().unwrap()),
                    sc["labels"]["role"].as_str().unwrap(),
                );
            }
        }
    }
    assert_eq!(
        scraped, http_ports,
        "prometheus.yml targets = compose's nodes"
    );
    let p = &services["prometheus"];
    let mounts = p["volumes"].to_string();
    for f in ["prometheus.yml", "alerts.yml"] {
        assert!(mounts.contains(f), "prometheus mounts {f}: {mounts}");
    }
    assert!(
        p["entrypoint"]
            .to_string()
            .contains("/etc/prometheus/secrets/api-token")
            && p["tmpfs"].to_string().contains("/etc/prometheus/secrets"),
        "prometheus gets the API token as the file prometheus.yml names"
    );
    let g = services["grafana"]["volumes"].to_string();
    assert!(
        g.contains("provisioning") && g.contains("dashboards"),
        "grafana provisioned: {g}"
    );
}

/// `30s`, `1m` → seconds (the forms these files use).
fn humantime(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration {s}"));
    match unit {
        "" | "s" => n,
        "m" => n * 60,
        u => panic!("unit {u} in {s}"),
    }
}

// ------------------------------------------------------------ Kubernetes

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "manifests: {files:?}");
    files
}

#[test]
fn kubernetes_manifests_validate_strictly() {
    let Some(kv) = kubernetes_validate() else {
        return;
    };
    let files = manifests();
    for version in KUBERNETES_VERSIONS {
        let out = run(Command::new(&kv)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(&files));
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version}: {}",
            stderr(&out)
        );
    }

    // What the schemas cannot say.
    let python = python_with_yaml(&kv);
    let docs: Vec<Value> = files
        .iter()
        .flat_map(|f| yaml_docs(&python, &read(f)))
        .collect();
    let find = |kind: &str, name: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind}/{name} exists"))
    };
    let drain = humantime(
        find("ConfigMap", "cascade")["data"]["CASCADE_DRAIN_TIMEOUT"]
            .as_str()
            .expect("CASCADE_DRAIN_TIMEOUT"),
    );
    for (name, role) in [
        ("origin", "origin"),
        ("origin-standby", "origin"),
        ("ingest", "ingest"),
        ("edge", "edge"),
    ] {
        let d = find("Deployment", &format!("cascade-{name}"));
        let pod = &d["spec"]["template"]["spec"];
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        assert!(
            grace > drain + 5,
            "{role}: grace {grace} s > drain {drain} s"
        );
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"], true,
            "{role} not root"
        );
        for c in pod["containers"].as_array().unwrap() {
            assert_eq!(c["args"][0], role, "{role}: the container runs its role");
            assert_eq!(
                c["readinessProbe"]["httpGet"]["path"], "/healthz",
                "{role}: ready on /healthz (503 while draining)"
            );
            assert!(
                c["livenessProbe"]["httpGet"].is_null(),
                "{role}: liveness must not use /healthz, which fails while draining"
            );
            let pre = c["lifecycle"]["preStop"]["exec"]["command"].to_string();
            assert!(
                pre.contains("/api/drain")
                    && pre.contains("$CASCADE_API_TOKEN")
                    && pre.contains("sleep"),
                "{role}: preStop drains with the API token and waits: {pre}"
            );
            let env = c["env"].as_array().unwrap();
            let secret_ref = |name: &str| {
                env.iter()
                    .find(|e| e["name"] == name)
                    .map(|e| e["valueFrom"]["secretKeyRef"]["name"] == "cascade")
            };
            assert_eq!(
                secret_ref("CASCADE_CLUSTER_SECRET"),
                Some(true),
                "{role}: secret from the Secret"
            );
            assert_eq!(
                secret_ref("CASCADE_API_TOKEN"),
                Some(true),
                "{role}: API token from the Secret"
            );
            assert!(
                c["resources"]["requests"]["cpu"].is_string()
                    && c["resources"]["limits"]["memory"].is_string(),
                "{role}: resources"
            );
        }
    }
    let edge = &find("Deployment", "cascade-edge")["spec"]["template"]["spec"];
    assert_eq!(edge["hostNetwork"], true, "edges on the node's network");
    let adv = edge["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "CASCADE_ADVERTISE")
        .expect("edges set CASCADE_ADVERTISE");
    assert_eq!(adv["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");

    let ports = |svc: &Value| -> BTreeSet<(u64, String)> {
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["port"].as_u64().unwrap(),
                    p["protocol"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert!(ports(find("Service", "cascade-origin")).contains(&(4433, "UDP".into())));
    assert!(ports(find("Service", "cascade-origin-standby")).contains(&(4433, "UDP".into())));
    // The two origins never share a Service: each selects its own pods.
    let selector = |name: &str| find("Service", name)["spec"]["selector"].to_string();
    assert_ne!(
        selector("cascade-origin"),
        selector("cascade-origin-standby")
    );
    for role in ["ingest", "edge"] {
        let args = find("Deployment", &format!("cascade-{role}"))["spec"]["template"]["spec"]
            ["containers"][0]["args"]
            .to_string();
        assert!(
            args.contains(r#""--origin","cascade-origin:4433","--origin-standby","cascade-origin-standby:4433""#),
            "{role} dials the origin, then the standby: {args}"
        );
    }
    let ingest = ports(find("Service", "cascade-ingest"));
    for p in [(1935, "TCP"), (8080, "TCP"), (8189, "UDP"), (8189, "TCP")] {
        assert!(
            ingest.contains(&(p.0, p.1.into())),
            "ingest Service has {p:?}"
        );
    }

    let hpa = find("HorizontalPodAutoscaler", "cascade-edge");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "cascade-edge");
    assert!(
        hpa["spec"]["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["type"] == "Pods" && m["pods"]["metric"]["name"] == "cascade_edge_viewers"),
        "the HPA scales on viewers per edge pod"
    );
    let pdb = find("PodDisruptionBudget", "cascade-edge");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        find("Deployment", "cascade-edge")["spec"]["selector"]["matchLabels"]
    );
    assert!(
        find("ConfigMap", "prometheus-adapter-cascade")["data"]["config.yaml"]
            .as_str()
            .unwrap()
            .contains("cascade_edge_viewers"),
        "the adapter serves the HPA's metric"
    );
    let secret = find("Secret", "cascade");
    for (k, v) in secret["stringData"].as_object().unwrap() {
        assert_eq!(v, "", "the example Secret holds no value for {k}");
    }
}

// ------------------------------------------------------------ Prometheus

#[test]
fn promtool_accepts_rules_and_config() {
    let Some(promtool) = tool("promtool", &[]) else {
        return;
    };
    let out = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(deploy("prometheus/alerts.yml")));
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        stderr(&out)
    );
    let out = run(Command::new(&promtool)
        .args(["test", "rules"])
        .arg(deploy("prometheus/alerts_test.yml")));
    assert!(
        out.status.success(),
        "promtool test rules: {}",
        stderr(&out)
    );

    // The config names its token file relative to itself; compose writes it
    // at start. Check the unchanged files next to a stand-in token.
    let dir = tempfile::tempdir().unwrap();
    for f in ["prometheus.yml", "alerts.yml"] {
        std::fs::copy(deploy("prometheus").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/api-token"), "stand-in").unwrap();
    let out = run(Command::new(&promtool)
        .args(["check", "config"])
        .arg(dir.path().join("prometheus.yml")));
    assert!(
        out.status.success(),
        "promtool check config: {}",
        stderr(&out)
    );
}

// ------------------------------------------------------------ metric names

/// PromQL words that are not metric names.
const PROMQL_WORDS: &[&str] = &[
    // aggregations (may be followed by `by (...)` rather than `(`)
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    // binary operators and modifiers
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
];

/// Words followed by a parenthesised label list, not an expression.
const LABEL_LIST_WORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression (or a Grafana query such as
/// `label_values(up, instance)`) selects: identifiers that are not
/// functions, keywords, label names or label values.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    // Grafana's `label_values(selector, label)`: only the selector names a
    // metric (`label_values(label)` names none).
    if let Some(args) = expr
        .trim()
        .strip_prefix("label_values(")
        .and_then(|a| a.strip_suffix(')'))
    {
        return match args.rsplit_once(',') {
            Some((selector, _label)) => promql_metrics(selector),
            None => BTreeSet::new(),
        };
    }
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let skip_string = |i: usize| -> usize {
        let q = b[i];
        let mut j = i + 1;
        while j < b.len() && b[j] != q {
            j += if b[j] == b'\\' { 2 } else { 1 };
        }
        j + 1
    };
    // Skips a bracketed block (`{...}`, `[...]`, `(...)` of labels), strings inside included.
    let skip_block = |i: usize, open: u8, close: u8| -> usize {
        let mut depth = 0;
        let mut j = i;
        while j < b.len() {
            match b[j] {
                b'"' | b'\'' | b'`' => {
                    j = skip_string(j);
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return j + 1;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        panic!("unbalanced {} in {expr}", open as char)
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => i = skip_string(i),
            b'{' => i = skip_block(i, b'{', b'}'),
            b'[' => i = skip_block(i, b'[', b']'),
            b'$' => {
                // Grafana variables: $name, ${name}, $__rate_interval
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i = skip_block(i, b'{', b'}');
                } else {
                    while i < b.len() && ident(b[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                // numbers, durations (`1m` after offset), exponents
                while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                    i += 1;
                }
            }
            c if ident(c) => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                let next = b.get(j).copied();
                if LABEL_LIST_WORDS.contains(&word) {
                    if next == Some(b'(') {
                        i = skip_block(j, b'(', b')');
                    }
                } else if PROMQL_WORDS.contains(&word) || next == Some(b'(') {
                    // an aggregation, keyword or function call
                } else {
                    names.insert(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn promql_metric_names_are_found() {
    let got = promql_metrics(
        "sum by (instance, le) (rate(a_seconds_bucket{role=\"edge\", x=~\"b|c\"}[5m])) / on (instance) group_left b_total\n or vector(0) > 0.5 and c offset 1m",
    );
    assert_eq!(
        got,
        ["a_seconds_bucket", "b_total", "c"]
            .map(String::from)
            .into()
    );
    let got = promql_metrics(
        "histogram_quantile(0.99, sum(rate(x_bucket[$__rate_interval])) by (le)) * 1e3",
    );
    assert_eq!(got, ["x_bucket"].map(String::from).into());
    assert_eq!(
        promql_metrics("label_values(up{job=\"cascade\"}, instance)"),
        ["up"].map(String::from).into()
    );
    assert_eq!(
        promql_metrics("(sum(a{k='v'}) or vector(0)) + max without (pod) (b{x=\"}\"})"),
        ["a", "b"].map(String::from).into()
    );
}

/// Metric name → Prometheus type, from a `/metrics` text's `# TYPE` lines.
fn scraped_types(text: &str, into: &mut BTreeMap<String, String>) {
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(n), Some(t)) = (it.next(), it.next()) {
                into.insert(n.to_string(), t.to_string());
            }
        }
    }
}

/// Metric name → type from the `describe_counter!` / `describe_gauge!` /
/// `describe_histogram!` calls of every file `describe_metrics` in
/// `src/node.rs` reaches: names that have not fired in the run still count.
fn described_types() -> BTreeMap<String, String> {
    let node = read(&repo().join("src/node.rs"));
    let body = node
        .split("fn describe_metrics()")
        .nth(1)
        .and_then(|r| r.split("\n}").next())
        .map(|b| b.trim_start().trim_start_matches('{'))
        .expect("describe_metrics in src/node.rs");
    let mut files = Vec::new();
    for call in body.split(';').map(str::trim).filter(|c| !c.is_empty()) {
        let path = call.trim_end_matches("()");
        let parts: Vec<&str> = path.split("::").collect();
        let file = match parts.as_slice() {
            [krate, "metrics", "describe"] if krate.starts_with("cascade_") => repo()
                .join(krate.trim_start_matches("cascade_"))
                .join("src/metrics.rs"),
            ["crate", module, _] => {
                let flat = repo().join("src").join(format!("{module}.rs"));
                if flat.exists() {
                    flat
                } else {
                    repo().join("src").join(module).join("mod.rs")
                }
            }
            _ => panic!("describe_metrics calls {call:?}: teach tests/deploy.rs where it lives"),
        };
        files.push(file);
    }
    assert!(
        files.len() >= 4,
        "describe_metrics reaches the crates: {files:?}"
    );
    let mut out = BTreeMap::new();
    for file in files {
        let text = read(&file);
        // const NAME: &str = "cascade_...";
        let mut consts = BTreeMap::new();
        for l in text.lines() {
            let l = l
                .trim()
                .trim_start_matches("pub ")
                .trim_start_matches("pub(crate) ");
            let Some(rest) = l.strip_prefix("const ") else {
                continue;
            };
            let Some((name, value)) = rest.split_once(": &str = \"") else {
                continue;
            };
            if let Some(v) = value.strip_suffix("\";") {
                consts.insert(name.trim().to_string(), v.to_string());
            }
        }
        for (macro_name, kind) in [
            ("describe_counter!(", "counter"),
            ("describe_gauge!(", "gauge"),
            ("describe_histogram!(", "histogram"),
        ] {
            for piece in text.split(macro_name).skip(1) {
                let arg = piece.trim_start();
                let first: String = arg
                    .chars()
                    .take_while(|c| !matches!(c, ',' | ')'))
                    .collect::<String>()
                    .trim()
                    .to_string();
                let name = if let Some(lit) = first.strip_prefix('"') {
                    lit.trim_end_matches('"').to_string()
                } else {
                    let key = first.rsplit("::").next().unwrap();
                    consts
                        .get(key)
                        .unwrap_or_else(|| {
                            panic!("{}: {macro_name}{first}: no such const", file.display())
                        })
                        .clone()
                };
                out.insert(name, kind.to_string());
            }
        }
    }
    out
}

/// The names a query may use for `name` of `kind`: histograms read as
/// `_bucket`, `_sum`, `_count`.
fn series_names(name: &str, kind: &str) -> Vec<String> {
    match kind {
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .collect(),
        "summary" => vec![
            name.to_string(),
            format!("{name}_sum"),
            format!("{name}_count"),
        ],
        _ => vec![name.to_string()],
    }
}

/// Every query of the dashboard: panel targets (rows nest panels) and
/// template variables.
fn dashboard_queries(dash: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::Object(q)) => {
                            if let Some(Value::String(s)) = q.get("query") {
                                out.push(s.clone());
                            }
                        }
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    out
}

/// What Grafana would otherwise show as a broken or garbled dashboard:
/// duplicate panel ids, panels on top of each other or off the 24-column
/// grid, a panel without a query.
fn assert_dashboard_layout(dash: &Value) {
    assert_eq!(dash["uid"], "cascade");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeMap::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "panel id of {title} is unique"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(
            w > 0 && h > 0 && x + w <= 24,
            "{title}: on the 24-column grid"
        );
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.to_string()) {
                    panic!("panels {other} and {title} overlap at ({cx}, {cy})");
                }
            }
        }
        if p["type"] != "row" {
            let targets = p["targets"].as_array().expect("targets");
            assert!(
                !targets.is_empty()
                    && targets
                        .iter()
                        .all(|t| t["expr"].is_string() && t["refId"].is_string()),
                "{title}: every target has a query and a refId"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_alerts_and_autoscaler_name_exported_metrics() {
    let Some(kv) = kubernetes_validate() else {
        return;
    };
    let python = python_with_yaml(&kv);

    // What each consumer queries.
    let dash: Value = serde_json::from_str(&read(&deploy("grafana/dashboards/cascade.json")))
        .expect("dashboard is JSON");
    let mut queries: Vec<(String, String)> = dashboard_queries(&dash)
        .into_iter()
        .map(|q| ("dashboard".to_string(), q))
        .collect();
    assert!(
        queries.len() >= 20,
        "the dashboard has its panels: {}",
        queries.len()
    );
    let alerts = yaml_file(&python, &deploy("prometheus/alerts.yml"));
    for g in alerts["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap();
            queries.push((
                format!("alert {name}"),
                r["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for f in manifests() {
        for d in yaml_docs(&python, &read(&f)) {
            if d["kind"] == "HorizontalPodAutoscaler" {
                for m in d["spec"]["metrics"].as_array().unwrap() {
                    if let Some(n) = m["pods"]["metric"]["name"].as_str() {
                        queries.push(("hpa".into(), n.to_string()));
                    }
                }
            }
            if let Some(cfg) = d["data"]["config.yaml"].as_str() {
                for rule in yaml_docs(&python, cfg)[0]["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let q = rule["seriesQuery"].as_str().unwrap();
                    queries.push(("prometheus-adapter".into(), q.to_string()));
                }
            }
        }
    }

    // The dashboard covers what operators look at.
    let all = queries
        .iter()
        .map(|(_, q)| q.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "cascade_edge_viewers",
        "histogram_quantile(0.99, sum by (instance, le) (rate(cascade_edge_egress_delay_seconds_bucket",
        "cascade_edge_first_frame_seconds_bucket",
        "cascade_rtc_datagrams_out_total",
        "cascade_origin_relay_links",
        "cascade_rtc_sessions_refused_total",
    ] {
        assert!(all.contains(needle), "a query uses {needle}");
    }
    let ds = yaml_file(
        &python,
        &deploy("grafana/provisioning/datasources/prometheus.yaml"),
    );
    let uid = ds["datasources"][0]["uid"].as_str().unwrap();
    let mut uids = BTreeSet::new();
    fn datasource_uids(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Object(d)) = m.get("datasource") {
                    if let Some(Value::String(u)) = d.get("uid") {
                        out.insert(u.clone());
                    }
                }
                m.values().for_each(|v| datasource_uids(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| datasource_uids(v, out)),
            _ => {}
        }
    }
    datasource_uids(&dash, &mut uids);
    assert_eq!(
        uids,
        [uid.to_string()].into(),
        "panels use the provisioned datasource"
    );
    assert_dashboard_layout(&dash);

    // What the binary exports: a split cluster after a publish and a view.
    let origin = common::Node::start(
        "origin",
        &["--cluster-secret", common::SECRET, "--quic", "127.0.0.1:0"],
    );
    let quic = origin.quic.clone().expect("origin relay address");
    let ingest = common::Node::start(
        "ingest",
        &["--cluster-secret", common::SECRET, "--origin", &quic],
    );
    let edge = common::Node::start(
        "edge",
        &["--cluster-secret", common::SECRET, "--origin", &quic],
    );
    let publisher = common::publish(&ingest.http, "deploy", common::media(30).await, 0).await;
    common::wait_live(&origin.http, "deploy").await;
    let report = common::view(&edge.http, "deploy", 2).await;
    assert!(
        report.connected && report.video_frames > 0,
        "the view plays: {report:?}"
    );
    let mut exported = BTreeMap::new();
    for node in [&origin, &ingest, &edge] {
        let text = reqwest::get(format!("{}/metrics", node.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        scraped_types(&text, &mut exported);
    }
    let _ = publisher.stop().await;
    let scraped = exported.len();
    for name in [
        "cascade_edge_viewers",
        "cascade_origin_relay_links",
        "cascade_edge_first_frame_seconds",
    ] {
        assert!(exported.contains_key(name), "the run exported {name}");
    }
    for (name, kind) in described_types() {
        exported.entry(name).or_insert(kind);
    }
    eprintln!(
        "{scraped} metrics scraped, {} with the described ones",
        exported.len()
    );
    let series: BTreeSet<String> = exported
        .iter()
        .flat_map(|(n, k)| series_names(n, k))
        .chain(PROMETHEUS_METRICS.iter().map(|s| s.to_string()))
        .collect();

    let mut unknown = Vec::new();
    for (who, q) in &queries {
        let names = promql_metrics(q);
        assert!(!names.is_empty(), "{who}: no metric in {q}");
        for n in names {
            if !series.contains(&n) {
                unknown.push(format!("{who}: {n} (in {q})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics the binary does not export:\n{}",
        unknown.join("\n")
    );
    drop((origin, ingest, edge));
}
