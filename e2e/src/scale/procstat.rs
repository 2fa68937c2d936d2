//! Reading a process's memory and CPU from /proc, and the control plane's
//! Prometheus text metrics.

use std::net::SocketAddr;

use anyhow::{Context, Result};

/// One reading of /proc/<pid>.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// VmRSS.
    pub rss_kib: u64,
    /// VmHWM: peak RSS.
    pub hwm_kib: u64,
    /// utime + stime.
    pub cpu_s: f64,
}

impl ProcSample {
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

/// Clock ticks per second for /proc/<pid>/stat (USER_HZ, 100 on Linux).
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Reads /proc/<pid> (`None`: this process).
///
/// # Errors
/// The process is gone or /proc is unreadable.
pub fn sample(pid: Option<u32>) -> Result<ProcSample> {
    let dir = pid.map_or_else(|| "/proc/self".to_string(), |p| format!("/proc/{p}"));
    let status = std::fs::read_to_string(format!("{dir}/status"))
        .with_context(|| format!("{dir}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat =
        std::fs::read_to_string(format!("{dir}/stat")).with_context(|| format!("{dir}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on:
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> f64 { f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    let cpu = (ticks(11) + ticks(12)) / ticks_per_second();
    Ok(ProcSample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_s: cpu,
    })
}

/// Busy CPU seconds of the whole machine so far (all processes, from /proc/stat),
/// to tell how much CPU other tenants took during a phase.
pub fn machine_busy_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: f64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    busy / ticks_per_second()
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The control plane's /metrics text.
///
/// # Errors
/// The admin endpoint does not answer 200.
pub async fn metrics(admin: SocketAddr) -> Result<Metrics> {
    let (code, body) =
        tokio::task::spawn_blocking(move || crate::procs::http_get(admin, "/metrics")).await??;
    anyhow::ensure!(code == 200, "GET /metrics: HTTP {code}");
    Ok(Metrics(body))
}

/// Prometheus text exposition, queried by name.
#[derive(Debug, Clone, Default)]
pub struct Metrics(pub String);

impl Metrics {
    /// Sum of every sample of `name` (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples(name).map(|(_, v)| v).sum()
    }

    /// The sample of `name` whose labels contain `label` (e.g. `kind="full"`).
    pub fn with_label(&self, name: &str, label: &str) -> f64 {
        self.samples(name)
            .filter(|(l, _)| l.contains(label))
            .map(|(_, v)| v)
            .sum()
    }

    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.lines().filter_map(move |l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, v) = r.split_once('}')?;
                (labels, v)
            } else if rest.starts_with(' ') {
                ("", rest)
            } else {
                return None;
            };
            Some((labels, value.split_whitespace().next()?.parse().ok()?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let s = sample(None).unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib);
    }

    #[test]
    fn machine_counters() {
        assert!(machine_busy_s() > 0.0);
        assert!(load_average() >= 0.0);
    }

    #[test]
    fn parses_prometheus_text() {
        let m = Metrics(
            "# HELP x\nmeshlite_a_total 5\nmeshlite_a_total_other 9\nmeshlite_b{kind=\"full\"} 2\nmeshlite_b{kind=\"delta\"} 3\n"
                .into(),
        );
        assert_eq!(m.sum("meshlite_a_total"), 5.0);
        assert_eq!(m.sum("meshlite_b"), 5.0);
        assert_eq!(m.with_label("meshlite_b", "kind=\"full\""), 2.0);
    }
}
