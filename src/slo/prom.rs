//! Fleet mode: the SLIs read with PromQL from a Prometheus that scrapes every replica. One
//! instant query per evaluation asks for every [`Block`]'s increase over every window the
//! objectives and burn alerts need, summed over the replicas, at the evaluation's instant (a
//! multiple of `slo.eval_interval`), so every replica gets the same numbers and reaches the
//! same verdict. The same expressions are shipped as recording rules
//! (`deploy/prometheus/cync-mitm-recording.rules.yml`, from [`recording_rules`]).

use super::sli::{Block, Blocks, Sli};
use super::{BURN_ALERTS, Counts, Evaluation, evaluate_counts};
use crate::config::SloConfig;
use crate::route::Path;
use std::collections::{BTreeSet, HashMap};

/// A window as PromQL writes it (`300s` → `5m`).
pub fn promql_window(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Every window an evaluation with `cfg` needs: the burn alerts' and each objective's.
pub fn windows(cfg: &SloConfig) -> BTreeSet<u64> {
    let mut w: BTreeSet<u64> = BURN_ALERTS.iter().flat_map(|a| [a.long, a.short]).collect();
    w.extend(Sli::ALL.iter().map(|s| cfg.objective(*s).window));
    w
}

/// The one query: every block over every window, labelled `block` and `window`.
pub fn query(cfg: &SloConfig) -> String {
    let th = super::sli::Thresholds::of(cfg);
    let mut parts = Vec::new();
    for w in windows(cfg) {
        let win = promql_window(w);
        for b in Block::ALL {
            parts.push(format!(
                r#"label_replace(label_replace({}, "block", "{}", "", ""), "window", "{win}", "", "")"#,
                b.promql(&cfg.prometheus_selector, th, &win),
                b.name()
            ));
        }
    }
    parts.join(" or ")
}

/// `application/x-www-form-urlencoded` of one value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The answer parsed: value by (transport, block, window label).
fn parse(body: &[u8]) -> Result<HashMap<(String, String, String), f64>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(format!(
            "{}: {}",
            v["errorType"].as_str().unwrap_or("error"),
            v["error"].as_str().unwrap_or("no error message")
        ));
    }
    if v["data"]["resultType"] != "vector" {
        return Err(format!(
            "expected a vector, got {}",
            v["data"]["resultType"]
        ));
    }
    let mut out = HashMap::new();
    for r in v["data"]["result"].as_array().into_iter().flatten() {
        let m = &r["metric"];
        let (Some(t), Some(b), Some(w)) = (
            m["transport"].as_str(),
            m["block"].as_str(),
            m["window"].as_str(),
        ) else {
            continue;
        };
        let Some(x) = r["value"][1].as_str().and_then(|s| s.parse::<f64>().ok()) else {
            return Err(format!("a sample without a number: {r}"));
        };
        out.insert((t.to_owned(), b.to_owned(), w.to_owned()), x);
    }
    Ok(out)
}

/// Turns the answer into evaluations of every SLI on both transports.
fn evaluations(
    cfg: &SloConfig,
    values: &HashMap<(String, String, String), f64>,
) -> Vec<(Path, Sli, Evaluation)> {
    let blocks = |t: Path, window: u64| {
        let win = promql_window(window);
        let mut b = Blocks::default();
        for k in Block::ALL {
            let v = values
                .get(&(t.label().to_owned(), k.name().to_owned(), win.clone()))
                .copied()
                .unwrap_or(0.0);
            // increase() extrapolates: round, and never below zero.
            b.set(
                k,
                if v.is_finite() && v > 0.0 {
                    v.round() as u64
                } else {
                    0
                },
            );
        }
        b
    };
    let mut out = Vec::new();
    for t in [Path::Legacy, Path::New] {
        let by_window: HashMap<u64, Blocks> = windows(cfg)
            .into_iter()
            .map(|w| (w, blocks(t, w)))
            .collect();
        for s in Sli::ALL {
            let over = |w: u64| -> Counts {
                by_window
                    .get(&w)
                    .map_or_else(Counts::default, |b| b.counts(t, s))
            };
            out.push((
                t,
                s,
                evaluate_counts(over, cfg.objective(s), cfg.min_events),
            ));
        }
    }
    out
}

