//! Client commands: turn `deliverous app …` / `image …` into API calls and print the answers
//! as aligned tables or, with `--json`, as JSON.

mod apply;
mod client;
mod deploys;
mod events;
mod exec;
mod progress;
mod registry;
mod token;
mod top;

use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Map, Value};

pub use apply::{run_apply, ApplyArgs};
use client::{call, call_stream, CallError};
pub use client::{set_ca_file, Host};
pub use events::{run_events, EventsArgs};
pub use exec::{run_exec, run_run, ExecArgs, RunArgs};
pub use registry::{run_registry, RegistryCommand};
pub use token::{run_token, TokenCommand};
pub use top::{run_top, TopArgs};

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Declare an app from an image.
    #[command(
        after_help = "Examples:\n  deliverous app create web --image registry.example.com/shop/web:1.4 --port 8080 -e MODE=prod --memory 256M\n  \
            deliverous app create worker --image registry.example.com/shop/worker:1.4 --port 9000 --restart on-failure --json"
    )]
    Create {
        name: String,
        #[arg(long)]
        image: String,
        /// TCP port the app listens on (it also gets it as $PORT).
        #[arg(long)]
        port: u16,
        #[command(flatten)]
        settings: Settings,
        /// Instances to run once started.
        #[arg(long, allow_negative_numbers = true)]
        instances: Option<i64>,
        /// Print the created app as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change an app's configuration; a running app rolls to a new revision.
    #[command(
        after_help = "Examples:\n  deliverous app config web -e GREETING=hello --memory 128M --cpus 0.5 --port 8080\n  \
            deliverous app config web --unset GREETING --stop-timeout default --json"
    )]
    Config {
        name: String,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        #[command(flatten)]
        settings: Settings,
        /// Remove an environment variable.
        #[arg(long = "unset", value_name = "KEY")]
        unset: Vec<String>,
        /// Stop routing a host name to the app.
        #[arg(long = "remove-domain", value_name = "DOMAIN")]
        remove_domains: Vec<String>,
        /// Print the changed app as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Roll out a new revision (a config change that always rolls out, pulling the image
    /// again) and wait for the outcome: non-zero exit if it was rolled back.
    #[command(
        after_help = "Examples:\n  deliverous app deploy web --image registry.example.com/shop/web:1.5\n  deliverous app deploy web -e FEATURE=on --surge 2"
    )]
    Deploy {
        name: String,
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        #[command(flatten)]
        settings: Settings,
        /// Remove an environment variable.
        #[arg(long = "unset", value_name = "KEY")]
        unset: Vec<String>,
        /// Stop routing a host name to the app.
        #[arg(long = "remove-domain", value_name = "DOMAIN")]
        remove_domains: Vec<String>,
        /// Print the outcome (revision, previous revision, app) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Go back to the previous revision, or to a given kept one (`app history` lists them).
    #[command(after_help = "Examples:\n  deliverous app rollback web\n  deliverous app rollback web --to 3 --json")]
    Rollback {
        name: String,
        /// The revision number to go back to.
        #[arg(long)]
        to: Option<u32>,
        /// Print the outcome (revision, previous revision, app) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The app's kept revisions: image, what changed, how each deploy ended.
    #[command(after_help = "Examples:\n  deliverous app history web\n  deliverous app history web --json")]
    History {
        name: String,
        /// Print the revisions as a JSON array, newest first.
        #[arg(long)]
        json: bool,
    },
    /// Pull the image if needed and start the app's instances.
    #[command(after_help = "Examples:\n  deliverous app start web\n  deliverous app start web --json")]
    Start {
        name: String,
        /// Print the app as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop every instance; the app stays declared.
    #[command(after_help = "Examples:\n  deliverous app stop web\n  deliverous app stop web --json")]
    Stop {
        name: String,
        /// Print the app as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set the number of instances (0 to 1000).
    #[command(
        allow_negative_numbers = true,
        after_help = "Examples:\n  deliverous app scale web 3\n  deliverous app scale web 0   # keep the app, run nothing"
    )]
    Scale {
        name: String,
        instances: i64,
        /// Print the app as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop and delete an app.
    #[command(after_help = "Example:\n  deliverous app rm web")]
    Rm { name: String },
    /// List apps.
    #[command(after_help = "Examples:\n  deliverous app ls\n  deliverous app ls --json | jq -r '.[].name'")]
    Ls {
        /// Print the apps as a JSON array (the same objects as `app show --json`).
        #[arg(long)]
        json: bool,
    },
    /// An app's configuration, revision and instances.
    #[command(
        after_help = "Examples:\n  deliverous app show web\n  deliverous app show web --json | jq '.instances[].health'"
    )]
    Show {
        name: String,
        /// Print the app as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print apps as a file `deliverous apply -f` takes back.
    #[command(
        after_help = "Examples:\n  deliverous app export --all > deliverous.toml\n  deliverous app export web --json"
    )]
    Export {
        /// The apps to print.
        #[arg(required_unless_present = "all")]
        names: Vec<String>,
        /// Every app.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// The same content as JSON: {"apps": {NAME: {...}}}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct Settings {
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Memory limit per instance, e.g. 128M or 1G ("none" removes it).
    #[arg(long)]
    memory: Option<String>,
    /// CPUs per instance, e.g. 0.5 (0 removes the limit).
    #[arg(long)]
    cpus: Option<f64>,
    /// Volume NAME:/path[:ro] (kept across deploys) or read-only /host/path:/path allowed by the
    /// daemon's --allow-bind (repeatable; on `config` the list replaces the old one, "none" clears it).
    #[arg(short = 'v', long = "volume", value_name = "VOLUME")]
    volumes: Vec<String>,
    /// Relative CPU weight under contention, 1 to 10000 (default 100; 0 restores it).
    #[arg(long = "cpu-weight", value_name = "WEIGHT")]
    cpu_weight: Option<u32>,
    /// Most processes and threads per instance (default 4096; 0 restores the default).
    #[arg(long)]
    pids: Option<u32>,
    /// Seconds between the stop signal and SIGKILL; "default" (or 0) is the daemon's
    /// --stop-timeout, 10 unless set.
    #[arg(long = "stop-timeout", value_name = "SECONDS|default", value_parser = stop_timeout)]
    stop_timeout: Option<u32>,
    /// Capability to add to the default set, e.g. NET_ADMIN (repeatable; "none" clears the list).
    #[arg(long = "cap-add", value_name = "CAP")]
    cap_add: Vec<String>,
    /// Capability to drop from the default set, e.g. NET_RAW or ALL (repeatable; "none" clears).
    #[arg(long = "cap-drop", value_name = "CAP")]
    cap_drop: Vec<String>,
    /// What happens when an instance exits on its own: always (replaced, with backoff; the
    /// default), on-failure (replaced unless it exited with code 0) or never (its slot stays
    /// empty until `app start`, `app scale` or a config change).
    #[arg(long, value_name = "POLICY", value_parser = ["always", "on-failure", "never"])]
    restart: Option<String>,
    /// Run instances in a user namespace of their own: root inside is an unprivileged id range
    /// on the host, kept for the app (`--userns=false` turns it off; a change is a new revision).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    userns: Option<bool>,
    /// Extra host name routed to the app: example.com, *.example.com (every name below it),
    /// optionally with a path prefix: example.com/api (repeatable).
    #[arg(long = "domain", value_name = "DOMAIN")]
    domains: Vec<String>,
    /// Health check: an HTTP path that answers 2xx/3xx (e.g. /healthz), "tcp" (the port
    /// accepts connections), "image" (the image's HEALTHCHECK command, run inside each
    /// instance; the default) or "none" (no check at all, not even the image's). A failing
    /// instance gets no traffic, and is replaced if it stays unhealthy.
    #[arg(long, value_name = "PATH|tcp|image|none", help_heading = "Proxy")]
    health: Option<String>,
    /// Time between two health checks (default 2s).
    #[arg(long = "health-interval", value_name = "DURATION", value_parser = duration_ms, help_heading = "Proxy")]
    health_interval: Option<u64>,
    /// Time a health check may take (default 1s).
    #[arg(long = "health-timeout", value_name = "DURATION", value_parser = duration_ms, help_heading = "Proxy")]
    health_timeout: Option<u64>,
    /// Failed checks in a row that take an instance out of rotation (default 3).
    #[arg(long = "health-fall", value_name = "N", help_heading = "Proxy")]
    health_fall: Option<u32>,
    /// Passed checks in a row that bring it back (default 2).
    #[arg(long = "health-rise", value_name = "N", help_heading = "Proxy")]
    health_rise: Option<u32>,
    /// How requests are spread: least-outstanding (default) or round-robin.
    #[arg(long, value_parser = ["least-outstanding", "round-robin"], help_heading = "Proxy")]
    balance: Option<String>,
    /// Time to open a connection to an instance (default 5s).
    #[arg(long = "connect-timeout", value_name = "DURATION", value_parser = duration_ms, help_heading = "Proxy")]
    connect_timeout: Option<u64>,
    /// Time an instance may stay silent: before the response head and between two pieces of
    /// the body (default 60s).
    #[arg(long = "read-timeout", value_name = "DURATION", value_parser = duration_ms, help_heading = "Proxy")]
    read_timeout: Option<u64>,
    /// Time a whole request may take, body included (default 0: no limit, streams may run for hours).
    #[arg(long = "total-timeout", value_name = "DURATION", value_parser = duration_ms, help_heading = "Proxy")]
    total_timeout: Option<u64>,
    /// Time a leaving instance gets to finish its requests before it is signalled (default 30s).
    #[arg(long = "drain-timeout", value_name = "DURATION", value_parser = duration_ms, help_heading = "Proxy")]
    drain_timeout: Option<u64>,
    /// Largest request body, e.g. 10M ("none": unlimited, the default; bodies are streamed).
    #[arg(long = "max-body", value_name = "SIZE", help_heading = "Proxy")]
    max_body: Option<String>,
    /// Remove the domain's path prefix before forwarding (example.com/api/x → /x).
    #[arg(long = "strip-prefix", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", help_heading = "Proxy")]
    strip_prefix: Option<bool>,
    /// Also replay a POST or PATCH whose instance died before answering, even if the app may have
    /// read it: only for apps whose writes are idempotent (requests with an Idempotency-Key
    /// header, and those an instance provably never read, are replayed anyway).
    #[arg(long = "retry-non-idempotent", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", help_heading = "Proxy")]
    retry_non_idempotent: Option<bool>,
    /// Publish a raw TCP port, load-balanced per connection: PORT or LISTEN:TARGET, e.g. 6379 or
    /// 16379:6379 (repeatable; on `config` the list replaces the old one, "none" clears it).
    #[arg(long = "tcp", value_name = "PORT", help_heading = "Proxy")]
    tcp: Vec<String>,
    /// New instances a deploy starts at once, beyond the desired count (default 1).
    #[arg(long, value_name = "N", help_heading = "Rollout")]
    surge: Option<u32>,
    /// Old instances a deploy may stop before their replacements are ready (default 0).
    #[arg(long = "max-unavailable", value_name = "N", help_heading = "Rollout")]
    max_unavailable: Option<u32>,
    /// Time a new instance has to become ready (port open, health check passed) before the
    /// deploy is rolled back (default 60s).
    #[arg(long = "deploy-timeout", value_name = "DURATION", value_parser = duration_ms, help_heading = "Rollout")]
    deploy_timeout: Option<u64>,
    /// Time an instance may stay unhealthy before it is replaced (default 30s).
    #[arg(long = "unhealthy-timeout", value_name = "DURATION", value_parser = duration_ms, help_heading = "Rollout")]
    unhealthy_timeout: Option<u64>,
}

