//! `app deploy`, `app rollback` and `app history`: deploys print their progress (the app's
//! deploy events, followed while the daemon rolls out) and end non-zero when the new revision
//! was rolled back.

use std::future::Future;

use hyper::Method;
use serde_json::{json, Value};

use super::client::{call, call_stream, CallError};
use super::{print_json, s, table, Host};

/// Runs `request` (a deploy or rollback) while printing the app's deploy events on stderr.
pub async fn with_progress(
    host: &Host,
    app: &str,
    request: impl Future<Output = Result<Value, CallError>>,
) -> Result<Value, CallError> {
    let path = format!("/v1/events?app={app}&follow=true&tail=0");
    let follow = call_stream(host, Method::GET, &path, None, |event| {
        let kind = event["kind"].as_str().unwrap_or("");
        if kind.starts_with("deploy_") || kind == "rolled_back" || kind == "instance_unhealthy" {
            let who = event["instance"].as_str().map(|i| format!("{i}: ")).unwrap_or_default();
            eprintln!("{:<16} {who}{}", kind.replace('_', " "), s(&event["message"]));
        }
    });
    tokio::pin!(request);
    tokio::pin!(follow);
    let mut following = true;
    let result = loop {
        tokio::select! {
            result = &mut request => break result,
            _ = &mut follow, if following => following = false,
        }
    };
    // The last events were sent before the answer but may still be on their way.
    if following {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(300), follow).await;
    }
    result
}

/// The last line of a deploy or rollback: what runs now.
pub fn outcome(result: &Value, json_out: bool) {
    if json_out {
        print_json(result);
        return;
    }
    let app = &result["app"];
    let running =
        app["instances"].as_array().map(|i| i.iter().filter(|x| x["state"] == "running").count()).unwrap_or(0);
    let was = result["previous"].as_u64().map(|n| format!(" (was revision {n})")).unwrap_or_default();
    match result["outcome"].as_str() {
        Some("unchanged") => println!(
            "{}: already on revision {}, {running}/{} instances running",
            s(&app["name"]),
            result["revision"],
            app["instances_desired"]
        ),
        _ => println!(
            "{}: revision {} deployed{was}, {running}/{} instances running",
            s(&app["name"]),
            result["revision"],
            app["instances_desired"]
        ),
    }
}

pub async fn rollback(host: &Host, name: &str, to: Option<u32>, json_out: bool) -> Result<(), CallError> {
    let body = match to {
        Some(n) => json!({"to": n}),
        None => json!({}),
    };
    let path = format!("/v1/apps/{name}/rollback");
    let request = call(host, Method::POST, &path, Some(body));
    let result = with_progress(host, name, request).await?;
    outcome(&result, json_out);
    Ok(())
}

pub async fn history(host: &Host, name: &str, json_out: bool) -> Result<(), CallError> {
    let revisions = call(host, Method::GET, &format!("/v1/apps/{name}/revisions"), None).await?;
    if json_out {
        print_json(&revisions);
        return Ok(());
    }
    let rows = revisions
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let digest = s(&r["digest"]);
            let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
            let mut outcome = s(&r["outcome"]);
            if let Some(reason) = r["reason"].as_str() {
                outcome = format!("{outcome}: {reason}");
            }
            let changes = r["changes"].as_array().map(|c| c.iter().map(s).collect::<Vec<_>>().join("; "));
            vec![
                format!("{}{}", if r["current"] == true { "*" } else { " " }, r["number"]),
                s(&r["image"]),
                hex.get(..12).unwrap_or(hex).to_string(),
                s(&r["created_at"]),
                outcome,
                changes.filter(|c| !c.is_empty()).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&["REVISION", "IMAGE", "DIGEST", "CREATED", "OUTCOME", "CHANGES"], rows);
    Ok(())
}

/// `revision 3 (deploy, failed: …) at …` for `app show`.
pub fn last_deploy(d: &Value) -> String {
    if d.is_null() {
        return "-".into();
    }
    let state = s(&d["state"]).replace('_', " ");
    let reason = d["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default();
    format!("revision {} ({}, {state}{reason}) at {}", d["to_revision"], s(&d["kind"]), s(&d["started_at"]))
}
