//! `deploy/kubernetes/`: every manifest validates offline against the Kubernetes schemas
//! (kubernetes-validate, strict, on the oldest and newest versions it bundles that we support),
//! the custom resources hold the fields the Prometheus Operator reads, the PrometheusRule is the
//! project's rules, and the pieces fit together: selectors, ports, probes, the preStop drain the
//! binary accepts, the ConfigMap's config (valid, fleet mode, one seed), the mounts, the budget.

mod common;

use common::tshark::have_tool;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

/// The Kubernetes versions the manifests are checked against.
const VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

/// The manifests kustomization.yaml lists.
fn manifests() -> Vec<PathBuf> {
    let text = std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap();
    let mut out = Vec::new();
    let mut in_resources = false;
    for line in text.lines() {
        if line.starts_with("resources:") {
            in_resources = true;
            continue;
        }
        if in_resources {
            match line.trim().strip_prefix("- ") {
                Some(f) if line.starts_with("  ") => out.push(k8s_dir().join(f)),
                _ => in_resources = false,
            }
        }
    }
    out
}

/// Every document of every manifest as JSON (PyYAML, which yamllint brings), by kind/name.
fn documents() -> Option<BTreeMap<String, Value>> {
    if !have_tool("yamllint", "--version") {
        return None;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             print(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))",
        ])
        .args(manifests())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut by = BTreeMap::new();
    for d in docs {
        let key = format!(
            "{}/{}",
            d["kind"].as_str().unwrap(),
            d["metadata"]["name"].as_str().unwrap()
        );
        assert!(by.insert(key.clone(), d).is_none(), "{key} twice");
    }
    Some(by)
}