fn duration_ms(text: &str) -> Result<u64, String> {
    crate::apps::parse_duration_ms(text)
}

/// `--stop-timeout`: seconds, with `default` (sent as 0) for the daemon's own.
fn stop_timeout(text: &str) -> Result<u32, String> {
    if text.eq_ignore_ascii_case("default") {
        return Ok(0);
    }
    text.trim_end_matches('s')
        .parse()
        .map_err(|_| format!("invalid stop timeout {text:?}: expected seconds (e.g. 30) or \"default\""))
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image from its registry.
    #[command(after_help = "Examples:\n  deliverous image pull registry.example.com/shop/web:1.4\n  \
        deliverous image pull docker.io/library/nginx:1.27 --json")]
    Pull {
        reference: String,
        /// No progress; print the pulled image as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List local images, with the apps whose revisions use them.
    #[command(after_help = "Examples:\n  deliverous image ls\n  deliverous image ls --json")]
    Ls {
        /// Print the images as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Import images from a `docker save` tarball, an OCI archive or an OCI layout directory
    /// (air-gapped hosts). The daemon reads FILE: it must be on this host.
    #[command(after_help = "Examples:\n  docker save web:1.4 -o web.tar && deliverous image import web.tar\n  \
        deliverous image import ./oci-layout --name registry.example.com/acme/web:1.4")]
    Import {
        file: std::path::PathBuf,
        /// Name for the image when the archive names none (or to override its name).
        #[arg(long)]
        name: Option<String>,
        /// Print the imported images as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove a local image (refused while an app's current or kept revision uses it).
    #[command(after_help = "Examples:\n  deliverous image rm registry.example.com/shop/web:1.3\n  \
        deliverous image rm registry.example.com/shop/web:1.3 --json")]
    Rm {
        reference: String,
        /// Print what was removed and freed as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove layers and blobs no local image uses.
    #[command(after_help = "Examples:\n  deliverous image prune\n  deliverous image prune --json")]
    Prune {
        /// Print what was freed as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The app.
    name: String,
    /// Keep following: new lines as they are written, through restarts and new instances.
    #[arg(short, long)]
    follow: bool,
    /// Only lines since then: 30s, 10m, 2h, 1d, or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Only the last N lines (all instances together).
    #[arg(long)]
    tail: Option<usize>,
    /// Only this instance, e.g. web.2.
    #[arg(long)]
    instance: Option<String>,
    /// Prefix each line with its time.
    #[arg(short, long)]
    timestamps: bool,
    /// One JSON object per line: ts, instance, stream, text.
    #[arg(long)]
    json: bool,
}

pub async fn run_logs(host: &Host, args: LogsArgs) -> ExitCode {
    let mut query = vec![format!("follow={}", args.follow)];
    if let Some(s) = &args.since {
        query.push(format!("since={}", percent_encode(s)));
    }
    if let Some(n) = args.tail {
        query.push(format!("tail={n}"));
    }
    if let Some(i) = &args.instance {
        query.push(format!("instance={}", percent_encode(i)));
    }
    let path = format!("/v1/apps/{}/logs?{}", args.name, query.join("&"));
    let result = call_stream(host, Method::GET, &path, None, |line| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let text = if args.json {
            line.to_string()
        } else {
            let stamp = if args.timestamps { format!("{} ", s(&line["ts"])) } else { String::new() };
            format!("{stamp}{} | {}", s(&line["instance"]), s(&line["text"]))
        };
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

/// Query-string escaping for the few characters that would break it.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// List named volumes: size, apps using them.
    #[command(after_help = "Examples:\n  deliverous volume ls\n  deliverous volume ls --json")]
    Ls {
        /// Print the volumes as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Delete a named volume and its data (refused while an app's configuration mounts it).
    #[command(after_help = "Example:\n  deliverous volume rm web-data")]
    Rm { name: String },
}

pub async fn run_volume(host: &Host, cmd: VolumeCommand) -> ExitCode {
    let result = match cmd {
        VolumeCommand::Ls { json } => call(host, Method::GET, "/v1/volumes", None).await.map(|vols| {
            if json {
                print_json(&vols);
            } else {
                let rows = vols
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        vec![
                            s(&v["name"]),
                            v["size"].as_u64().map(crate::apps::format_bytes).unwrap_or_default(),
                            list(&v["used_by"]),
                            s(&v["path"]),
                        ]
                    })
                    .collect();
                table(&["NAME", "SIZE", "USED BY", "PATH"], rows);
            }
        }),
        VolumeCommand::Rm { name } => call(host, Method::DELETE, &format!("/v1/volumes/{name}"), None)
            .await
            .map(|_| println!("removed volume {name}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Exit codes: 0 success, 1 the daemon refused or failed, 2 bad usage, 3 daemon unreachable.
fn fail(e: CallError) -> ExitCode {
    match e {
        CallError::Unreachable(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(3)
        }
        CallError::Api { status, message } => {
            eprintln!("error: {message} ({})", status.as_u16());
            ExitCode::from(1)
        }
    }
}

fn usage(msg: String) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

fn parse_env(pairs: &[String]) -> Result<Map<String, Value>, String> {
    let mut env = Map::new();
    for p in pairs {
        let (k, v) = p.split_once('=').ok_or_else(|| format!("invalid -e {p:?}: expected KEY=VALUE"))?;
        env.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(env)
}

pub async fn run_app(host: &Host, cmd: AppCommand) -> ExitCode {
    let result = match cmd {
        AppCommand::Create { name, image, port, settings, instances, json } => {
            let env = match parse_env(&settings.env) {
                Ok(e) => e,
                Err(m) => return usage(m),
            };
            let mut body = json!({"name": name, "image": image, "port": port, "env": env, "domains": settings.domains});
            if let Some(m) = &settings.memory {
                body["memory"] = json!(m);
            }
            if let Some(c) = settings.cpus {
                body["cpus"] = json!(c);
            }
            if let Some(p) = settings.pids {
                body["pids"] = json!(p);
            }
            add_settings(&mut body, &settings);
            if let Some(n) = instances {
                body["instances"] = json!(n);
            }
            call(host, Method::POST, "/v1/apps", Some(body)).await.map(|app| {
                if json {
                    return print_json(&app);
                }
                println!(
                    "created app {} ({}), not started: `deliverous app start {}`",
                    name,
                    app["image"].as_str().unwrap_or(""),
                    name
                );
            })
        }
        AppCommand::Config { name, image, port, settings, unset, remove_domains, json } => {
            let body = match change_body(image, port, &settings, unset, remove_domains) {
                Ok(b) => b,
                Err(m) => return usage(m),
            };
            call(host, Method::PATCH, &format!("/v1/apps/{name}"), Some(body)).await.map(|app| app_out(&app, json))
        }
        AppCommand::Deploy { name, image, port, settings, unset, remove_domains, json } => {
            let body = match change_body(image, port, &settings, unset, remove_domains) {
                Ok(b) => b,
                Err(m) => return usage(m),
            };
            let path = format!("/v1/apps/{name}/deploy");
            let request = call(host, Method::POST, &path, Some(body));
            deploys::with_progress(host, &name, request).await.map(|r| deploys::outcome(&r, json))
        }
        AppCommand::Rollback { name, to, json } => deploys::rollback(host, &name, to, json).await,
        AppCommand::History { name, json } => deploys::history(host, &name, json).await,
        AppCommand::Start { name, json } => {
            call(host, Method::POST, &format!("/v1/apps/{name}/start"), None).await.map(|app| app_out(&app, json))
        }
        AppCommand::Stop { name, json } => {
            call(host, Method::POST, &format!("/v1/apps/{name}/stop"), None).await.map(|app| app_out(&app, json))
        }
        AppCommand::Scale { name, instances, json } => {
            call(host, Method::PUT, &format!("/v1/apps/{name}/scale"), Some(json!({"instances": instances})))
                .await
                .map(|app| app_out(&app, json))
        }
        AppCommand::Rm { name } => {
            call(host, Method::DELETE, &format!("/v1/apps/{name}"), None).await.map(|_| println!("removed app {name}"))
        }
        AppCommand::Ls { json } => call(host, Method::GET, "/v1/apps", None).await.map(|apps| {
            if json {
                print_json(&apps);
            } else {
                let rows: Vec<Vec<String>> = apps
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        let running = a["instances"]
                            .as_array()
                            .map(|i| i.iter().filter(|x| x["state"] == "running").count())
                            .unwrap_or(0);
                        let state =
                            if a["restarts"]["crash_loop"] == true { "crash-loop".to_string() } else { s(&a["state"]) };
                        vec![
                            s(&a["name"]),
                            state,
                            format!("{running}/{}", a["instances_desired"]),
                            s(&a["image"]),
                            a["port"].to_string(),
                            a["hosts"]
                                .as_array()
                                .map(|h| h.iter().map(s).collect::<Vec<_>>().join(","))
                                .unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(&["NAME", "STATE", "INSTANCES", "IMAGE", "PORT", "HOSTS"], rows);
            }
        }),
        AppCommand::Export { names, all, json } => return apply::run_export(host, names, all, json).await,
        AppCommand::Show { name, json } => {
            match call(host, Method::GET, &format!("/v1/apps/{name}"), None).await {
                Ok(app) if json => {
                    print_json(&app);
                    Ok(())
                }
                Ok(app) => {
                    // Usage is a bonus: a daemon without /v1/stats still shows the app.
                    let usage = call(host, Method::GET, &top::stats_path(Some(&name)), None).await.unwrap_or_default();
                    show(&app, &usage);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

pub async fn run_image(host: &Host, cmd: ImageCommand) -> ExitCode {
    let result = match cmd {
        ImageCommand::Pull { reference, json } => {
            if json {
                call(host, Method::POST, "/v1/images/pull", Some(json!({"reference": reference})))
                    .await
                    .map(|img| print_json(&img))
            } else {
                pull_with_progress(host, &reference).await
            }
        }
        ImageCommand::Ls { json } => call(host, Method::GET, "/v1/images", None).await.map(|imgs| {
            if json {
                print_json(&imgs);
            } else {
                let rows = imgs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| {
                        let digest = s(&i["digest"]);
                        vec![
                            s(&i["reference"]),
                            digest.get(..19).unwrap_or(&digest).to_string(),
                            i["layers"].as_array().map(|l| l.len()).unwrap_or(0).to_string(),
                            i["size"].as_u64().map(crate::apps::format_bytes).unwrap_or_default(),
                            s(&i["pulled_at"]),
                            list(&i["used_by"]),
                        ]
                    })
                    .collect();
                table(&["REFERENCE", "DIGEST", "LAYERS", "SIZE", "PULLED", "USED BY"], rows);
            }
        }),
        ImageCommand::Import { file, name, json } => {
            let path = match std::path::absolute(&file) {
                Ok(p) => p,
                Err(e) => return usage(format!("{}: {e}", file.display())),
            };
            let mut body = json!({"path": path});
            if let Some(n) = name {
                body["reference"] = json!(n);
            }
            call(host, Method::POST, "/v1/images/import", Some(body)).await.map(|imgs| {
                if json {
                    print_json(&imgs);
                } else {
                    for img in imgs.as_array().into_iter().flatten() {
                        println!("imported {}@{}", s(&img["reference"]), s(&img["digest"]));
                    }
                }
            })
        }
        ImageCommand::Rm { reference, json } => {
            call(host, Method::POST, "/v1/images/rm", Some(json!({"reference": reference}))).await.map(|r| {
                if json {
                    print_json(&r);
                } else {
                    println!("removed {}; {}", s(&r["removed"]), pruned(&r["pruned"]));
                }
            })
        }
        ImageCommand::Prune { json } => call(host, Method::POST, "/v1/images/prune", None).await.map(|r| {
            if json {
                print_json(&r);
            } else {
                println!("{}", pruned(&r));
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

/// An app the daemon answered with: as JSON, or its one-line summary.
fn app_out(app: &Value, json: bool) {
    if json {
        print_json(app);
    } else {
        summary(app);
    }
}

fn summary(app: &Value) {
    let running =
        app["instances"].as_array().map(|i| i.iter().filter(|x| x["state"] == "running").count()).unwrap_or(0);
    let rev = app["revision"]["number"].as_u64().map(|n| format!(", revision {n}")).unwrap_or_default();
    println!(
        "{}: {}, {running}/{} instances running{rev}",
        s(&app["name"]),
        s(&app["state"]),
        app["instances_desired"]
    );
}

/// `--stop-timeout`, `--cap-add`/`--cap-drop` into the request body; `none` sends an empty
/// capability list (clears it).
/// The body of a configuration change (`app config`, `app deploy`): only what is given.
fn change_body(
    image: Option<String>,
    port: Option<u16>,
    settings: &Settings,
    unset: Vec<String>,
    remove_domains: Vec<String>,
) -> Result<Value, String> {
    let mut env = parse_env(&settings.env)?;
    for k in unset {
        env.insert(k, Value::Null);
    }
    let mut body = json!({"env": env, "add_domains": settings.domains, "remove_domains": remove_domains});
    if let Some(i) = image {
        body["image"] = json!(i);
    }
    if let Some(p) = port {
        body["port"] = json!(p);
    }
    if let Some(m) = &settings.memory {
        body["memory"] = json!(m);
    }
    if let Some(c) = settings.cpus {
        body["cpus"] = json!(c);
    }
    if let Some(p) = settings.pids {
        body["pids"] = json!(p);
    }
    add_settings(&mut body, settings);
    Ok(body)
}

fn add_settings(body: &mut Value, settings: &Settings) {
    if !settings.volumes.is_empty() {
        let volumes: Vec<&String> = settings.volumes.iter().filter(|v| !v.eq_ignore_ascii_case("none")).collect();
        body["volumes"] = json!(volumes);
    }
    if let Some(w) = settings.cpu_weight {
        body["cpu_weight"] = json!(w);
    }
    if let Some(t) = settings.stop_timeout {
        body["stop_timeout"] = json!(t);
    }
    if let Some(r) = &settings.restart {
        body["restart"] = json!(r);
    }
    if let Some(u) = settings.userns {
        body["userns"] = json!(u);
    }
    for (key, given) in [("cap_add", &settings.cap_add), ("cap_drop", &settings.cap_drop)] {
        if !given.is_empty() {
            let caps: Vec<&String> = given.iter().filter(|c| !c.eq_ignore_ascii_case("none")).collect();
            body[key] = json!(caps);
        }
    }
    let mut routing = serde_json::Map::new();
    let mut set = |key: &str, v: Value| {
        routing.insert(key.to_string(), v);
    };
    if let Some(h) = &settings.health {
        set("health", json!(h));
    }
    for (key, v) in [
        ("health_interval_ms", settings.health_interval),
        ("health_timeout_ms", settings.health_timeout),
        ("connect_timeout_ms", settings.connect_timeout),
        ("read_timeout_ms", settings.read_timeout),
        ("total_timeout_ms", settings.total_timeout),
        ("drain_timeout_ms", settings.drain_timeout),
    ] {
        if let Some(v) = v {
            set(key, json!(v));
        }
    }
    if let Some(n) = settings.health_rise {
        set("health_rise", json!(n));
    }
    if let Some(n) = settings.health_fall {
        set("health_fall", json!(n));
    }
    if let Some(b) = &settings.balance {
        set("balance", json!(b));
    }
    if let Some(m) = &settings.max_body {
        set("max_body", json!(m));
    }
    if let Some(r) = settings.retry_non_idempotent {
        set("retry_non_idempotent", json!(r));
    }
    if let Some(s) = settings.strip_prefix {
        set("strip_prefix", json!(s));
    }
    if !settings.tcp.is_empty() {
        let ports: Vec<&String> = settings.tcp.iter().filter(|p| !p.eq_ignore_ascii_case("none")).collect();
        set("tcp", json!(ports));
    }
    if !routing.is_empty() {
        body["routing"] = Value::Object(routing);
    }
    let mut rollout = serde_json::Map::new();
    for (key, v) in [("surge", settings.surge), ("max_unavailable", settings.max_unavailable)] {
        if let Some(v) = v {
            rollout.insert(key.into(), json!(v));
        }
    }
    for (key, v) in
        [("deploy_timeout_ms", settings.deploy_timeout), ("unhealthy_timeout_ms", settings.unhealthy_timeout)]
    {
        if let Some(v) = v {
            rollout.insert(key.into(), json!(v));
        }
    }
    if !rollout.is_empty() {
        body["rollout"] = Value::Object(rollout);
    }
}

/// `image pull` for people: a progress bar per layer on a terminal, a line per layer otherwise;
/// then `reference@digest` on stdout.
async fn pull_with_progress(host: &Host, reference: &str) -> Result<(), CallError> {
    let mut view = progress::PullView::new(crate::terminal::stderr_escapes());
    eprintln!("pulling {reference}…");
    let mut outcome: Option<Result<Value, String>> = None;
    call_stream(host, Method::POST, "/v1/images/pull", Some(json!({"reference": reference})), |event| {
        match event["event"].as_str() {
            Some("pulled") => outcome = Some(Ok(event["image"].clone())),
            Some("error") => outcome = Some(Err(s(&event["error"]))),
            _ => view.event(&event),
        }
    })
    .await?;
    view.finish();
    match outcome {
        Some(Ok(img)) => {
            println!("{}@{}", s(&img["reference"]), s(&img["digest"]));
            Ok(())
        }
        Some(Err(message)) => Err(CallError::Api { status: hyper::StatusCode::BAD_GATEWAY, message }),
        None => Err(CallError::Unreachable("the daemon ended the pull without saying how it went".into())),
    }
}

fn pruned(report: &Value) -> String {
    format!(
        "freed {} ({} layers, {} blobs)",
        report["bytes"].as_u64().map(crate::apps::format_bytes).unwrap_or_default(),
        report["layers"],
        report["blobs"]
    )
}

fn list(v: &Value) -> String {
    match v.as_array() {
        Some(a) if !a.is_empty() => a.iter().map(s).collect::<Vec<_>>().join(", "),
        _ => "-".into(),
    }
}

/// `health=/healthz balance=round-robin tcp=6379` — only what differs from the defaults.
fn routing_summary(r: &Value) -> String {
    let Some(map) = r.as_object().filter(|m| !m.is_empty()) else { return "defaults".into() };
    let mut parts = Vec::new();
    for (k, v) in map {
        let text = match (k.as_str(), v) {
            ("health", Value::Object(h)) => {
                format!("health={}", h.get("path").and_then(Value::as_str).unwrap_or("tcp"))
            }
            ("health_none", Value::Bool(true)) => "health=none".into(),
            ("tcp", Value::Array(ports)) => format!(
                "tcp={}",
                ports.iter().map(|p| format!("{}:{}", p["listen"], p["target"])).collect::<Vec<_>>().join(",")
            ),
            ("balance", b) if b == "least-outstanding" => continue,
            ("strip_prefix", Value::Bool(false)) => continue,
            ("retry_non_idempotent", Value::Bool(false)) => continue,
            (k, Value::Number(n)) if k.ends_with("_ms") => format!("{}={n}ms", k.trim_end_matches("_ms")),
            (k, v) => format!("{k}={}", s(v)),
        };
        parts.push(text);
    }
    if parts.is_empty() {
        "defaults".into()
    } else {
        parts.join(" ")
    }
}

fn show(app: &Value, usage: &Value) {
    let env = app["env"]
        .as_object()
        .map(|e| e.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let lines = [
        ("name", s(&app["name"])),
        ("state", s(&app["state"])),
        ("image", s(&app["image"])),
        ("port", app["port"].to_string()),
        ("env", env),
        ("memory", s(&app["memory"])),
        ("cpus", s(&app["cpus"])),
        ("cpu_weight", s(&app["cpu_weight"])),
        ("pids", s(&app["pids"])),
        ("volumes", list(&app["volumes"])),
        ("stop_timeout", app["stop_timeout"].as_u64().map_or("default".to_string(), |t| format!("{t}s"))),
        ("cap_add", list(&app["cap_add"])),
        ("cap_drop", list(&app["cap_drop"])),
        ("hosts", app["hosts"].as_array().map(|h| h.iter().map(s).collect::<Vec<_>>().join(", ")).unwrap_or_default()),
        ("routing", routing_summary(&app["routing"])),
        ("health", s(&app["health_check"]["description"])),
        ("restart", app["restart"].as_str().unwrap_or("always").to_string()),
        ("userns", if app["userns"] == true { "yes (own user namespace)" } else { "no" }.to_string()),
        ("rollout", routing_summary(&app["rollout"])),
        ("deploy", deploys::last_deploy(&app["last_deploy"])),
        ("instances", s(&app["instances_desired"])),
        (
            "revision",
            match app["revision"].as_object() {
                Some(r) => format!("{} ({}@{})", r["number"], s(&r["image"]), s(&r["digest"])),
                None => "-".into(),
            },
        ),
        ("restarts", restarts_summary(&app["restarts"])),
    ];
    let width = lines.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    for (k, v) in lines {
        println!("{:<width$} {v}", format!("{k}:"));
    }
    let mut rows: Vec<(u64, Vec<String>)> = app["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let used = usage.as_array().into_iter().flatten().find(|u| u["id"] == i["id"]).unwrap_or(&Value::Null);
            let row = vec![
                s(&i["name"]),
                s(&i["id"]),
                s(&i["ip"]),
                s(&i["state"]),
                s(&i["revision"]),
                s(&i["health"]),
                s(&i["pid"]),
                top::percent(&used["cpu_percent"]),
                top::memory(used),
                s(&i["started_at"]),
                i["restarts"].as_u64().unwrap_or(0).to_string(),
                last_exit(&i["last_exit"]),
            ];
            (i["slot"].as_u64().unwrap_or(0), row)
        })
        .collect();
    // Slots without an instance: backing off, or left empty by the restart policy.
    for e in app["restarts"]["exited"].as_array().into_iter().flatten() {
        let state = if e["crash_loop"] == true { "crash-loop".to_string() } else { s(&e["state"]) };
        let row = vec![
            s(&e["name"]),
            "-".into(),
            "-".into(),
            state,
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            e["restarts"].as_u64().unwrap_or(0).to_string(),
            last_exit(&e["last_exit"]),
        ];
        rows.push((e["slot"].as_u64().unwrap_or(0), row));
    }
    rows.sort_by_key(|r| r.0);
    if !rows.is_empty() {
        println!();
        table(
            &[
                "INSTANCE",
                "ID",
                "IP",
                "STATE",
                "REVISION",
                "HEALTH",
                "PID",
                "CPU %",
                "MEMORY / LIMIT",
                "STARTED",
                "RESTARTS",
                "LAST EXIT",
            ],
            rows.into_iter().map(|r| r.1).collect(),
        );
    }
    health_outputs(app);
}

/// The last health check output of each instance whose check failed (as `docker inspect`
/// shows it), or printed something.
fn health_outputs(app: &Value) {
    for i in app["instances"].as_array().into_iter().flatten() {
        let Some(output) = i["health_output"]["output"].as_str().filter(|o| !o.trim().is_empty()) else { continue };
        println!();
        println!("last health check of {} ({}, {}):", s(&i["name"]), s(&i["health"]), s(&i["health_output"]["at"]));
        for line in output.trim_end().lines() {
            println!("  {line}");
        }
    }
}

/// `3 (last: exited with code 1 at …)`, with `CRASH LOOP` while a slot crash-loops.
fn restarts_summary(r: &Value) -> String {
    let mut text = r["count"].as_u64().unwrap_or(0).to_string();
    let message = r["last_exit_message"].as_str().or(r["last_exit"].as_str());
    if let Some(last) = message {
        text.push_str(&format!(" (last: {last} at {})", s(&r["last_exit_at"])));
    }
    if r["crash_loop"] == true {
        text.push_str(" CRASH LOOP: backing off");
    }
    text
}

/// `exited with code 1 (12:01:02)` or `-`.
fn last_exit(e: &Value) -> String {
    match e["message"].as_str() {
        Some(m) => {
            let at = s(&e["at"]);
            let time = at.split('T').nth(1).map(|t| t.trim_end_matches('Z')).unwrap_or(&at).to_string();
            format!("{m} ({time})")
        }
        None => "-".into(),
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}
