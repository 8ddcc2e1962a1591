//! Request counters and latency histograms, per app and per instance, kept in atomics on the hot
//! path and rendered in the Prometheus text format on demand.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::routes::RouteTable;

/// Upper bounds of the duration histogram, in seconds (Prometheus' default buckets).
const BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Counters of one app or one instance.
#[derive(Debug, Default)]
pub struct Stats {
    /// Responses by status class: 1xx … 5xx.
    by_class: [AtomicU64; 5],
    /// Cumulative histogram counts (one per bucket, then +Inf = count).
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Exchanges that failed on the instance's side (connect, reset, timeout).
    pub upstream_errors: AtomicU64,
    pub retries: AtomicU64,
    pub ejections: AtomicU64,
    /// TCP passthrough connections.
    pub connections: AtomicU64,
}

pub type AppMetrics = Stats;
pub type BackendMetrics = Stats;

impl Stats {
    pub fn record(&self, status: u16, elapsed: Duration, bytes_in: u64, bytes_out: u64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
    }

    /// Responses sent so far (every status).
    pub fn requests(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, labels: &str) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (i, c) in self.by_class.iter().enumerate() {
            let _ = writeln!(out, "deliverous_proxy_requests_total{{{labels},code=\"{}xx\"}} {}", i + 1, get(c));
        }
        let mut cumulative = 0;
        for (bound, b) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += get(b);
            let _ = writeln!(
                out,
                "deliverous_proxy_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = get(&self.count);
        let _ = writeln!(out, "deliverous_proxy_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "deliverous_proxy_request_duration_seconds_count{{{labels}}} {count}");
        let sum = get(&self.sum_micros) as f64 / 1e6;
        let _ = writeln!(out, "deliverous_proxy_request_duration_seconds_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "deliverous_proxy_received_bytes_total{{{labels}}} {}", get(&self.bytes_in));
        let _ = writeln!(out, "deliverous_proxy_sent_bytes_total{{{labels}}} {}", get(&self.bytes_out));
        let _ = writeln!(out, "deliverous_proxy_upstream_errors_total{{{labels}}} {}", get(&self.upstream_errors));
        let _ = writeln!(out, "deliverous_proxy_retries_total{{{labels}}} {}", get(&self.retries));
        let _ = writeln!(out, "deliverous_proxy_tcp_connections_total{{{labels}}} {}", get(&self.connections));
    }
}

/// Label values are app and instance names (DNS labels and dots) but escape anyway.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The proxy's metrics in the Prometheus text exposition format.
pub fn render(table: &RouteTable) -> String {
    let super::routes::Snapshot { backends, apps } = table.snapshot();
    let mut out = String::new();
    out.push_str("# HELP deliverous_proxy_requests_total Responses sent, by status class.\n");
    out.push_str("# TYPE deliverous_proxy_requests_total counter\n");
    out.push_str(
        "# HELP deliverous_proxy_request_duration_seconds Time from request head to the end of the response.\n",
    );
    out.push_str("# TYPE deliverous_proxy_request_duration_seconds histogram\n");
    out.push_str("# TYPE deliverous_proxy_received_bytes_total counter\n");
    out.push_str("# TYPE deliverous_proxy_sent_bytes_total counter\n");
    out.push_str("# TYPE deliverous_proxy_upstream_errors_total counter\n");
    out.push_str("# TYPE deliverous_proxy_retries_total counter\n");
    out.push_str("# TYPE deliverous_proxy_tcp_connections_total counter\n");
    for (app, stats) in &apps {
        stats.render(&mut out, &format!("app=\"{}\"", escape(app)));
    }
    for b in &backends {
        b.metrics.render(&mut out, &format!("app=\"{}\",instance=\"{}\"", escape(&b.app), escape(&b.instance)));
    }
    out.push_str("# HELP deliverous_proxy_in_flight Requests and connections in flight per instance.\n");
    out.push_str("# TYPE deliverous_proxy_in_flight gauge\n");
    for b in &backends {
        let labels = format!("app=\"{}\",instance=\"{}\"", escape(&b.app), escape(&b.instance));
        let _ = writeln!(out, "deliverous_proxy_in_flight{{{labels}}} {}", b.in_flight());
    }
    out.push_str("# HELP deliverous_proxy_instance_healthy 1 while the instance passes its health check.\n");
    out.push_str("# TYPE deliverous_proxy_instance_healthy gauge\n");
    for b in &backends {
        let labels = format!("app=\"{}\",instance=\"{}\"", escape(&b.app), escape(&b.instance));
        let _ = writeln!(out, "deliverous_proxy_instance_healthy{{{labels}}} {}", u8::from(b.is_healthy()));
    }
    out.push_str("# TYPE deliverous_proxy_ejections_total counter\n");
    for b in &backends {
        let labels = format!("app=\"{}\",instance=\"{}\"", escape(&b.app), escape(&b.instance));
        let _ = writeln!(
            out,
            "deliverous_proxy_ejections_total{{{labels}}} {}",
            b.metrics.ejections.load(Ordering::Relaxed)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let s = Stats::default();
        s.record(200, Duration::from_millis(3), 10, 20);
        s.record(503, Duration::from_millis(300), 0, 5);
        let mut out = String::new();
        s.render(&mut out, "app=\"web\"");
        assert!(out.contains("deliverous_proxy_requests_total{app=\"web\",code=\"2xx\"} 1"));
        assert!(out.contains("deliverous_proxy_requests_total{app=\"web\",code=\"5xx\"} 1"));
        assert!(out.contains("le=\"0.005\"} 1"));
        assert!(out.contains("le=\"0.25\"} 1"));
        assert!(out.contains("le=\"0.5\"} 2"));
        assert!(out.contains("le=\"+Inf\"} 2"));
        assert!(out.contains("deliverous_proxy_sent_bytes_total{app=\"web\"} 25"));
    }
}
