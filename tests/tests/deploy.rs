//! The deploy/ files, checked: systemd units (`systemd-analyze verify` and `security`),
//! Prometheus config, alerts and their unit tests (`promtool`), the Grafana dashboard,
//! the container files and the Kubernetes manifests (parsed and checked against each
//! other and the example configs), and the example configs run by the real programs.
//! Every metric name in the alerts and the dashboard must be one Ferry exports (README's
//! metrics table), so renaming a metric fails here rather than silently blanking a panel.
//!
//! Tools: `systemd-analyze` (package systemd), `promtool` (prometheus), and a Python 3
//! with PyYAML (python3-yaml) to read YAML; .ci/run installs them. A check whose tool is
//! missing prints `SKIPPED: <check>: <reason>`, or fails with FERRY_REQUIRE_NETLAB=1 (CI).
//!
//! Public ports of this file: 22900-22909 (no node registers, so none is bound).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

/// The relay's default drain timeout (SPEC §6: graceful drain): stop timeouts must
/// exceed it so a drain is never cut short by SIGKILL.
const DRAIN_TIMEOUT_SECS: u64 = 30;

/// Labels Prometheus itself attaches to every scraped series (`le` on histogram buckets).
const TARGET_LABELS: &[&str] = &["job", "instance", "le"];

fn repo() -> PathBuf {
    repo_root()
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------
// Tools and skipping

fn required() -> bool {
    std::env::var("FERRY_REQUIRE_NETLAB").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Reports that `check` cannot run: `SKIPPED: …` on stderr, or a panic in CI.
fn skip(check: &str, reason: &str) {
    if required() {
        panic!(
            "FERRY_REQUIRE_NETLAB=1 but {check} cannot run: {reason} (bash .ci/run installs it)"
        );
    }
    // Straight to the process's stderr, so the skip shows even in a passing test.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {check}: {reason}");
}

/// `name` from PATH (or /usr/bin, /usr/sbin, which a trimmed PATH may lack).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn tool(check: &str, name: &str, package: &str) -> Option<PathBuf> {
    let found = find_tool(name);
    if found.is_none() {
        skip(
            check,
            &format!("{name} not found (Debian package {package})"),
        );
    }
    found
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` and panics with its output unless it succeeds.
fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = output(cmd);
    let all = text(&out);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{all}",
        out.status
    );
    all
}

/// A Python 3 that can `import yaml`: PATH's first (which may be a pyenv or venv one
/// without PyYAML), else Debian's /usr/bin/python3 with python3-yaml.
fn python_with_yaml() -> Option<&'static Path> {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            ["python3", "/usr/bin/python3"].into_iter().find_map(|py| {
                let ok = Command::new(py)
                    .args(["-c", "import yaml"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                ok.then(|| PathBuf::from(py))
            })
        })
        .as_deref()
}

/// Every document of a YAML file as JSON (PyYAML's safe loader, so tags and anchors
/// that a Kubernetes or Compose parser would reject fail here too); `None` after a
/// skip when no Python with PyYAML is available.
fn yaml_docs(check: &str, path: &Path) -> Option<Vec<Value>> {
    let Some(python) = python_with_yaml() else {
        skip(
            check,
            "no python3 with PyYAML (Debian package python3-yaml)",
        );
        return None;
    };
    const SCRIPT: &str = "import sys, json, yaml\n\
        docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let out = output(Command::new(python).args(["-c", SCRIPT]).arg(path));
    assert!(
        out.status.success(),
        "{} is not valid YAML:\n{}",
        path.display(),
        text(&out)
    );
    let docs: Value = serde_json::from_slice(&out.stdout).expect("JSON from the YAML helper");
    Some(docs.as_array().expect("list of documents").clone())
}

fn yaml_doc(check: &str, path: &Path) -> Option<Value> {
    let mut docs = yaml_docs(check, path)?;
    assert_eq!(
        docs.len(),
        1,
        "{}: expected one YAML document",
        path.display()
    );
    Some(docs.remove(0))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

fn list_at<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no list at {pointer} in {v}"))
}

/// `key = "value"` of a flat TOML file (the example configs are flat); enough to
/// cross-check values. The programs themselves check the files in full.
fn toml_value(toml: &str, key: &str) -> Option<String> {
    toml.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

fn port_range(spec: &str) -> (u16, u16) {
    let (lo, hi) = spec.split_once('-').expect("LO-HI");
    (lo.parse().expect("port"), hi.parse().expect("port"))
}

/// "45s", "45", "2min" → seconds (the forms these files use).
fn seconds(spec: &str) -> u64 {
    let spec = spec.trim();
    if let Some(m) = spec.strip_suffix("min") {
        return m.parse::<u64>().expect("minutes") * 60;
    }
    spec.trim_end_matches('s').parse().expect("seconds")
}

// ---------------------------------------------------------------------------------
// The metric names Ferry exports

/// What a PromQL expression refers to.
#[derive(Debug, Default)]
struct Refs {
    /// `ferry_*` names, each with the label names of its `{...}` selector.
    metrics: Vec<(String, Vec<String>)>,
    /// Names with a colon: recording rules.
    recorded: Vec<String>,
    /// Label names in `by (...)` and `without (...)`.
    grouping: Vec<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A small PromQL scanner: skips strings, numbers, durations and Grafana variables
/// (`$job`, `${datasource}`, `$__rate_interval`), and collects identifiers.
fn promql_refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    let skip_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    let skip_string = |j: usize| {
        let quote = chars[j];
        let mut k = j + 1;
        while k < chars.len() && chars[k] != quote {
            if chars[k] == '\\' {
                k += 1;
            }
            k += 1;
        }
        k + 1
    };
    let ident_end = |mut j: usize| {
        while j < chars.len() && is_ident(chars[j]) {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i);
        } else if c == '$' {
            i += 1;
            if i < chars.len() && chars[i] == '{' {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                i = ident_end(i);
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let end = ident_end(i);
            let word: String = chars[i..end].iter().collect();
            let next = skip_space(end);
            if word == "by" || word == "without" {
                if next < chars.len() && chars[next] == '(' {
                    let mut j = next + 1;
                    while j < chars.len() && chars[j] != ')' {
                        if is_ident_start(chars[j]) {
                            let e = ident_end(j);
                            refs.grouping.push(chars[j..e].iter().collect());
                            j = e;
                        } else {
                            j += 1;
                        }
                    }
                    i = j + 1;
                    continue;
                }
            } else if word.contains(':') {
                refs.recorded.push(word.clone());
            }
            if word.starts_with("ferry_") {
                let mut labels = Vec::new();
                let mut j = next;
                if j < chars.len() && chars[j] == '{' {
                    j += 1;
                    while j < chars.len() && chars[j] != '}' {
                        if chars[j] == '"' || chars[j] == '\'' || chars[j] == '`' {
                            j = skip_string(j);
                        } else if is_ident_start(chars[j]) {
                            let e = ident_end(j);
                            labels.push(chars[j..e].iter().collect());
                            j = e;
                        } else {
                            j += 1;
                        }
                    }
                    i = j + 1;
                } else {
                    i = end;
                }
                refs.metrics.push((word, labels));
                continue;
            }
            i = end;
        } else {
            i += 1;
        }
    }
    refs
}