#[test]
fn kustomization_lists_every_manifest_in_the_folder() {
    let mut listed: Vec<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    listed.sort();
    let mut present: Vec<String> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    assert_eq!(listed, present);
    assert!(listed.len() >= 9, "{listed:?}");
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    if !have_tool("kubernetes-validate", "--version") {
        return;
    }
    let core: Vec<PathBuf> = manifests()
        .into_iter()
        .filter(|p| {
            // Custom resources have no schema there: checked below.
            !matches!(
                p.file_name().and_then(|n| n.to_str()),
                Some("servicemonitor.yaml" | "prometheusrule.yaml")
            )
        })
        .collect();
    for v in VERSIONS {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "-k", v])
            .args(&core)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{v}: {text}");
        assert!(
            !text.contains("WARN") && !text.contains("ERROR"),
            "{v}: {text}"
        );
        for kind in [
            "namespace/cync-mitm",
            "serviceaccount/cync-mitm",
            "configmap/cync-mitm",
            "deployment/cync-mitm",
            "service/cync-mitm",
            "service/cync-mitm-admin",
            "poddisruptionbudget/cync-mitm",
            "networkpolicy/cync-mitm",
        ] {
            assert!(
                text.contains(&format!("passed for resource {kind} against version")),
                "{v}: {kind} not validated: {text}"
            );
        }
    }
    // The validator is a judge: a misspelt field fails it.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("pdb.yaml");
    let pdb = std::fs::read_to_string(k8s_dir().join("pdb.yaml")).unwrap();
    std::fs::write(&bad, pdb.replace("minAvailable", "minAvailabel")).unwrap();
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Keys of `v` outside `allowed` (the Prometheus Operator's CRDs reject unknown fields too).
fn unknown(v: &Value, allowed: &[&str]) -> Vec<String> {
    v.as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !allowed.contains(&k.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_pieces_fit_together() {
    let Some(docs) = documents() else { return };
    let get = |k: &str| docs.get(k).unwrap_or_else(|| panic!("no {k}"));
    for (k, d) in &docs {
        if k != "Namespace/cync-mitm" {
            assert_eq!(d["metadata"]["namespace"], "cync-mitm", "{k}");
        }
    }
    let dep = get("Deployment/cync-mitm");
    let spec = &dep["spec"];
    assert!(spec["replicas"].as_u64().unwrap() >= 2);
    let pod_labels = &spec["template"]["metadata"]["labels"];
    let selects = |sel: &Value| {
        sel.as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &pod_labels[k] == v)
    };
    assert!(selects(&spec["selector"]["matchLabels"]));
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], "cync-mitm");
    assert!(docs.contains_key("ServiceAccount/cync-mitm"));
    // The user the image runs as (deploy/docker/Dockerfile).
    let dockerfile = std::fs::read_to_string(root().join("deploy/docker/Dockerfile")).unwrap();
    assert!(dockerfile.contains("USER 10001:10001"), "{dockerfile}");
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    let port = |name: &str| -> u64 {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");

    // The config: a ConfigMap mounted as a directory (no subPath: updates reach the watcher).
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mount = |vol: &str| -> &Value {
        mounts
            .iter()
            .find(|m| m["name"] == vol)
            .unwrap_or_else(|| panic!("no mount {vol}"))
    };
    let volume = |vol: &str| -> &Value {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vol)
            .unwrap_or_else(|| panic!("no volume {vol}"))
    };
    assert!(mounts.iter().all(|m| m.get("subPath").is_none()));
    let cfg_dir = mount("config")["mountPath"].as_str().unwrap();
    let cm_name = volume("config")["configMap"]["name"].as_str().unwrap();
    let cm = get(&format!("ConfigMap/{cm_name}"));
    let (key, toml) = cm["data"].as_object().unwrap().iter().next().unwrap();
    let cfg_path = format!("{cfg_dir}/{key}");
    assert_eq!(c["args"], serde_json::json!(["run", "--config", cfg_path]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(key);
    std::fs::write(&file, toml.as_str().unwrap()).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let cfg = cync_mitm::config::Config::load(&file).unwrap();
    assert_eq!(cfg.listen.tls.port() as u64, port("devices"));
    assert!(
        cfg.admin.listen.ip().is_unspecified(),
        "probes reach the pod IP"
    );
    assert_eq!(cfg.admin.listen.port() as u64, port("admin"));
    assert!(cfg.reload.watch);
    assert_ne!(
        cfg.routing.seed,
        cync_mitm::config::Config::default().routing.seed,
        "a fleet's own seed"
    );
    assert_eq!(cfg.slo.source, cync_mitm::config::SloSource::Prometheus);
    assert!(cfg.slo.prometheus_url.starts_with("http://"));
    assert!(
        cfg.slo
            .prometheus_selector
            .contains("job=\"cync-mitm-admin\"")
    );
    // The working directory's certs/ and captures/ are the mounted volumes.
    let workdir = "/var/lib/cync-mitm";
    assert!(dockerfile.contains(&format!("WORKDIR {workdir}")));
    assert_eq!(
        mount("certs")["mountPath"],
        format!("{workdir}/{}", cfg.tls.cert_dir.display())
    );
    let secret = &volume("certs")["secret"];
    assert_eq!(secret["secretName"], "cync-mitm-certs");
    // Readable by the pod's group (fsGroup) and not by others.
    let mode = secret["defaultMode"].as_u64().unwrap();
    assert_eq!(mode & 0o040, 0o040);
    assert_eq!(mode & 0o007, 0);
    assert_eq!(
        mount("captures")["mountPath"],
        format!("{workdir}/{}", cfg.capture.dir.display())
    );
    assert!(cfg.slo.state_file.starts_with(&cfg.capture.dir));
    assert!(cfg.parity.dir.starts_with(&cfg.capture.dir));
    let limit = volume("captures")["emptyDir"]["sizeLimit"]
        .as_str()
        .unwrap();
    let gib: u64 = limit.strip_suffix("Gi").unwrap().parse().unwrap();
    assert!(
        gib << 30 > cfg.capture.max_total_bytes + cfg.parity.max_log_bytes,
        "the emptyDir must hold the capture and drift-log budgets"
    );

    // The preStop drain: the binary accepts the command, and the grace period covers it and
    // SIGTERM's own drain.
    let cmd: Vec<&str> = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(cmd[..2], ["cync-mitm", "drain"]);
    let flag = |f: &str| cmd.iter().position(|a| *a == f).map(|i| cmd[i + 1]);
    assert_eq!(flag("--config"), Some(cfg_path.as_str()));
    let wait = humantime::parse_duration(flag("--timeout").unwrap()).unwrap();
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    assert!(grace > wait + cfg.timeouts.drain, "{grace:?}");
    // Run as written but against this test's file and a port nothing listens on: it gets as
    // far as asking the proxy (a usage error would say so instead).
    let idle = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = idle.local_addr().unwrap();
    drop(idle);
    let cli_cfg = dir.path().join("cli.toml");
    std::fs::write(&cli_cfg, format!("admin.listen = \"{free}\"\n")).unwrap();
    let mut args: Vec<String> = cmd[1..].iter().map(|s| s.to_string()).collect();
    let i = args.iter().position(|a| a == "--config").unwrap();
    args[i + 1] = cli_cfg.display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_cync-mitm"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no proxy answered"), "{err}");

    // Services: devices on 23779, the admin port for the ServiceMonitor.
    let svc = get("Service/cync-mitm");
    assert!(selects(&svc["spec"]["selector"]));
    assert_eq!(svc["spec"]["ports"][0]["port"], 23779);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "devices");
    let admin = get("Service/cync-mitm-admin");
    assert!(selects(&admin["spec"]["selector"]));
    assert_eq!(admin["spec"]["ports"][0]["targetPort"], "admin");
    assert_eq!(admin["spec"]["type"], "ClusterIP");

    // The budget lets one replica go at a time and never all.
    let pdb = get("PodDisruptionBudget/cync-mitm");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"]));
    let min = pdb["spec"]["minAvailable"].as_u64().unwrap();
    assert!(min >= 1 && min < spec["replicas"].as_u64().unwrap());

    // ServiceMonitor: the fields the operator reads, selecting the admin Service.
    let sm = get("ServiceMonitor/cync-mitm");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(
        unknown(
            &sm["spec"],
            &["selector", "namespaceSelector", "endpoints", "jobLabel"]
        )
        .is_empty()
    );
    let admin_labels = &admin["metadata"]["labels"];
    assert!(
        sm["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &admin_labels[k] == v)
    );
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"][0],
        "cync-mitm"
    );
    let ep = &sm["spec"]["endpoints"][0];
    assert!(
        unknown(
            ep,
            &[
                "port",
                "path",
                "interval",
                "scrapeTimeout",
                "scheme",
                "honorLabels"
            ]
        )
        .is_empty(),
        "{ep}"
    );
    assert_eq!(ep["port"], admin["spec"]["ports"][0]["name"]);
    assert_eq!(ep["path"], "/metrics");
    // Fleet mode reads the SLIs a settle time (a quarter of eval_interval, at most 5 s) after
    // each aligned instant: every scrape must be in by then.
    let settle = (cfg.slo.eval_interval / 4).min(Duration::from_secs(5));
    let timeout = humantime::parse_duration(ep["scrapeTimeout"].as_str().unwrap()).unwrap();
    let interval = humantime::parse_duration(ep["interval"].as_str().unwrap()).unwrap();
    assert!(timeout < settle, "{timeout:?} vs {settle:?}");
    assert!(interval <= cfg.slo.eval_interval);
    // The Service's name is Prometheus' job label: what the proxy's selector asks for.
    assert!(cfg.slo.prometheus_selector.contains(&format!(
        "job=\"{}\"",
        admin["metadata"]["name"].as_str().unwrap()
    )));

    // NetworkPolicy: devices in, metrics in from monitoring only; DNS, the cloud and
    // Prometheus out.
    let np = &get("NetworkPolicy/cync-mitm")["spec"];
    assert!(selects(&np["podSelector"]["matchLabels"]));
    let rules = |dir: &str| -> Vec<(u64, Value)> {
        np[dir]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                let peers = r.get(if dir == "ingress" { "from" } else { "to" }).cloned();
                r["ports"].as_array().unwrap().iter().map(move |p| {
                    (
                        p["port"].as_u64().unwrap(),
                        peers.clone().unwrap_or(Value::Null),
                    )
                })
            })
            .collect()
    };
    let ingress = rules("ingress");
    assert!(
        ingress.contains(&(port("devices"), Value::Null)),
        "devices from anywhere"
    );
    let metrics_from = &ingress.iter().find(|(p, _)| *p == port("admin")).unwrap().1;
    assert_eq!(
        metrics_from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    let egress: Vec<u64> = rules("egress").into_iter().map(|(p, _)| p).collect();
    for p in [53, 23779, 9090] {
        assert!(egress.contains(&p), "egress {p}: {egress:?}");
    }
    for a in &cfg.upstream.addresses {
        let p: u64 = a.rsplit(':').next().unwrap().parse().unwrap();
        assert!(egress.contains(&p), "the cloud at {a}");
    }
    let prom_port = cfg
        .slo
        .prometheus_url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse::<u64>().ok())
        .unwrap();
    assert!(egress.contains(&prom_port));
}

#[test]
fn the_prometheusrule_is_the_projects_rules_and_promtool_accepts_it() {
    if !have_tool("promtool", "--version") || !have_tool("yamllint", "--version") {
        return;
    }
    let fresh = Command::new("python3")
        .arg(root().join("scripts/k8s-prometheusrule.py"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        fresh.status.success(),
        "{}",
        String::from_utf8_lossy(&fresh.stderr)
    );
    // The same groups as the rule files, and promtool accepts them as a rule file.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             k = yaml.safe_load(open(sys.argv[1]))\n\
             g = [x for f in sys.argv[3:] for x in yaml.safe_load(open(f))['groups']]\n\
             assert k['kind'] == 'PrometheusRule', k['kind']\n\
             assert k['spec']['groups'] == g, 'groups differ'\n\
             yaml.safe_dump({'groups': k['spec']['groups']}, open(sys.argv[2], 'w'))\n\
             print(len(g))",
        ])
        .arg(k8s_dir().join("prometheusrule.yaml"))
        .arg(dir.path().join("rules.yml"))
        .arg(root().join("deploy/prometheus/cync-mitm-recording.rules.yml"))
        .arg(root().join("deploy/prometheus/cync-mitm-alerts.rules.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(dir.path().join("rules.yml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}