/// Reads and evaluates every SLI at `at` (Unix seconds) from `slo.prometheus_url`.
pub async fn evaluate(cfg: &SloConfig, at: u64) -> Result<Vec<(Path, Sli, Evaluation)>, String> {
    let base = crate::httpc::Target::parse(&cfg.prometheus_url)?;
    let path = format!("{}/api/v1/query", base.path.trim_end_matches('/'));
    let body = format!("query={}&time={at}", form_encode(&query(cfg)));
    let (status, answer) = crate::httpc::request(
        &base.with_path(path),
        hyper::Method::POST,
        &[(
            "content-type",
            "application/x-www-form-urlencoded".to_owned(),
        )],
        bytes::Bytes::from(body),
        cfg.prometheus_timeout,
    )
    .await
    .map_err(|e| e.to_string())?;
    let values = parse(&answer).map_err(|e| format!("HTTP {status}: {e}"))?;
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    Ok(evaluations(cfg, &values))
}

/// The recording rules (YAML) for the blocks over the burn windows and the default objective
/// windows: `cync_mitm:slo_block:increase<window>{transport, block}`. Dashboards and alerts
/// use them; the proxy queries the raw expressions, so it needs no rule to be loaded.
pub fn recording_rules() -> String {
    let cfg = SloConfig::default();
    let th = super::sli::Thresholds::of(&cfg);
    let mut out = String::from(
        "# Generated by `cync-mitm slo rules`; do not edit (a test keeps it in sync).\n\
         # cync_mitm:slo_block:increase<window>{transport, block}: each SLI building block's\n\
         # increase over the window, summed over every replica: the same expressions the\n\
         # proxy queries in fleet mode (slo.source = \"prometheus\").\n\
         groups:\n",
    );
    for w in windows(&cfg) {
        let win = promql_window(w);
        let interval = if w <= 3600 { "30s" } else { "5m" };
        out.push_str(&format!(
            "  - name: cync-mitm-slo-blocks-{win}\n    interval: {interval}\n    rules:\n"
        ));
        for b in Block::ALL {
            out.push_str(&format!(
                "      - record: cync_mitm:slo_block:increase{win}\n        expr: {}\n        labels:\n          block: {}\n",
                yaml_quote(&b.promql("", th, &win)),
                b.name()
            ));
        }
    }
    out
}

/// A YAML single-quoted scalar.
fn yaml_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_query_holds_every_block_and_window() {
        let cfg = SloConfig {
            prometheus_selector: r#"job="cync""#.into(),
            ..SloConfig::default()
        };
        let w = windows(&cfg);
        assert_eq!(
            w.iter().copied().collect::<Vec<_>>(),
            [300, 1800, 3600, 21_600, 86_400, 7 * 86_400, 30 * 86_400]
        );
        let q = query(&cfg);
        assert_eq!(q.matches(" or ").count(), 14 * 7 - 1);
        assert!(
            q.contains(r#"tcp_comm_ack_timeout_total{job="cync"}[30d]"#),
            "{q}"
        );
        assert!(
            q.contains(r#"tcp_comm_packet_latency_seconds_bucket{kind="command",le=~"1\\.5",job="cync"}[7d]"#),
            "{q}"
        );
        assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn answers_become_evaluations_and_errors_say_why() {
        let cfg = SloConfig {
            min_events: 10,
            ..SloConfig::default()
        };
        let mut result = Vec::new();
        for w in ["5m", "30m", "1h", "6h", "1d", "7d", "30d"] {
            result.push(serde_json::json!({"metric": {"transport": "new", "block": "acked", "window": w}, "value": [1, "95.7"]}));
            result.push(serde_json::json!({"metric": {"transport": "new", "block": "failed", "window": w}, "value": [1, "5"]}));
            result.push(serde_json::json!({"metric": {"transport": "legacy", "block": "acked", "window": w}, "value": [1, "100"]}));
        }
        let body = serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": result}});
        let values = parse(body.to_string().as_bytes()).unwrap();
        let e = evaluations(&cfg, &values);
        let get = |t: Path, s: Sli| {
            e.iter()
                .find(|(a, b, _)| *a == t && *b == s)
                .unwrap()
                .2
                .clone()
        };
        let new = get(Path::New, Sli::CommandSuccess);
        assert_eq!(new.counts, Counts { good: 96, bad: 5 });
        assert_eq!(new.verdict, crate::slo::Verdict::Violated);
        assert_eq!(
            get(Path::Legacy, Sli::CommandSuccess).verdict,
            crate::slo::Verdict::Met
        );
        assert_eq!(
            get(Path::New, Sli::QueueFull).verdict,
            crate::slo::Verdict::Inconclusive
        );
        let err = parse(br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#)
            .unwrap_err();
        assert!(err.contains("parse error"), "{err}");
        assert!(parse(b"<html>").is_err());
        let nan = serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {"transport": "new", "block": "acked", "window": "5m"}, "value": [1, "NaN"]}]}});
        let v = parse(nan.to_string().as_bytes()).unwrap();
        assert_eq!(evaluations(&cfg, &v)[7].2.counts, Counts::default());
    }
}