/// Checks every name and label `expr` uses against what Ferry exports and what
/// rules.yml records; returns the problems found.
fn check_expr(
    place: &str,
    expr: &str,
    known: &BTreeMap<String, BTreeSet<String>>,
    recorded: &BTreeSet<String>,
) -> Vec<String> {
    let refs = promql_refs(expr);
    let all_labels: BTreeSet<&str> = known
        .values()
        .flatten()
        .map(String::as_str)
        .chain(TARGET_LABELS.iter().copied())
        .collect();
    let mut problems = Vec::new();
    for (name, labels) in &refs.metrics {
        let base = readme_metric_family(name, known);
        let Some(allowed) = known.get(base) else {
            problems.push(format!("{place}: metric {name} is not exported by Ferry"));
            continue;
        };
        for label in labels {
            if !allowed.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                problems.push(format!("{place}: {name} has no label {label}"));
            }
        }
    }
    for name in &refs.recorded {
        if !recorded.contains(name) {
            problems.push(format!("{place}: {name} is not recorded by rules.yml"));
        }
    }
    for label in &refs.grouping {
        if !all_labels.contains(label.as_str()) {
            problems.push(format!("{place}: no Ferry metric has a label {label}"));
        }
    }
    problems
}

/// The Grafana dashboard: every panel query, plus the variables' queries.
fn dashboard() -> Value {
    let path = deploy("grafana/ferry-relay.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in list_at(dash, "/panels") {
        let title = str_at(panel, "/title");
        for target in panel
            .get("targets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            exprs.push((
                format!("dashboard panel {title:?}"),
                str_at(target, "/expr").to_string(),
            ));
        }
    }
    for var in list_at(dash, "/templating/list") {
        if let Some(q) = var.pointer("/query/query").and_then(Value::as_str) {
            exprs.push((
                format!("dashboard variable {}", str_at(var, "/name")),
                q.to_string(),
            ));
        }
    }
    exprs
}

// ---------------------------------------------------------------------------------
// systemd

const UNITS: &[(&str, &str)] = &[
    ("ferry-relay", "--config /etc/ferry/relay.toml"),
    ("ferry-shim", "run --config /etc/ferry/shim.toml"),
    ("ferry-rendezvous", "--config /etc/ferry/rendezvous.toml"),
];

