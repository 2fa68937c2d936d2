//! A small hand-written SVG line plot of change latency to all agents (p50, p99,
//! max) from the harness's JSON reports: against the number of agents (one
//! single-change phase per report), or against the churn rate (every churn phase
//! of the reports).
//! Hand-written because it is one chart of a few points; no plotting crate needed.

use std::fmt::Write;

/// One report's point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Agents, or changes per second.
    pub x: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Reads the points from reports (the JSON objects the harness prints last).
pub fn points(reports: &[serde_json::Value]) -> Vec<Point> {
    let mut pts: Vec<Point> = reports
        .iter()
        .filter_map(|r| {
            Some(Point {
                x: r["agents"].as_f64()?,
                p50_ms: r["change_p50_ms"].as_f64()?,
                p99_ms: r["change_p99_ms"].as_f64()?,
                max_ms: r["change_max_ms"].as_f64()?,
            })
        })
        .collect();
    pts.sort_by(|a, b| a.x.total_cmp(&b.x));
    pts
}

/// One point per churn phase (the x axis is its rate, changes per second).
pub fn churn_points(reports: &[serde_json::Value]) -> Vec<Point> {
    let mut pts: Vec<Point> = reports
        .iter()
        .flat_map(|r| r["churn"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| {
            Some(Point {
                x: c["rate"].as_f64()?,
                p50_ms: c["p50_ms"].as_f64()?,
                p99_ms: c["p99_ms"].as_f64()?,
                max_ms: c["max_ms"].as_f64()?,
            })
        })
        .collect();
    pts.sort_by(|a, b| a.x.total_cmp(&b.x));
    pts
}

/// What the x axis shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Agents,
    ChurnRate,
}

/// The SVG text. `subtitle` names the cluster size.
pub fn svg(points: &[Point], axis: Axis, subtitle: &str) -> String {
    let (title, xlabel) = match axis {
        Axis::Agents => (
            "One endpoint change: time until every agent has it",
            "agents (log scale)",
        ),
        Axis::ChurnRate => (
            "Under churn: time from each change until every agent has it",
            "changes per second (log scale)",
        ),
    };
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const L: f64 = 70.0;
    const R: f64 = 150.0;
    const T: f64 = 60.0;
    const B: f64 = 60.0;
    let (pw, ph) = (W - L - R, H - T - B);
    let xmin = points.iter().map(|p| p.x).fold(f64::INFINITY, f64::min);
    let xmax = points.iter().map(|p| p.x).fold(0.0, f64::max);
    let (lx0, lx1) = if points.is_empty() {
        (0.0, 1.0)
    } else {
        (
            xmin.max(1.0).log10(),
            xmax.max(xmin * 1.01).max(2.0).log10(),
        )
    };
    let ymax = nice(points.iter().map(|p| p.max_ms).fold(1.0, f64::max));
    let x = |a: f64| L + (a.max(1.0).log10() - lx0) / (lx1 - lx0).max(1e-9) * pw;
    let y = |v: f64| T + ph - v / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="15" font-weight="bold">{title}</text>"#,
        L
    );
    let _ = writeln!(
        s,
        r##"<text x="{L}" y="42" fill="#555">{}</text>"##,
        escape(subtitle)
    );
    // Axes and grid.
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            L + pw,
            L - 6.0,
            yy + 4.0,
            fmt_num(v)
        );
    }
    for p in points {
        let xx = x(p.x);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{T}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            T + ph,
            T + ph + 18.0,
            fmt_num(p.x)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{xlabel}</text>"#,
        L + pw / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">milliseconds</text>"#,
        T + ph / 2.0
    );
    type Series = (&'static str, &'static str, fn(&Point) -> f64);
    let series: [Series; 3] = [
        ("p50", "#1f77b4", |p| p.p50_ms),
        ("p99", "#d62728", |p| p.p99_ms),
        ("max", "#7f7f7f", |p| p.max_ms),
    ];
    for (i, (name, color, f)) in series.iter().enumerate() {
        let pts: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.x), y(f(p))))
            .collect();
        let dash = if *name == "max" {
            r#" stroke-dasharray="4 3""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            pts.join(" ")
        );
        for p in points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                x(p.x),
                y(f(p))
            );
        }
        let ly = T + 10.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            L + pw + 15.0,
            L + pw + 40.0,
            L + pw + 46.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A round axis maximum above `v`.
fn nice(v: f64) -> f64 {
    let exp = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * exp >= v {
            return m * exp;
        }
    }
    10.0 * exp
}

fn fmt_num(v: f64) -> String {
    if v >= 1000.0 && (v / 1000.0).fract() == 0.0 {
        format!("{},000", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.1}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_every_churn_phase_by_rate() {
        let report = serde_json::json!({"churn": [
            {"rate": 500, "p50_ms": 50.0, "p99_ms": 900.0, "max_ms": 1000.0},
            {"rate": 50, "p50_ms": 10.0, "p99_ms": 90.0, "max_ms": 100.0},
        ]});
        let p = churn_points(&[report]);
        assert_eq!(p.iter().map(|p| p.x).collect::<Vec<_>>(), [50.0, 500.0]);
        let s = svg(&p, Axis::ChurnRate, "5,000 agents");
        assert!(s.contains("changes per second"));
        assert_eq!(s.matches("<circle").count(), 6);
    }

    #[test]
    fn plots_every_point() {
        let reports: Vec<serde_json::Value> = [500, 5000, 1000]
            .iter()
            .map(|a| serde_json::json!({"agents": a, "change_p50_ms": 10.0, "change_p99_ms": 20.0, "change_max_ms": 30.0}))
            .collect();
        let p = points(&reports);
        assert_eq!(
            p.iter().map(|p| p.x).collect::<Vec<_>>(),
            [500.0, 1000.0, 5000.0]
        );
        let s = svg(&p, Axis::Agents, "10k services");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<circle").count(), 9);
        assert!(s.contains("5,000"));
        assert_eq!(nice(730.0), 1000.0);
        assert_eq!(nice(180.0), 200.0);
    }
}
