//! Checks a Grafana dashboard against what the processes export: every panel
//! query and template variable is parsed with the real PromQL grammar
//! (`promql-parser`), and each metric it selects, each label it matches, groups
//! by or joins on must appear in scraped `/metrics` text, or be a label the
//! chart's scrape adds to every series (`job`, `instance`, `node`, ...).

use std::collections::{BTreeMap, BTreeSet};

use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr, LabelModifier, VectorSelector};

/// Labels Prometheus adds to every series of a target scraped by the chart's
/// ServiceMonitor (its relabeling puts the pod's node in `node`).
pub const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "endpoint",
    "container",
    "node",
    "app_kubernetes_io_component",
];

/// What scraped processes export: per sample name (suffixes such as `_bucket`
/// included), each label and the values it was seen with.
#[derive(Debug, Default, Clone)]
pub struct Exported {
    series: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    sampled: BTreeSet<String>,
}

// === impl Exported ===

impl Exported {
    /// Adds one scrape (Prometheus or OpenMetrics text). Families declared without
    /// samples (a labelled family nothing has incremented yet) count as exported
    /// under the sample names their type gives them, with no labels.
    pub fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let mut parts = decl.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let suffixes: &[&str] = match kind {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_count", "_sum"],
                    "summary" => &["", "_count", "_sum"],
                    _ => &[""],
                };
                for s in suffixes {
                    self.series.entry(format!("{name}{s}")).or_default();
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
            let (name, body) = match series.split_once('{') {
                Some((n, b)) => (n, b.trim_end_matches('}')),
                None => (series, ""),
            };
            self.sampled.insert(name.to_string());
            let labels = self.series.entry(name.to_string()).or_default();
            for (k, v) in parse_labels(body) {
                labels.entry(k).or_default().insert(v);
            }
        }
    }

    /// Whether some scrape held a sample named `name`.
    pub fn sampled(&self, name: &str) -> bool {
        self.sampled.contains(name)
    }

    fn labels(&self, name: &str) -> Option<&BTreeMap<String, BTreeSet<String>>> {
        self.series.get(name)
    }
}

fn parse_labels(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 2..];
        let mut value = String::new();
        let mut end = after.len();
        let mut chars = after.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key, value));
        rest = &after[end..];
    }
    out
}

/// Checks every query of a Grafana dashboard (panels, panels nested in rows, and
/// `label_values` template variables). Returns the number of queries checked, or
/// every problem found.
///
/// # Errors
/// A list of problems, one line each: unparsable JSON or PromQL, a metric nothing
/// exports, a label a metric does not carry, a matched value never seen.
pub fn check(dashboard: &str, exported: &Exported) -> Result<usize, Vec<String>> {
    let json: serde_json::Value =
        serde_json::from_str(dashboard).map_err(|e| vec![format!("dashboard JSON: {e}")])?;
    let mut problems = Vec::new();
    let mut checked = 0;
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for p in json["panels"].as_array().into_iter().flatten() {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let Some(expr) = t["expr"].as_str() else {
                problems.push(format!("panel {title:?}: a target without expr"));
                continue;
            };
            checked += 1;
            for e in check_query(expr, exported) {
                problems.push(format!("panel {title:?}: {expr}: {e}"));
            }
        }
        if p["type"] != "row" && p["targets"].as_array().is_none_or(Vec::is_empty) {
            problems.push(format!("panel {title:?}: no queries"));
        }
    }
    for v in json["templating"]["list"].as_array().into_iter().flatten() {
        let Some(q) = v["query"]["query"].as_str() else {
            continue;
        };
        let name = v["name"].as_str().unwrap_or("?");
        let Some(args) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        else {
            problems.push(format!("variable {name}: unsupported query {q}"));
            continue;
        };
        let Some((selector, label)) = args.rsplit_once(',') else {
            problems.push(format!(
                "variable {name}: label_values needs a selector and a label"
            ));
            continue;
        };
        checked += 1;
        let label = label.trim();
        // The selector must be valid PromQL; the label must be one it carries.
        let q = format!("count by ({label}) ({selector})");
        for e in check_query(&q, exported) {
            problems.push(format!("variable {name}: {q}: {e}"));
        }
    }
    if problems.is_empty() {
        Ok(checked)
    } else {
        Err(problems)
    }
}

/// Grafana's variables, as "All" expands them, so the query parses.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$node", ".*")
}

/// Problems of one query: see [`check`].
pub fn check_query(expr: &str, exported: &Exported) -> Vec<String> {
    match parser::parse(&expand(expr)) {
        Err(e) => vec![format!("does not parse: {e}")],
        Ok(ast) => {
            let mut problems = Vec::new();
            walk(&ast, exported, &mut problems);
            problems
        }
    }
}

