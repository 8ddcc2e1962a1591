//! Per-instance resource usage (CPU, memory, pids from the instance cgroups; restarts and
//! requests from the supervisor and the proxy) for `/v1/stats`, `/metrics`, `app show` and
//! `deliverous top`. Rates (CPU %, requests/s) come from comparing with the previous look.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::supervisor::Supervisor;

/// One instance's figures. Counters are absolute; rates are over the time since the previous
/// look (at least [`MIN_WINDOW`]), `None` before there was one.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStats {
    pub app: String,
    /// `web.2`.
    pub instance: String,
    pub id: String,
    /// `starting`, `running` or `stopping`.
    pub state: &'static str,
    /// CPU time used since the instance started, in seconds.
    pub cpu_seconds: Option<f64>,
    /// CPU use over the window, in percent of one CPU (200 = two CPUs busy).
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
    /// `None`: no memory limit.
    pub memory_limit_bytes: Option<u64>,
    pub pids: Option<u64>,
    /// Unexpected exits of this instance name (`web.2`) since the daemon started.
    pub restarts: u64,
    /// Responses the proxy sent from this instance.
    pub requests_total: u64,
    pub requests_per_second: Option<f64>,
}

/// Shortest time between two looks for a rate; a closer look reuses the previous rate.
pub const MIN_WINDOW: Duration = Duration::from_millis(500);

struct Sample {
    at: Instant,
    cpu_usec: Option<u64>,
    requests: u64,
    cpu_percent: Option<f64>,
    requests_per_second: Option<f64>,
}

/// The previous look at each instance, by instance id.
#[derive(Default)]
pub struct Sampler {
    last: Mutex<HashMap<String, Sample>>,
}

impl Sampler {
    /// Fills in the rates of `stats` and remembers this look; forgets instances that are gone
    /// (when `all` are there). Returns whether an instance was seen for the first time.
    fn rate(&self, stats: &mut [InstanceStats], usec: &[Option<u64>], all: bool) -> bool {
        let mut first_seen = false;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for (s, cpu_usec) in stats.iter_mut().zip(usec) {
            let requests = s.requests_total;
            let fresh = |cpu_percent, requests_per_second| Sample {
                at: now,
                cpu_usec: *cpu_usec,
                requests,
                cpu_percent,
                requests_per_second,
            };
            match last.get(&s.id) {
                Some(prev) if now.duration_since(prev.at) >= MIN_WINDOW => {
                    let secs = now.duration_since(prev.at).as_secs_f64();
                    let cpu = match (prev.cpu_usec, *cpu_usec) {
                        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6 / secs * 100.0),
                        _ => None,
                    };
                    let rps = Some(s.requests_total.saturating_sub(prev.requests) as f64 / secs);
                    s.cpu_percent = cpu;
                    s.requests_per_second = rps;
                    last.insert(s.id.clone(), fresh(cpu, rps));
                }
                Some(prev) => {
                    s.cpu_percent = prev.cpu_percent;
                    s.requests_per_second = prev.requests_per_second;
                }
                None => {
                    first_seen = true;
                    last.insert(s.id.clone(), fresh(None, None));
                }
            }
        }
        if all {
            last.retain(|id, _| stats.iter().any(|s| &s.id == id));
        }
        first_seen
    }
}

/// How [`collect`] treats rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rates {
    /// None: counters only, and the previous look stays as it was (for `/metrics`, whose
    /// scraper computes its own rates).
    Skip,
    /// Since the previous look; instances seen for the first time are looked at again after
    /// [`MIN_WINDOW`], so the answer has them.
    Wait,
}

/// Reads the figures of every instance (of `app` only, if given).
pub async fn collect(sup: &std::sync::Arc<Supervisor>, app: Option<&str>, rates: Rates) -> Vec<InstanceStats> {
    let (stats, first_seen) = read(sup, app, rates).await;
    if !first_seen {
        return stats;
    }
    tokio::time::sleep(MIN_WINDOW).await;
    read(sup, app, rates).await.0
}

