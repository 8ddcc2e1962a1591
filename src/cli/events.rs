//! `deliverous events`: what happened to apps and instances (created, started, ready, exited
//! and why, restarting and when, crash loops…), from the daemon's record, optionally followed.

use std::process::ExitCode;

use clap::Args;
use hyper::Method;
use serde_json::Value;

use super::client::{call_stream, Host};
use super::{fail, percent_encode, s};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep following: print new events as they happen.
    #[arg(short, long)]
    follow: bool,
    /// Only this app's events.
    #[arg(long)]
    app: Option<String>,
    /// Only events since then: 30s, 10m, 2h, 1d, or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Only the last N events (before following).
    #[arg(long)]
    tail: Option<usize>,
    /// One JSON object per line: id, time, kind, app, instance, message.
    #[arg(long)]
    json: bool,
}

pub async fn run_events(host: &Host, args: EventsArgs) -> ExitCode {
    let mut query = vec![format!("follow={}", args.follow)];
    if let Some(a) = &args.app {
        query.push(format!("app={}", percent_encode(a)));
    }
    if let Some(since) = &args.since {
        query.push(format!("since={}", percent_encode(since)));
    }
    if let Some(n) = args.tail {
        query.push(format!("tail={n}"));
    }
    let path = format!("/v1/events?{}", query.join("&"));
    let result = call_stream(host, Method::GET, &path, None, |event| {
        use std::io::Write;
        let text = if args.json { event.to_string() } else { line(&event) };
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) ends the command quietly.
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            std::process::exit(0);
        }
    })
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// `2026-11-24T21:40:01.123Z  instance_exited      web.2  exited unexpectedly: …`: the instance
/// if there is one, else the app (`-` for the daemon's own events).
fn line(e: &Value) -> String {
    let subject = match e["instance"].as_str() {
        Some(i) => i.to_string(),
        None => e["app"].as_str().filter(|a| !a.is_empty()).unwrap_or("-").to_string(),
    };
    format!("{}  {:<19}  {:<12}  {}", s(&e["time"]), s(&e["kind"]), subject, s(&e["message"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_the_instance_or_else_the_app() {
        let e = serde_json::json!({"id": 3, "time": "t", "kind": "instance_exited", "app": "web",
            "instance": "web.2", "message": "exited unexpectedly: exited with code 1"});
        assert_eq!(line(&e), "t  instance_exited      web.2         exited unexpectedly: exited with code 1");
        let e = serde_json::json!({"id": 1, "time": "t", "kind": "daemon_started", "message": "up"});
        assert!(line(&e).contains("daemon_started       -  "), "{}", line(&e));
    }
}