/// `(section, key, value)` of every setting in a unit file.
fn unit_settings(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

#[test]
fn systemd_units_are_hardened_and_pass_systemd_analyze() {
    for (name, args) in UNITS {
        let path = deploy(&format!("systemd/{name}.service"));
        let unit = read(&path);
        let settings = unit_settings(&unit);
        let values = |key: &str| -> Vec<&str> {
            settings
                .iter()
                .filter(|(s, k, _)| s == "Service" && k == key)
                .map(|(_, _, v)| v.as_str())
                .collect()
        };
        let one = |key: &str| -> &str {
            let v = values(key);
            assert_eq!(v.len(), 1, "{name}: expected one {key}= line, got {v:?}");
            v[0]
        };

        // What the brief and SPEC ask of every unit, so a lost line fails here even
        // where systemd-analyze is missing.
        assert_eq!(one("ExecStart"), format!("/usr/local/bin/{name} {args}"));
        assert_eq!(one("DynamicUser"), "yes", "{name}");
        assert_eq!(one("StateDirectory"), *name, "{name}: $STATE_DIRECTORY");
        for (key, want) in [
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("NoNewPrivileges", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("CapabilityBoundingSet", ""),
            ("Restart", "on-failure"),
            ("KillSignal", "SIGTERM"),
        ] {
            assert_eq!(one(key), want, "{name}: {key}");
        }
        let families: BTreeSet<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
        let mut want: BTreeSet<&str> = ["AF_INET", "AF_INET6", "AF_UNIX"].into();
        if *name == "ferry-shim" {
            // getifaddrs(3) for the shim's direct-path candidates.
            want.insert("AF_NETLINK");
        }
        assert_eq!(families, want, "{name}: RestrictAddressFamilies");
        assert!(
            values("SystemCallFilter").contains(&"@system-service"),
            "{name}: SystemCallFilter=@system-service"
        );
        let nofile: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE number");
        assert!(nofile >= 65536, "{name}: LimitNOFILE={nofile} is too low");
        let stop = seconds(one("TimeoutStopSec"));
        if *name == "ferry-relay" {
            assert!(nofile >= 1 << 20, "the relay holds a socket per node");
            assert!(
                stop > DRAIN_TIMEOUT_SECS,
                "TimeoutStopSec={stop} would SIGKILL a relay during its {DRAIN_TIMEOUT_SECS} s drain"
            );
        }
        assert!(
            settings
                .iter()
                .any(|(s, k, v)| s == "Install" && k == "WantedBy" && v == "multi-user.target"),
            "{name}: WantedBy=multi-user.target"
        );
    }

    let check = "systemd-analyze verify";
    let Some(analyze) = tool(check, "systemd-analyze", "systemd") else {
        return;
    };
    // The units name /usr/local/bin/<program>, which CI does not install, and verify
    // rightly fails on a missing executable. So each unit is verified as a copy in a
    // temporary directory whose ExecStart names the freshly built binary: everything
    // else is the file as shipped, and the executable check stays meaningful.
    // `verify` exits 0 on unknown keys and bad values (it only warns), so any output
    // that names the unit counts as a failure too.
    let dir = TempDir::new("deploy-units");
    for (name, _) in UNITS {
        let unit = read(&deploy(&format!("systemd/{name}.service")));
        let built = bin(name);
        let copy = unit.replace(
            &format!("/usr/local/bin/{name}"),
            built.to_str().expect("utf-8 path"),
        );
        let path = dir.path().join(format!("{name}.service"));
        std::fs::write(&path, copy).unwrap();
        let out = output(
            Command::new(&analyze)
                .args(["verify", "--man=no"])
                .arg(&path),
        );
        let all = text(&out);
        assert!(out.status.success(), "{check} {name}.service:\n{all}");
        let complaints: Vec<&str> = all.lines().filter(|l| l.contains(name)).collect();
        assert!(
            complaints.is_empty(),
            "{check} warns about {name}.service:\n{}",
            complaints.join("\n")
        );

        // Exposure score of the hardening (0 = locked down, 10 = none); the units
        // score 1.1. Fails when it rises above 1.5, e.g. a lost CapabilityBoundingSet=.
        let out = output(
            Command::new(&analyze)
                .args(["security", "--offline=yes", "--threshold=15", "--no-pager"])
                .arg(&path),
        );
        let all = text(&out);
        let score = all
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("(no score)");
        assert!(
            out.status.success(),
            "systemd-analyze security {name}: {score} (threshold 1.5):\n{all}"
        );
        println!("{name}.service: {}", score.trim());
    }

    // The warning detection above works: a misspelt key and a bad value are reported.
    let broken = dir.path().join("ferry-broken.service");
    let relay = read(&dir.path().join("ferry-relay.service"))
        .replace("ProtectHome=yes", "ProtectHme=yes")
        .replace("RestrictRealtime=yes", "RestrictRealtime=maybe");
    std::fs::write(&broken, relay).unwrap();
    let out = output(
        Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&broken),
    );
    let all = text(&out);
    assert!(
        all.contains("ProtectHme") && all.contains("maybe"),
        "{check} no longer reports bad settings; the check above would miss them:\n{all}"
    );
}

// ---------------------------------------------------------------------------------
// Prometheus

#[test]
fn prometheus_config_rules_and_rule_tests_pass_promtool() {
    let check = "promtool";
    let Some(promtool) = tool(check, "promtool", "prometheus") else {
        return;
    };
    let prom = deploy("prometheus");
    run_ok(
        "promtool check config prometheus.yml",
        Command::new(&promtool)
            .args(["check", "config", "prometheus.yml"])
            .current_dir(&prom),
    );
    run_ok(
        "promtool check rules rules.yml",
        Command::new(&promtool)
            .args(["check", "rules", "rules.yml"])
            .current_dir(&prom),
    );
    let out = run_ok(
        "promtool test rules rules_test.yml",
        Command::new(&promtool)
            .args(["test", "rules", "rules_test.yml"])
            .current_dir(&prom),
    );
    assert!(out.contains("SUCCESS"), "{out}");

    // The Kubernetes config names the token file mounted in the Prometheus pod, and
    // promtool insists the file exists: check a copy that points at a temporary one.
    let dir = TempDir::new("deploy-prom");
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "test-token\n").unwrap();
    let k8s = read(&prom.join("prometheus-kubernetes.yml"));
    let mounted = "/etc/prometheus/ferry-admin-token/admin-token";
    assert!(
        k8s.contains(mounted),
        "prometheus-kubernetes.yml: token file"
    );
    std::fs::write(
        dir.path().join("prometheus-kubernetes.yml"),
        k8s.replace(mounted, token.to_str().unwrap()),
    )
    .unwrap();
    std::fs::copy(prom.join("rules.yml"), dir.path().join("rules.yml")).unwrap();
    run_ok(
        "promtool check config prometheus-kubernetes.yml",
        Command::new(&promtool)
            .args(["check", "config", "prometheus-kubernetes.yml"])
            .current_dir(dir.path()),
    );

    // The dashboard's queries parse as PromQL: each becomes a recording rule (Grafana's
    // variables replaced by values), and promtool checks the rule file.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (_, expr)) in dashboard_exprs(&dashboard()).iter().enumerate() {
        if expr.starts_with("label_values(") {
            continue; // Grafana's variable query, not PromQL
        }
        let promql = expr
            .replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        let quoted = serde_json::to_string(&promql).unwrap(); // a valid YAML string
        rules.push_str(&format!(
            "      - record: dashboard:query{n}\n        expr: {quoted}\n"
        ));
    }
    std::fs::write(dir.path().join("dashboard-rules.yml"), rules).unwrap();
    run_ok(
        "promtool check rules (dashboard queries)",
        Command::new(&promtool)
            .args(["check", "rules", "dashboard-rules.yml"])
            .current_dir(dir.path()),
    );
}