/// Walks `e`, returning the labels its series may carry.
fn walk(e: &Expr, exported: &Exported, problems: &mut Vec<String>) -> BTreeSet<String> {
    match e {
        Expr::VectorSelector(vs) => selector(vs, exported, problems),
        Expr::MatrixSelector(ms) => selector(&ms.vs, exported, problems),
        Expr::Paren(p) => walk(&p.expr, exported, problems),
        Expr::Unary(u) => walk(&u.expr, exported, problems),
        Expr::Subquery(s) => walk(&s.expr, exported, problems),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) => BTreeSet::new(),
        Expr::Call(c) => {
            let mut labels = BTreeSet::new();
            for a in &c.args.args {
                labels.extend(walk(a, exported, problems));
            }
            labels
        }
        Expr::Aggregate(a) => {
            if let Some(p) = &a.param {
                walk(p, exported, problems);
            }
            let inner = walk(&a.expr, exported, problems);
            match &a.modifier {
                Some(LabelModifier::Include(by)) => {
                    need(&by.labels, &inner, "by", problems);
                    by.labels.iter().cloned().collect()
                }
                Some(LabelModifier::Exclude(without)) => {
                    need(&without.labels, &inner, "without", problems);
                    inner
                        .into_iter()
                        .filter(|l| !without.labels.contains(l))
                        .collect()
                }
                None => BTreeSet::new(),
            }
        }
        Expr::Binary(b) => {
            let l = walk(&b.lhs, exported, problems);
            let r = walk(&b.rhs, exported, problems);
            let both: BTreeSet<String> = l.union(&r).cloned().collect();
            if let Some(m) = b.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
                let (LabelModifier::Include(ls) | LabelModifier::Exclude(ls)) = m;
                need(&ls.labels, &both, "on/ignoring", problems);
            }
            both
        }
        Expr::Extension(_) => {
            problems.push("unsupported expression".into());
            BTreeSet::new()
        }
    }
}

fn need(labels: &[String], have: &BTreeSet<String>, clause: &str, problems: &mut Vec<String>) {
    for l in labels {
        if !have.contains(l) {
            problems.push(format!("{clause} ({l}): no series below carries {l}"));
        }
    }
}

fn selector(
    vs: &VectorSelector,
    exported: &Exported,
    problems: &mut Vec<String>,
) -> BTreeSet<String> {
    let Some(name) = &vs.name else {
        problems.push("a selector without a metric name".into());
        return BTreeSet::new();
    };
    let Some(labels) = exported.labels(name) else {
        problems.push(format!("{name}: not exported"));
        return BTreeSet::new();
    };
    let mut have: BTreeSet<String> = labels.keys().cloned().collect();
    have.extend(TARGET_LABELS.iter().map(|s| (*s).to_string()));
    for m in vs
        .matchers
        .matchers
        .iter()
        .chain(vs.matchers.or_matchers.iter().flatten())
    {
        if m.name == "__name__" {
            continue;
        }
        if !have.contains(&m.name) {
            problems.push(format!("{name}: no label {}", m.name));
            continue;
        }
        // A value matched for equality must be one the process exported (an
        // excluded value may simply not have happened during the scrape).
        if matches!(m.op, MatchOp::Equal)
            && let Some(values) = labels.get(&m.name)
            && !values.contains(&m.value)
        {
            problems.push(format!(
                "{name}: {}={:?} never exported (seen: {values:?})",
                m.name, m.value
            ));
        }
    }
    have
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# TYPE a_seconds histogram\n\
        a_seconds_bucket{le=\"1.0\"} 1\na_seconds_bucket{le=\"+Inf\"} 1\na_seconds_count 1\na_seconds_sum 0.5\n\
        # TYPE events counter\nevents_total{kind=\"Service\",event=\"Apply\"} 3\n\
        # TYPE ended counter\n# TYPE up gauge\nup 1\n# EOF\n";

    fn exported() -> Exported {
        let mut e = Exported::default();
        e.add(SCRAPE);
        e
    }

    #[test]
    fn accepts_what_is_exported() {
        let e = exported();
        for q in [
            "histogram_quantile(0.99, sum by (node, le) (rate(a_seconds_bucket{node=~\"$node\"}[$__rate_interval])))",
            "sum by (kind) (rate(events_total{event!=\"Relist\",kind=\"Service\"}[5m]))",
            "sum(rate(ended_total[5m]))",
            "(up and on (instance) events_total) / on (instance) sum by (instance) (up)",
        ] {
            assert_eq!(check_query(q, &e), Vec::<String>::new(), "{q}");
        }
    }

    #[test]
    fn names_what_is_not() {
        let e = exported();
        let cases = [
            ("rate(nope_total[5m])", "nope_total: not exported"),
            ("sum by (stage) (events_total)", "by (stage)"),
            ("events_total{reason=\"x\"}", "no label reason"),
            ("events_total{kind=\"Pod\"}", "kind=\"Pod\" never exported"),
            ("sum(rate(a_seconds_bucket[5m]", "does not parse"),
            ("ended_total{kind=\"Service\"}", "no label kind"),
        ];
        for (q, want) in cases {
            let p = check_query(q, &e);
            assert!(p.iter().any(|p| p.contains(want)), "{q}: {p:?}");
        }
    }

    #[test]
    fn checks_panels_rows_and_variables() {
        let e = exported();
        let ok = r#"{"panels":[{"type":"row","title":"r","panels":[{"title":"in row","targets":[{"expr":"up"}]}]},
            {"title":"p","targets":[{"expr":"sum(events_total)"}]}],
            "templating":{"list":[{"name":"node","query":{"query":"label_values(up, node)"}}]}}"#;
        assert_eq!(check(ok, &e), Ok(3));
        assert!(e.sampled("a_seconds_bucket") && !e.sampled("ended_total"));
        let bad = r#"{"panels":[{"title":"p","targets":[{"expr":"x"}]},{"title":"empty","targets":[]}],
            "templating":{"list":[{"name":"v","query":{"query":"label_values(up, zone)"}}]}}"#;
        let p = check(bad, &e).unwrap_err();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(check("{", &e).is_err());
    }
}
