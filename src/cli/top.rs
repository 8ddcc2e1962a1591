//! `deliverous top`: a refreshing table of every instance's CPU, memory, pids, restarts and
//! requests per second; also the usage columns of `app show`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use hyper::Method;
use serde_json::Value;

use super::client::call;
use super::{fail, percent_encode, print_json, s, table, Host};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Only this app's instances.
    app: Option<String>,
    /// Print the table once and exit (also when stdout is not a terminal).
    #[arg(long)]
    once: bool,
    /// Print the figures once as JSON (cpu_seconds, cpu_percent, memory_bytes, ...).
    #[arg(long)]
    json: bool,
    /// Time between two refreshes.
    #[arg(long, default_value = "2s", value_parser = interval)]
    interval: Duration,
}

fn interval(text: &str) -> Result<Duration, String> {
    let ms = crate::apps::parse_duration_ms(text)?;
    if ms < 200 {
        return Err(format!("interval {text:?} is too short: at least 200ms"));
    }
    Ok(Duration::from_millis(ms))
}

/// Path of the stats of every instance, or of `app`'s.
pub fn stats_path(app: Option<&str>) -> String {
    match app {
        Some(a) => format!("/v1/stats?app={}", percent_encode(a)),
        None => "/v1/stats".to_string(),
    }
}

pub async fn run_top(host: &Host, args: TopArgs) -> ExitCode {
    let live = !args.once && !args.json && std::io::stdout().is_terminal();
    loop {
        let stats = match call(host, Method::GET, &stats_path(args.app.as_deref()), None).await {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        if args.json {
            print_json(&stats);
            return ExitCode::SUCCESS;
        }
        if live {
            // Home and clear: the table redrawn in place, as top(1) does.
            print!("\x1b[H\x1b[2J");
        }
        print_table(&stats);
        if !live {
            return ExitCode::SUCCESS;
        }
        if std::io::stdout().flush().is_err() {
            return ExitCode::SUCCESS;
        }
        tokio::time::sleep(args.interval).await;
    }
}

fn print_table(stats: &Value) {
    let rows = stats
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            vec![
                s(&i["app"]),
                s(&i["instance"]),
                s(&i["state"]),
                percent(&i["cpu_percent"]),
                memory(i),
                s(&i["pids"]),
                s(&i["restarts"]),
                i["requests_per_second"].as_f64().map_or("-".into(), |r| format!("{r:.1}")),
            ]
        })
        .collect();
    table(&["APP", "INSTANCE", "STATE", "CPU %", "MEMORY / LIMIT", "PIDS", "RESTARTS", "REQ/S"], rows);
}

pub fn percent(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |p| format!("{p:.1}%"))
}

/// `12.3M / 128M`, `12.3M / -` without a limit.
pub fn memory(i: &Value) -> String {
    let used = i["memory_bytes"].as_u64().map_or("-".into(), crate::apps::format_bytes);
    let limit = i["memory_limit_bytes"].as_u64().map_or("-".into(), crate::apps::format_bytes);
    format!("{used} / {limit}")
}
