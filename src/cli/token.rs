//! `deliverous token create|ls|rm`: bearer tokens for the remote API (managed over the unix
//! socket only).

use std::process::ExitCode;

use clap::Subcommand;
use hyper::Method;
use serde_json::json;

use super::client::call;
use super::{fail, percent_encode, print_json, s, table, Host};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for the TCP API (daemon flag --api-listen); it is printed once, only its
    /// hash is kept.
    #[command(after_help = "Example:\n  deliverous token create --name ci --expires 30d\n  \
        DELIVEROUS_HOST=https://host:7443 DELIVEROUS_TOKEN=dlv_... deliverous app ls")]
    Create {
        /// Name to list and remove it by (default: generated).
        #[arg(long)]
        name: Option<String>,
        /// Validity: 90m, 12h, 30d, 1w or an RFC 3339 time (default: until removed).
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List tokens: name, created, expires, last used.
    #[command(after_help = "Examples:\n  deliverous token ls\n  deliverous token ls --json")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a token: requests carrying it are refused from now on.
    #[command(after_help = "Example:\n  deliverous token rm ci")]
    Rm { name: String },
}

pub async fn run_token(host: &Host, cmd: TokenCommand) -> ExitCode {
    let result = match cmd {
        TokenCommand::Create { name, expires, json } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(e) = expires {
                body["expires"] = json!(e);
            }
            call(host, Method::POST, "/v1/tokens", Some(body)).await.map(|t| {
                if json {
                    print_json(&t);
                } else {
                    eprintln!(
                        "created token {} (expires: {}); it is shown this once, keep it safe:",
                        s(&t["name"]),
                        t["expires_at"].as_str().unwrap_or("never")
                    );
                    println!("{}", s(&t["token"]));
                }
            })
        }
        TokenCommand::Ls { json } => call(host, Method::GET, "/v1/tokens", None).await.map(|tokens| {
            if json {
                print_json(&tokens);
            } else {
                let rows = tokens
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        let expires = match (t["expires_at"].as_str(), t["expired"].as_bool()) {
                            (Some(e), Some(true)) => format!("{e} (expired)"),
                            (Some(e), _) => e.to_string(),
                            (None, _) => "never".into(),
                        };
                        vec![s(&t["name"]), s(&t["created_at"]), expires, s(&t["last_used_at"])]
                    })
                    .collect();
                table(&["NAME", "CREATED", "EXPIRES", "LAST USED"], rows);
            }
        }),
        TokenCommand::Rm { name } => call(host, Method::DELETE, &format!("/v1/tokens/{}", percent_encode(&name)), None)
            .await
            .map(|_| println!("removed token {name}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