#[test]
fn alerts_and_dashboard_use_only_metrics_ferry_exports() {
    let known = readme_metrics();
    let check = "metric names in rules.yml";
    let Some(rules) = yaml_doc(check, &deploy("prometheus/rules.yml")) else {
        return;
    };
    let mut recorded = BTreeSet::new();
    let mut alerts = BTreeSet::new();
    let mut exprs = Vec::new();
    for group in list_at(&rules, "/groups") {
        for rule in list_at(group, "/rules") {
            if let Some(r) = rule.get("record").and_then(Value::as_str) {
                recorded.insert(r.to_string());
            }
            if let Some(a) = rule.get("alert").and_then(Value::as_str) {
                alerts.insert(a.to_string());
            }
            let name = rule
                .get("alert")
                .or(rule.get("record"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            exprs.push((
                format!("rules.yml {name}"),
                str_at(rule, "/expr").to_string(),
            ));
        }
    }
    for alert in [
        "FerryRelayDown",
        "FerryRelayNodesDropped",
        "FerryRelayLimitHits",
        "FerryRelayRefusalsSpike",
        "FerryRelayFleetCutOff",
    ] {
        assert!(alerts.contains(alert), "rules.yml lacks {alert}");
    }

    // The unit tests' input series and queries must use real names too, or they
    // would test alerts against series Ferry never produces.
    if let Some(tests) = yaml_doc(check, &deploy("prometheus/rules_test.yml")) {
        for (n, case) in list_at(&tests, "/tests").iter().enumerate() {
            for series in case
                .get("input_series")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                exprs.push((
                    format!("rules_test.yml test {n} input"),
                    str_at(series, "/series").to_string(),
                ));
            }
            for q in case
                .get("promql_expr_test")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                exprs.push((
                    format!("rules_test.yml test {n} query"),
                    str_at(q, "/expr").to_string(),
                ));
            }
        }
    }

    let dash = dashboard();
    let dash_exprs = dashboard_exprs(&dash);
    let used: BTreeSet<String> = dash_exprs
        .iter()
        .flat_map(|(_, e)| promql_refs(e).metrics.into_iter().map(|(m, _)| m))
        .collect();
    exprs.extend(dash_exprs);

    let mut problems = Vec::new();
    for (place, expr) in &exprs {
        problems.extend(check_expr(place, expr, &known, &recorded));
    }
    assert!(
        problems.is_empty(),
        "names not exported by Ferry (README's metrics table):\n{}",
        problems.join("\n")
    );

    // The dashboard shows what the brief asks of it.
    for metric in [
        "ferry_relay_nodes_connected",
        "ferry_relay_public_ports_bound",
        "ferry_relay_streams_active",
        "ferry_relay_bytes_total",
        "ferry_relay_handshakes_total",
        "ferry_relay_refusals_total",
        "ferry_relay_limit_hits_total",
        "ferry_rendezvous_stun_requests_total",
        "ferry_rendezvous_punch_requests_total",
    ] {
        assert!(
            used.contains(metric),
            "the dashboard does not graph {metric}"
        );
    }

    // The scanner itself: a renamed metric, a wrong label and an unknown recording
    // rule are caught; Grafana variables and durations are not mistaken for names.
    let p = check_expr(
        "self-test",
        r#"sum by (direction) (rate(ferry_relay_byte_total{job=~"$job", dir="x"}[$__rate_interval])) + ferry_relay_streams_active{path="a"} + x:y:z offset 10m"#,
        &known,
        &recorded,
    );
    assert_eq!(p.len(), 3, "{p:#?}");
}

#[test]
fn grafana_dashboard_is_valid() {
    let dash = dashboard();
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert_eq!(str_at(&dash, "/uid"), "ferry-relay");
    let vars = list_at(&dash, "/templating/list");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", str_at(ds, "/name"));

    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for panel in list_at(&dash, "/panels") {
        let title = str_at(panel, "/title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id in {title}"
        );
        titles.insert(title.to_lowercase());
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the 24-column grid");
        assert_eq!(
            str_at(panel, "/datasource/uid"),
            ds_ref,
            "{title}: data source"
        );
        let targets = list_at(panel, "/targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(
                str_at(t, "/datasource/uid"),
                ds_ref,
                "{title}: query data source"
            );
            assert!(!str_at(t, "/expr").is_empty(), "{title}: empty query");
        }
    }
    for want in [
        "relay up",
        "nodes connected",
        "public ports bound",
        "streams active",
        "bytes/s by direction and path",
        "handshakes/s by outcome",
        "refusals/s by reason",
        "limit hits/s by limit",
        "stun requests/s by outcome",
        "punch requests/s by outcome",
    ] {
        assert!(titles.contains(want), "no panel {want:?} in {titles:?}");
    }
}