/// The figures, and whether (with rates) an instance was seen for the first time.
async fn read(sup: &std::sync::Arc<Supervisor>, app: Option<&str>, rates: Rates) -> (Vec<InstanceStats>, bool) {
    let apps: Vec<String> = match app {
        Some(a) => vec![a.to_string()],
        None => sup.store().apps().map(|v| v.into_iter().map(|a| a.name).collect()).unwrap_or_default(),
    };
    let requests: HashMap<(String, std::net::IpAddr), u64> =
        sup.routes().backend_requests().await.into_iter().map(|b| ((b.instance, b.addr.ip()), b.requests)).collect();
    let mut stats = Vec::new();
    let mut paths = Vec::new();
    for app in &apps {
        for i in sup.instances_of(app) {
            paths.push(sup.settings().cgroups_path(&i.id));
            stats.push(InstanceStats {
                app: app.clone(),
                requests_total: requests.get(&(i.name.clone(), std::net::IpAddr::V4(i.ip))).copied().unwrap_or(0),
                restarts: sup.slot_restarts(app, i.slot),
                instance: i.name,
                id: i.id,
                state: i.state,
                cpu_seconds: None,
                cpu_percent: None,
                memory_bytes: None,
                memory_limit_bytes: None,
                pids: None,
                requests_per_second: None,
            });
        }
    }
    // Small reads of kernel files, but files all the same: off the async threads.
    let cgroups = tokio::task::spawn_blocking(move || {
        paths.iter().map(|p| deliverous_runtime::cgroup::stats(p)).collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut usec = Vec::with_capacity(stats.len());
    for (s, c) in stats.iter_mut().zip(&cgroups) {
        s.cpu_seconds = c.cpu_usec.map(|u| u as f64 / 1e6);
        s.memory_bytes = c.memory_bytes;
        s.memory_limit_bytes = c.memory_limit;
        s.pids = c.pids;
        usec.push(c.cpu_usec);
    }
    usec.resize(stats.len(), None);
    let first_seen = rates == Rates::Wait && sup.sampler().rate(&mut stats, &usec, app.is_none());
    (stats, first_seen)
}

/// The instances' figures in the Prometheus text format (appended to the proxy's).
pub fn render(stats: &[InstanceStats]) -> String {
    use crate::proxy::metrics::escape;
    let mut out = String::new();
    let labels = |s: &InstanceStats| format!("app=\"{}\",instance=\"{}\"", escape(&s.app), escape(&s.instance));
    let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&InstanceStats) -> Option<String>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in stats {
            if let Some(v) = value(s) {
                let _ = writeln!(out, "{name}{{{}}} {v}", labels(s));
            }
        }
    };
    family(
        "deliverous_instance_up",
        "gauge",
        "1 while the instance runs and is ready, 0 while it starts or stops.",
        &|s| Some(u8::from(s.state == "running").to_string()),
    );
    family("deliverous_instance_cpu_seconds_total", "counter", "CPU time used by the instance's processes.", &|s| {
        s.cpu_seconds.map(|v| v.to_string())
    });
    family(
        "deliverous_instance_memory_bytes",
        "gauge",
        "Memory in use by the instance, inactive page cache excluded.",
        &|s| s.memory_bytes.map(|v| v.to_string()),
    );
    family("deliverous_instance_memory_limit_bytes", "gauge", "The instance's memory limit (absent: none).", &|s| {
        s.memory_limit_bytes.map(|v| v.to_string())
    });
    family("deliverous_instance_pids", "gauge", "Processes and threads in the instance.", &|s| {
        s.pids.map(|v| v.to_string())
    });
    family(
        "deliverous_instance_restarts_total",
        "counter",
        "Unexpected exits of the instance since the daemon started.",
        &|s| Some(s.restarts.to_string()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, requests: u64) -> InstanceStats {
        InstanceStats {
            app: "web".into(),
            instance: "web.1".into(),
            id: id.into(),
            state: "running",
            cpu_seconds: Some(1.5),
            cpu_percent: None,
            memory_bytes: Some(4096),
            memory_limit_bytes: None,
            pids: Some(3),
            restarts: 2,
            requests_total: requests,
            requests_per_second: None,
        }
    }

    #[test]
    fn renders_prometheus_families() {
        let text = render(&[instance("a", 0)]);
        assert!(text.contains("deliverous_instance_up{app=\"web\",instance=\"web.1\"} 1\n"));
        assert!(text.contains("deliverous_instance_cpu_seconds_total{app=\"web\",instance=\"web.1\"} 1.5\n"));
        assert!(text.contains("deliverous_instance_memory_bytes{app=\"web\",instance=\"web.1\"} 4096\n"));
        assert!(text.contains("deliverous_instance_restarts_total{app=\"web\",instance=\"web.1\"} 2\n"));
        // No limit: no sample, rather than a made-up number.
        assert!(!text.contains("deliverous_instance_memory_limit_bytes{"));
        assert!(text.contains("# TYPE deliverous_instance_cpu_seconds_total counter\n"));
    }

    #[test]
    fn rates_need_a_window() {
        let sampler = Sampler::default();
        let mut first = [instance("a", 10)];
        assert!(sampler.rate(&mut first, &[Some(1_000_000)], true), "seen for the first time");
        assert_eq!(first[0].cpu_percent, None);
        // Pretend the first look was a second ago.
        if let Some(s) = sampler.last.lock().unwrap_or_else(|p| p.into_inner()).get_mut("a") {
            s.at -= Duration::from_secs(1);
        }
        let mut second = [instance("a", 30)];
        assert!(!sampler.rate(&mut second, &[Some(1_500_000)], true));
        let cpu = second[0].cpu_percent.unwrap_or_default();
        assert!((40.0..=50.1).contains(&cpu), "cpu {cpu}");
        let rps = second[0].requests_per_second.unwrap_or_default();
        assert!((16.0..=20.1).contains(&rps), "rps {rps}");
        // A look right after reuses the rate instead of dividing by almost nothing.
        let mut third = [instance("a", 31)];
        sampler.rate(&mut third, &[Some(1_500_100)], true);
        assert_eq!(third[0].cpu_percent, second[0].cpu_percent);
        // Gone instances are forgotten.
        sampler.rate(&mut [], &[], true);
        assert!(sampler.last.lock().unwrap_or_else(|p| p.into_inner()).is_empty());
    }
}