// ---------------------------------------------------------------------------------
// Container

/// Instructions of a Containerfile: (INSTRUCTION, arguments), continuation lines joined.
fn containerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(part) = trimmed.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (instr, args) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((instr.to_string(), args.trim().to_string()));
        current.clear();
    }
    assert!(current.is_empty(), "Containerfile ends in a continuation");
    out
}

#[test]
fn containerfile_is_well_formed_and_its_healthcheck_works() {
    let containerfile = read(&deploy("container/Containerfile"));
    let instrs = containerfile_instructions(&containerfile);
    const KNOWN: &[&str] = &[
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
    ];
    for (instr, _) in &instrs {
        assert!(
            KNOWN.contains(&instr.as_str()),
            "unknown instruction {instr}"
        );
    }
    let args_of = |name: &str| -> Vec<&str> {
        instrs
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };

    // Two stages on the same Debian release.
    let froms = args_of("FROM");
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].ends_with(" AS build"), "{froms:?}");
    assert!(
        froms.iter().all(|f| f.contains("${DEBIAN_RELEASE}")),
        "both stages use the same Debian release: {froms:?}"
    );

    // The build stage copies every workspace member (cargo needs them all), and each
    // copied path exists.
    let cargo_toml = read(&repo().join("Cargo.toml"));
    let members_line = cargo_toml
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    let copies = args_of("COPY");
    let copied: BTreeSet<&str> = copies
        .iter()
        .filter(|a| !a.starts_with("--from"))
        .flat_map(|a| {
            let words: Vec<&str> = a.split_whitespace().collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    for member in &members {
        assert!(
            copied.contains(member),
            "the build stage does not COPY {member}"
        );
    }
    for src in &copied {
        assert!(repo().join(src).exists(), "COPY {src}: no such path");
    }
    // The ignore file is an allow list ("*", then "!path"): each COPY source must be
    // let back in, or the build would not see it.
    let ignore = read(&deploy("container/Containerfile.dockerignore"));
    let ignore: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        ignore.first(),
        Some(&"*"),
        "Containerfile.dockerignore starts with *"
    );
    for src in &copied {
        assert!(
            ignore.contains(&format!("!{src}").as_str()),
            "Containerfile.dockerignore keeps {src} out of the build context"
        );
    }
    let build = args_of("RUN")
        .into_iter()
        .find(|r| r.contains("cargo build"))
        .expect("a cargo build step");
    assert!(
        build.contains("--locked"),
        "build with the tested Cargo.lock"
    );
    for program in ["ferry-relay", "ferry-shim", "ferry-rendezvous"] {
        assert!(
            build.contains(&format!("target/release/{program}")),
            "{program} is not installed from the build stage"
        );
    }
    assert!(copies.iter().any(|c| c.starts_with("--from=build")));

    // Runs as a fixed non-root user, with a volume that is the programs' data dir.
    let user = args_of("USER");
    assert_eq!(user.len(), 1);
    let uid = user[0].split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "USER {uid}");
    let volume = args_of("VOLUME");
    assert_eq!(volume, ["[\"/var/lib/ferry\"]"]);
    assert!(args_of("ENV").contains(&"STATE_DIRECTORY=/var/lib/ferry"));
    let exposed: BTreeSet<&str> = args_of("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .collect();
    for port in ["7842/udp", "7842/tcp", "3478/udp", "7843/tcp"] {
        assert!(exposed.contains(port), "EXPOSE {port}");
    }
    assert_eq!(args_of("STOPSIGNAL"), ["SIGTERM"]);
    let cmd: Vec<String> = serde_json::from_str(args_of("CMD")[0]).expect("CMD exec form");
    assert_eq!(cmd, ["ferry-relay", "--config", "/etc/ferry/relay.toml"]);

    // The HEALTHCHECK command, run as the engine would (exec form, the image's ENV),
    // against a real relay's admin listener: healthy when it serves, unhealthy when
    // nothing listens.
    let health = args_of("HEALTHCHECK");
    assert_eq!(health.len(), 1);
    let exec = &health[0][health[0].find("CMD ").expect("HEALTHCHECK ... CMD") + 4..];
    let argv: Vec<String> = serde_json::from_str(exec).expect("HEALTHCHECK CMD exec form");
    let default_port = args_of("ENV")
        .iter()
        .find_map(|e| e.strip_prefix("FERRY_HEALTHCHECK_PORT="))
        .expect("ENV FERRY_HEALTHCHECK_PORT");
    assert_eq!(default_port, "7843", "the relay's default admin port");
    let dir = TempDir::new("deploy-health");
    let relay = Relay::start(dir.path(), "22900-22909");
    let admin_port = relay.admin.rsplit(':').next().unwrap().to_string();
    let probe = |port: &str| {
        Command::new(&argv[0])
            .args(&argv[1..])
            .env("FERRY_HEALTHCHECK_PORT", port)
            .output()
            .expect("run the HEALTHCHECK command")
    };
    let out = probe(&admin_port);
    assert!(
        out.status.success(),
        "healthcheck failed against a live relay: {}",
        text(&out)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // bound and dropped: nothing listens there now
    assert!(
        !probe(&closed.to_string()).status.success(),
        "healthcheck passed with nothing listening"
    );
}

#[test]
fn compose_file_runs_the_relay_and_prometheus() {
    let check = "compose.yaml";
    let compose_path = deploy("container/compose.yaml");
    let Some(compose) = yaml_doc(check, &compose_path) else {
        return;
    };
    let base = compose_path.parent().unwrap();
    let relay = &compose["services"]["relay"];
    let prom = &compose["services"]["prometheus"];
    assert!(
        relay.is_object() && prom.is_object(),
        "services relay and prometheus"
    );

    let context = base.join(str_at(relay, "/build/context"));
    assert!(
        context.join(str_at(relay, "/build/dockerfile")).is_file(),
        "build.dockerfile relative to build.context"
    );

    // Published ports: the relay's listen port both ways, STUN, and exactly the
    // public-port range of the relay.toml it mounts.
    let ports: BTreeSet<&str> = list_at(relay, "/ports")
        .iter()
        .map(|p| p.as_str().expect("short port syntax"))
        .collect();
    let relay_toml = read(&deploy("relay.toml"));
    let range = toml_value(&relay_toml, "ports").expect("ports in relay.toml");
    for want in [
        "7842:7842/udp".to_string(),
        "7842:7842/tcp".to_string(),
        "3478:3478/udp".to_string(),
        format!("{range}:{range}/tcp"),
    ] {
        assert!(
            ports.contains(want.as_str()),
            "relay does not publish {want}: {ports:?}"
        );
    }
    // Prometheus's UI is on the host's loopback only; the relay's admin port is not
    // published at all (Prometheus reaches it inside the shared network namespace).
    assert!(ports.contains("127.0.0.1:9090:9090/tcp"), "{ports:?}");
    assert!(
        !ports.iter().any(|p| p.contains("7843")),
        "admin must stay private"
    );

    let mounts = |svc: &Value| -> BTreeMap<String, PathBuf> {
        list_at(svc, "/volumes")
            .iter()
            .filter_map(|v| {
                let parts: Vec<&str> = v.as_str()?.split(':').collect();
                parts[0]
                    .starts_with('.')
                    .then(|| (parts[1].to_string(), base.join(parts[0])))
            })
            .collect()
    };
    let relay_mounts = mounts(relay);
    let config = &relay_mounts["/etc/ferry/relay.toml"];
    assert!(config.is_file(), "{}", config.display());
    let command: Vec<&str> = list_at(relay, "/command")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        command,
        ["ferry-relay", "--config", "/etc/ferry/relay.toml"]
    );
    assert!(
        list_at(relay, "/volumes")
            .iter()
            .any(|v| v.as_str().unwrap().ends_with(":/var/lib/ferry")),
        "the relay's key and ports.json need a volume"
    );
    let grace = seconds(str_at(relay, "/stop_grace_period"));
    assert!(
        grace > DRAIN_TIMEOUT_SECS,
        "stop_grace_period {grace}s cuts the drain"
    );

    // Prometheus scrapes 127.0.0.1:7843 with the unchanged prometheus.yml, which only
    // works inside the relay's network namespace and with the relay's admin there.
    assert_eq!(str_at(prom, "/network_mode"), "service:relay");
    let prom_mounts = mounts(prom);
    for (inside, file) in [
        (
            "/etc/prometheus/prometheus.yml",
            "prometheus/prometheus.yml",
        ),
        ("/etc/prometheus/rules.yml", "prometheus/rules.yml"),
    ] {
        let src = prom_mounts
            .get(inside)
            .unwrap_or_else(|| panic!("prometheus does not mount {inside}"));
        assert_eq!(
            src.canonicalize().unwrap(),
            deploy(file).canonicalize().unwrap()
        );
    }
    let scrape = read(&deploy("prometheus/prometheus.yml"));
    let admin = toml_value(&relay_toml, "admin").expect("admin in relay.toml");
    assert!(
        scrape.contains(&format!("\"{admin}\"")),
        "prometheus.yml does not scrape the relay's admin {admin}"
    );
}

// ---------------------------------------------------------------------------------
// Kubernetes

#[test]
fn kubernetes_manifests_are_consistent_and_their_relay_config_runs() {
    let check = "kubernetes manifests";
    let dir = deploy("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    let mut docs = Vec::new();
    for file in &files {
        let Some(d) = yaml_docs(check, file) else {
            return;
        };
        docs.extend(d);
    }
    for d in &docs {
        for field in ["/apiVersion", "/kind", "/metadata/name"] {
            str_at(d, field);
        }
    }
    let find = |kind: &str| -> Vec<&Value> { docs.iter().filter(|d| d["kind"] == kind).collect() };
    let ns = str_at(find("Namespace")[0], "/metadata/name");
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(
                str_at(d, "/metadata/namespace"),
                ns,
                "{} {}",
                d["kind"],
                d["metadata"]["name"]
            );
        }
    }
    // The namespace is created first when the directory is applied in name order.
    let first = yaml_docs(check, &files[0]).unwrap();
    assert_eq!(
        first[0]["kind"],
        "Namespace",
        "{} sorts first",
        files[0].display()
    );

    let sts = find("StatefulSet")[0];
    let pod = &sts["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    for (k, v) in sts["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "selector label {k}");
    }
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");

    // Headless service: the StatefulSet's serviceName; draining pods stay scrapeable.
    let services = find("Service");
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"] == sts["spec"]["serviceName"])
        .expect("the serviceName Service");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);

    // Drain time, security, volumes.
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(grace > DRAIN_TIMEOUT_SECS, "grace {grace}s cuts the drain");
    let psc = &pod["spec"]["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["fsGroupChangePolicy"], "OnRootMismatch");
    let container = &list_at(pod, "/spec/containers")[0];
    let csc = &container["securityContext"];
    assert_eq!(csc["allowPrivilegeEscalation"], false);
    assert_eq!(csc["readOnlyRootFilesystem"], true);
    assert_eq!(csc["capabilities"]["drop"][0], "ALL");
    let mounts: BTreeMap<&str, &str> = list_at(container, "/volumeMounts")
        .iter()
        .map(|m| (str_at(m, "/name"), str_at(m, "/mountPath")))
        .collect();
    let claims: Vec<&str> = list_at(sts, "/spec/volumeClaimTemplates")
        .iter()
        .map(|c| str_at(c, "/metadata/name"))
        .collect();
    assert_eq!(claims, ["data"]);
    let data_mount = mounts["data"];
    let volumes: BTreeMap<&str, &Value> = list_at(pod, "/spec/volumes")
        .iter()
        .map(|v| (str_at(v, "/name"), v))
        .collect();

    // The relay.toml of the ConfigMap, as the pod sees it.
    let cm = find("ConfigMap")[0];
    let relay_toml = str_at(cm, "/data/relay.toml");
    let args: Vec<&str> = list_at(container, "/args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let config_dir = Path::new(config_path).parent().unwrap().to_str().unwrap();
    let config_volume = mounts
        .iter()
        .find(|(_, path)| **path == config_dir)
        .map(|(name, _)| volumes[name])
        .expect("a volume mounted at the --config directory");
    assert_eq!(
        config_volume["configMap"]["name"], cm["metadata"]["name"],
        "--config comes from the ConfigMap"
    );
    let data_dir = toml_value(relay_toml, "data_dir").expect("data_dir");
    assert!(
        data_dir.starts_with(&format!("{data_mount}/")),
        "data_dir {data_dir} must be a subdirectory of the claim at {data_mount}"
    );
    let admin = toml_value(relay_toml, "admin").expect("admin");
    assert!(
        admin.starts_with("0.0.0.0:"),
        "the kubelet probes the pod IP"
    );
    let admin_port: u64 = admin.rsplit(':').next().unwrap().parse().unwrap();
    let token_file = toml_value(relay_toml, "admin_token_file").expect("a token for admin");
    let token_dir = Path::new(&token_file).parent().unwrap().to_str().unwrap();
    let token_volume = mounts
        .iter()
        .find(|(_, path)| **path == token_dir)
        .map(|(name, _)| volumes[name])
        .expect("a volume at the token's directory");
    assert!(
        token_volume["secret"]["secretName"].is_string(),
        "the admin token comes from a Secret"
    );

    // Probes on the admin port.
    let port_number = |port: &Value| -> u64 {
        port.as_u64().unwrap_or_else(|| {
            list_at(container, "/ports")
                .iter()
                .find(|p| p["name"] == *port)
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("no container port {port}"))
        })
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(port_number(&get["port"]), admin_port, "{probe} port");
    }

    // One LoadBalancer per pod, keeping client addresses, with every port a node or
    // client uses: the Services cannot take a range, so each public port is listed.
    let (lo, hi) = port_range(&toml_value(relay_toml, "ports").expect("ports"));
    let sts_name = str_at(sts, "/metadata/name");
    for i in 0..replicas {
        let pod_name = format!("{sts_name}-{i}");
        let svc = services
            .iter()
            .find(|s| s["metadata"]["name"] == pod_name.as_str())
            .unwrap_or_else(|| panic!("no Service for pod {pod_name}"));
        assert_eq!(svc["spec"]["type"], "LoadBalancer");
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local", "{pod_name}");
        assert_eq!(
            svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"],
            pod_name.as_str()
        );
        let ports: BTreeSet<(u64, &str)> = list_at(svc, "/spec/ports")
            .iter()
            .map(|p| (p["port"].as_u64().unwrap(), str_at(p, "/protocol")))
            .collect();
        let mut want = vec![(7842, "UDP"), (7842, "TCP"), (3478, "UDP")];
        want.extend((lo..=hi).map(|p| (u64::from(p), "TCP")));
        for w in want {
            assert!(ports.contains(&w), "{pod_name} lacks port {w:?}");
        }
    }
    assert_eq!(
        services.len() as u64,
        replicas + 1,
        "one Service per pod plus the headless one"
    );

    let pdb = find("PodDisruptionBudget")[0];
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "PodDisruptionBudget selector {k}");
    }

    // The ConfigMap's relay.toml is a config the relay accepts (unknown keys are
    // errors): run it, with this machine's paths and loopback addresses on the
    // command line, which win over the file. The probes work without the token.
    let tmp = TempDir::new("deploy-k8s");
    let config = tmp.path().join("relay.toml");
    std::fs::write(&config, relay_toml).unwrap();
    let token = tmp.path().join("admin-token");
    std::fs::write(&token, "k8s-test-token\n").unwrap();
    let args: Vec<String> = [
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        tmp.path().join("data").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--stun",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        token.to_str().unwrap(),
        "--public-host",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proc = Proc::start(&bin("ferry-relay"), &args, tmp.path().join("relay.log"));
    let admin_url = proc.ready_field("admin");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    for (path, status) in [("/healthz", 200), ("/readyz", 200), ("/metrics", 401)] {
        let got = agent
            .get(&format!("{admin_url}{path}"))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .status();
        assert_eq!(got.as_u16(), status, "GET {path} without the token");
    }
}

// ---------------------------------------------------------------------------------
// Example configs and the README

#[test]
fn example_rendezvous_config_starts_the_rendezvous() {
    // Addresses on the command line win over the file, so the example's keys are all
    // parsed (an unknown key fails the start) while the test stays on loopback.
    let tmp = TempDir::new("deploy-rdv");
    let example = deploy("rendezvous.toml");
    let text = read(&example);
    for key in ["stun", "listen", "admin"] {
        assert!(
            toml_value(&text, key).is_some(),
            "rendezvous.toml sets {key}"
        );
    }
    let args: Vec<String> = [
        "--config",
        example.to_str().unwrap(),
        "--data-dir",
        tmp.path().join("data").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--stun",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut proc = Proc::start(
        &bin("ferry-rendezvous"),
        &args,
        tmp.path().join("rendezvous.log"),
    );
    assert!(proc.ready_line.starts_with("ferry-rendezvous ready"));
    assert_eq!(proc.ready_field("node_id").len(), 52, "{}", proc.ready_line);
    assert!(tmp.path().join("data/rendezvous.key").is_file());
    proc.terminate();

    // And the file really is what the defaults say: without overrides its addresses
    // are the documented ones.
    assert_eq!(toml_value(&text, "stun").unwrap(), "[::]:3478");
    assert_eq!(toml_value(&text, "listen").unwrap(), "[::]:7842");
    assert_eq!(toml_value(&text, "admin").unwrap(), "127.0.0.1:7845");
}

#[test]
fn every_deploy_file_is_documented_and_says_how_it_is_checked() {
    let readme = read(&deploy("README.md"));
    let mut stack = vec![deploy("")];
    let mut files = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let root = deploy("");
    for path in files {
        let rel = path
            .strip_prefix(&root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        if rel == "README.md" {
            continue;
        }
        assert!(
            readme.contains(&rel),
            "deploy/README.md does not describe {rel}"
        );
        let text = read(&path);
        // JSON has no comments: the dashboard says it in its description.
        let header: String = if rel.ends_with(".json") {
            dashboard()["description"]
                .as_str()
                .unwrap_or("")
                .to_string()
        } else {
            text.lines()
                .take_while(|l| l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert!(!header.is_empty(), "{rel} has no header comment");
        assert!(
            header.contains("tests/tests/deploy.rs") || header.contains("unit test in"),
            "{rel}: the header does not say how the file is checked"
        );
    }
}

#[test]
fn fleet_compose_file_clusters_three_nats_servers_under_two_relays() {
    let check = "compose-fleet.yaml";
    let Some(compose) = yaml_doc(check, &deploy("container/compose-fleet.yaml")) else {
        return;
    };
    let services = compose["services"].as_object().expect("services");
    let args = |name: &str| -> Vec<String> {
        list_at(&services[name], "/command")
            .iter()
            .map(|c| c.as_str().expect("command as a list").to_string())
            .collect()
    };
    let after = |args: &[String], flag: &str| -> String {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} missing in {args:?}"));
        args[i + 1].clone()
    };
    // Three JetStream servers, one cluster, each routing to all three.
    let nats: Vec<&str> = ["nats-1", "nats-2", "nats-3"].to_vec();
    let routes: Vec<String> = nats.iter().map(|n| format!("nats://{n}:6222")).collect();
    for name in &nats {
        let args = args(name);
        assert!(args.contains(&"-js".to_string()), "{name} runs JetStream");
        assert_eq!(after(&args, "-n"), *name);
        assert_eq!(after(&args, "--cluster_name"), "ferry");
        assert_eq!(
            after(&args, "--routes"),
            routes.join(","),
            "{name}'s routes"
        );
        assert!(
            list_at(&services[*name], "/volumes")
                .iter()
                .any(|v| v.as_str() == Some(&format!("{name}:/data"))),
            "{name} keeps its store in its own volume"
        );
    }
    // Two relays of one fleet, each naming every server, with its own data volume
    // and ports that do not collide.
    let clients: Vec<String> = nats.iter().map(|n| format!("nats://{n}:4222")).collect();
    let mut published = BTreeSet::new();
    for relay in ["relay-a", "relay-b"] {
        let args = args(relay);
        assert_eq!(args[0], "ferry-relay");
        assert_eq!(
            after(&args, "--fleet"),
            clients.join(","),
            "{relay}'s --fleet"
        );
        assert_eq!(after(&args, "--fleet-name"), "ferry");
        assert_eq!(after(&args, "--fleet-replicas"), "3");
        assert!(
            list_at(&services[relay], "/volumes")
                .iter()
                .any(|v| v.as_str() == Some(&format!("{relay}:/var/lib/ferry"))),
            "{relay} keeps its key and ports.json in its own volume"
        );
        for port in list_at(&services[relay], "/ports") {
            let port = port.as_str().expect("short port syntax").to_string();
            assert!(published.insert(port.clone()), "{port} published twice");
        }
        assert!(
            seconds(str_at(&services[relay], "/stop_grace_period")) > DRAIN_TIMEOUT_SECS,
            "{relay}'s stop_grace_period cuts the drain"
        );
    }
    // relay-b's published ports are the ones its flags move it to.
    let b = args("relay-b");
    let listen_port = after(&b, "--listen")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let stun_port = after(&b, "--stun").rsplit(':').next().unwrap().to_string();
    let range = after(&b, "--ports");
    for want in [
        format!("{listen_port}:{listen_port}/udp"),
        format!("{listen_port}:{listen_port}/tcp"),
        format!("{stun_port}:{stun_port}/udp"),
        format!("{range}:{range}/tcp"),
    ] {
        assert!(published.contains(&want), "relay-b does not publish {want}");
    }
}
