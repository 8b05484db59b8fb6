//! The command line: `fazt server`, the client commands, which talk to a running
//! server over HTTP with the admin token from `FAZT_TOKEN` or the data dir, and the
//! data commands (`check`, `backup`), which open the data dir's database directly.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "fazt",
    version,
    about = "Self-hosted app server with background JavaScript workers",
    after_help = "Examples:
  fazt server --listen 127.0.0.1:8080 --data-dir ./fazt-data
  fazt app deploy ./my-app
  fazt job list --app my-app --status failed
  fazt job retry --app my-app --all-failed

Client commands read the admin token from FAZT_TOKEN or <data-dir>/admin.token and talk
to --server. The dashboard is at the server's address in a browser."
)]
pub struct Cli {
    /// Server to talk to (client commands).
    #[arg(
        long,
        global = true,
        env = "FAZT_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Data dir: where `fazt server` keeps its database, and where client commands find
    /// the admin token.
    #[arg(
        long,
        global = true,
        env = "FAZT_DATA_DIR",
        default_value = "./fazt-data"
    )]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (prints the admin token on first start).
    #[command(after_help = "Examples:
  fazt server
  fazt server --listen 0.0.0.0:8080 --data-dir /var/lib/fazt
  FAZT_LISTEN=127.0.0.1:9000 fazt server --jobs-keep 5000")]
    Server(ServerArgs),
    /// Deploy, list and remove apps.
    #[command(after_help = "Examples:
  fazt app deploy ./shop
  fazt app list
  fazt app remove shop")]
    App {
        #[command(subcommand)]
        command: AppCommand,
    },
    /// List, inspect, cancel, retry and delete background jobs.
    #[command(after_help = "Examples:
  fazt job list --app shop --status failed --limit 20
  fazt job show j-0001
  fazt job logs j-0001 --follow
  fazt job retry j-0001
  fazt job delete --app shop --all-failed")]
    Job {
        #[command(subcommand)]
        command: JobCommand,
    },
    /// Run SQLite's full integrity check on the database (the data dir's, or FILE,
    /// e.g. a backup). Safe while the server runs; exits 1 if anything is wrong.
    #[command(after_help = "Examples:
  fazt check
  fazt check --file ./backup.db")]
    Check {
        /// Database file to check instead of <data-dir>/fazt.db.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Copy the data dir's database to FILE with SQLite's online backup (safe while the
    /// server runs). Restore: stop the server, copy FILE to <data-dir>/fazt.db, delete
    /// fazt.db-wal and fazt.db-shm there, start the server.
    #[command(after_help = "Example:
  fazt backup ./fazt-$(date +%F).db")]
    Backup {
        /// Where to write the copy (must not be the live database).
        file: PathBuf,
    },
}

/// `fazt server` flags. Sizes take KB/MB/GB, times ms/s/m/h.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "FAZT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Threads serving HTTP requests.
    #[arg(long, default_value_t = 16)]
    pub http_threads: usize,
    /// Most WebSocket connections one app may have open.
    #[arg(long, default_value_t = 5000)]
    pub ws_max_per_app: usize,
    /// Most WebSocket connections one client IP may have open.
    #[arg(long, default_value_t = 1000)]
    pub ws_max_per_ip: usize,
    /// Most open HTTP connections in all; more are answered 503 and closed.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Most open HTTP connections from one client IP; more are answered 429 and closed.
    #[arg(long, default_value_t = 256)]
    pub max_connections_per_ip: usize,
    /// Longest request line (method, path, version); longer gets 414.
    #[arg(long, default_value = "8KB", value_parser = parse_size)]
    pub max_request_line: usize,
    /// Most bytes of request headers; more gets 431.
    #[arg(long, default_value = "32KB", value_parser = parse_size)]
    pub max_header_bytes: usize,
    /// Largest request body a handler (api/*.js) receives; larger gets 413 unread.
    #[arg(long, default_value = "1MB", value_parser = parse_size)]
    pub max_body: usize,
    /// Time a request head may take once it started; then 408.
    #[arg(long, default_value = "10s", value_parser = parse_time)]
    pub head_timeout: Duration,
    /// Longest wait for request body bytes (408); bodies must also average 16 KB/s after it.
    #[arg(long, default_value = "10s", value_parser = parse_time)]
    pub body_timeout: Duration,
    /// How long a kept-alive connection may sit idle between requests.
    #[arg(long, default_value = "30s", value_parser = parse_time)]
    pub idle_timeout: Duration,
    /// Longest a response write may block on a client that does not read.
    #[arg(long, default_value = "30s", value_parser = parse_time)]
    pub write_timeout: Duration,
    /// Memory jobs may reserve and use in all; connections and HTTP count apart.
    #[arg(long, default_value = "256MB", value_parser = parse_memory)]
    pub memory_budget: u64,
    #[command(flatten)]
    pub store: StoreFlags,
}

/// Quotas and retention of `fazt server` (the store's limits).
#[derive(clap::Args, Debug, Clone)]
pub struct StoreFlags {
    /// Bytes of kv keys and values one app may keep; past it kv.set throws.
    #[arg(long, default_value = "64MB")]
    pub kv_quota: String,
    /// Finished jobs kept per app (the newest); older ones are pruned.
    #[arg(long, default_value_t = 1000)]
    pub jobs_keep: u64,
    /// Finished jobs older than this are pruned ('30m', '12h', '7d').
    #[arg(long, default_value = "7d")]
    pub jobs_max_age: String,
}

impl StoreFlags {
    pub fn limits(&self) -> anyhow::Result<crate::store::Limits> {
        let kv = crate::worker::parse_memory(&self.kv_quota)
            .map_err(|e| anyhow::anyhow!("--kv-quota: {e}"))?;
        let age = crate::worker::parse_duration(&self.jobs_max_age)
            .map_err(|e| anyhow::anyhow!("--jobs-max-age: {e}"))?;
        Ok(crate::store::Limits {
            kv_bytes_per_app: kv,
            jobs_keep_per_app: self.jobs_keep,
            jobs_max_age_ms: age,
        })
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    crate::worker::parse_memory(s).and_then(|b| usize::try_from(b).map_err(|e| e.to_string()))
}

fn parse_memory(s: &str) -> Result<u64, String> {
    crate::worker::parse_memory(s)
}

fn parse_time(s: &str) -> Result<Duration, String> {
    crate::worker::parse_duration(s).map(Duration::from_millis)
}

impl ServerArgs {
    /// The server configuration these flags describe.
    pub fn to_config(&self, data_dir: &std::path::Path) -> anyhow::Result<crate::config::Config> {
        let counts = [
            ("--http-threads", self.http_threads),
            ("--ws-max-per-app", self.ws_max_per_app),
            ("--ws-max-per-ip", self.ws_max_per_ip),
            ("--max-connections", self.max_connections),
            ("--max-connections-per-ip", self.max_connections_per_ip),
        ];
        if let Some((flag, _)) = counts.iter().find(|(_, n)| *n == 0) {
            bail!("{flag} must be at least 1");
        }
        let mut config = crate::config::Config {
            listen: self.listen.clone(),
            data_dir: data_dir.to_path_buf(),
            http_threads: self.http_threads,
            http: crate::http::HttpLimits {
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
                max_request_line: self.max_request_line,
                max_header_bytes: self.max_header_bytes,
                head_timeout: self.head_timeout,
                idle_timeout: self.idle_timeout,
                body_timeout: self.body_timeout,
                write_timeout: self.write_timeout,
                max_handler_body: self.max_body,
            },
            store: self.store.limits()?,
            ..Default::default()
        };
        config.pool.memory_budget = self.memory_budget;
        config.realtime.per_app = self.ws_max_per_app;
        config.realtime.per_ip = self.ws_max_per_ip;
        Ok(config)
    }
}

#[derive(Subcommand, Debug)]
pub enum AppCommand {
    /// Upload a folder as an app (replaces the previous version atomically).
    #[command(after_help = "Examples:
  fazt app deploy ./shop
  fazt app deploy ./build --name shop")]
    Deploy {
        /// Folder with static files, api/*.js handlers and workers/*.js jobs.
        dir: PathBuf,
        /// App name (default: the folder's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List deployed apps with their version, files and size.
    #[command(after_help = "Example:\n  fazt app list")]
    List,
    /// Remove an app: stops its handlers, jobs and WebSockets, deletes its files, kv
    /// data and jobs.
    #[command(after_help = "Example:\n  fazt app remove shop")]
    Remove {
        /// The app's name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// List jobs, newest first.
    #[command(after_help = "Examples:
  fazt job list
  fazt job list --app shop --status failed --limit 20
  fazt job list --app shop --error timeout --json
  fazt job list --before 1700000000000-j-0001   (the next page, from --json's cursor)")]
    List {
        /// Only jobs of this app.
        #[arg(long)]
        app: Option<String>,
        /// Only jobs in this status: queued, running, done, failed, cancelled, stopped.
        #[arg(long)]
        status: Option<String>,
        /// Only jobs of this worker file (e.g. workers/send.js).
        #[arg(long)]
        path: Option<String>,
        /// Only jobs whose error contains this text.
        #[arg(long)]
        error: Option<String>,
        /// Only jobs older than this cursor (the `next` of a previous --json page).
        #[arg(long)]
        before: Option<String>,
        /// Most jobs to list (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON: {"jobs": [...], "next": cursor or null}.
        #[arg(long)]
        json: bool,
    },
    /// Show one job: data, result, error, attempts, restarts, timings.
    #[command(after_help = "Example:\n  fazt job show j-0001")]
    Show {
        /// The job's id (see `fazt job list`).
        id: String,
    },
    /// Cancel a queued or running job (its JS stops within 100 ms).
    #[command(after_help = "Example:\n  fazt job cancel j-0001")]
    Cancel {
        /// The job's id (see `fazt job list`).
        id: String,
    },
    /// Run a done, failed, cancelled or stopped job again as a new attempt; with --app,
    /// every job of the app in --status (default failed).
    #[command(after_help = "Examples:
  fazt job retry j-0001
  fazt job retry --app shop --all-failed
  fazt job retry --app shop --status cancelled")]
    Retry {
        /// The job's id (or use --app for a bulk retry).
        #[arg(required_unless_present = "app", conflicts_with = "app")]
        id: Option<String>,
        /// Retry every job of this app in --status.
        #[arg(long)]
        app: Option<String>,
        /// With --app: which finished jobs (done, failed, cancelled, stopped).
        #[arg(long, requires = "app", default_value = "failed")]
        status: String,
        /// With --app: the same as --status failed (the default), said out loud.
        #[arg(long, requires = "app")]
        all_failed: bool,
    },
    /// Delete a finished job and its logs; with --app, every job of the app in --status
    /// (default failed). Live jobs must be cancelled first.
    #[command(after_help = "Examples:
  fazt job delete j-0001
  fazt job delete --app shop --all-failed")]
    Delete {
        /// The job's id (or use --app for a bulk delete).
        #[arg(required_unless_present = "app", conflicts_with = "app")]
        id: Option<String>,
        /// Delete every job of this app in --status.
        #[arg(long)]
        app: Option<String>,
        /// With --app: which finished jobs (done, failed, cancelled, stopped).
        #[arg(long, requires = "app", default_value = "failed")]
        status: String,
        /// With --app: the same as --status failed (the default), said out loud.
        #[arg(long, requires = "app")]
        all_failed: bool,
    },
    /// Print a job's log (the last 1,000 lines); --follow keeps printing until it ends.
    #[command(after_help = "Examples:
  fazt job logs j-0001
  fazt job logs j-0001 --follow")]
    Logs {
        /// The job's id (see `fazt job list`).
        id: String,
        /// Keep printing new lines (with a progress bar) until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
}

/// A small blocking client for the system API.
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(server: &str, data_dir: &std::path::Path) -> anyhow::Result<Client> {
        let token = match std::env::var("FAZT_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => {
                let path = data_dir.join("admin.token");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no admin token: set FAZT_TOKEN or point --data-dir at the server's data dir ({} not readable)",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Ok(Client {
            base: server.trim_end_matches('/').to_string(),
            token,
            agent,
        })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<serde_json::Value> {
        self.send(method, path, body, None).map(|(v, _)| v)
    }

    /// A GET that also returns the reply's `header` (e.g. a page cursor).
    fn call_with_header(
        &self,
        path: &str,
        header: &str,
    ) -> anyhow::Result<(serde_json::Value, Option<String>)> {
        self.send("GET", path, None, Some(header))
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        header: Option<&str>,
    ) -> anyhow::Result<(serde_json::Value, Option<String>)> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            ("PUT", Some(b)) => self
                .agent
                .put(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(&b[..]),
            ("POST", b) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send(&b.unwrap_or_default()[..]),
            _ => bail!("unsupported request {method} {path}"),
        };
        let mut resp = resp.with_context(|| {
            format!(
                "cannot reach the server at {}: is `fazt server` running there? (pass --server URL or set FAZT_SERVER)",
                self.base
            )
        })?;
        let status = resp.status().as_u16();
        let wanted = header.and_then(|h| {
            resp.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .context("reading the server's reply")?;
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        if status >= 400 {
            let msg = value
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            let hint = match status {
                401 | 403 => {
                    " (check FAZT_TOKEN or --data-dir: the token is in <data-dir>/admin.token)"
                }
                503 => " (the server is busy or cannot write now: try again shortly)",
                _ => "",
            };
            bail!("server said {status}: {msg}{hint}");
        }
        Ok((value, wanted))
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `fazt check` and `fazt backup`: they open the database file, not the server.
pub fn run_data_command(cli: &Cli) -> anyhow::Result<()> {
    use crate::store::check::{self, Verdict};
    let mut out = std::io::stdout().lock();
    let db = cli.data_dir.join("fazt.db");
    match &cli.command {
        Command::Check { file } => {
            let path = file.as_ref().unwrap_or(&db);
            match check::integrity_check(path)
                .with_context(|| format!("checking {}", path.display()))?
            {
                Verdict::Ok => writeln!(out, "{}: ok", path.display())?,
                Verdict::Damaged(found) => {
                    for f in &found {
                        writeln!(out, "{}: {f}", path.display())?;
                    }
                    bail!(
                        "{} is damaged ({} problem(s) listed above)",
                        path.display(),
                        found.len()
                    );
                }
                Verdict::Unfinished => bail!("the check of {} was interrupted", path.display()),
            }
        }
        Command::Backup { file } => {
            let bytes = check::backup(&db, file)
                .with_context(|| format!("backing up {} to {}", db.display(), file.display()))?;
            match check::quick_check(file, Duration::from_secs(60))? {
                Verdict::Damaged(found) => bail!(
                    "the backup {} does not pass quick_check: {}",
                    file.display(),
                    found.join("; ")
                ),
                Verdict::Ok | Verdict::Unfinished => {}
            }
            writeln!(
                out,
                "backed up {} to {} ({bytes} bytes)",
                db.display(),
                file.display()
            )?;
        }
        _ => bail!("not a data command"),
    }
    Ok(())
}

pub fn run_client(cli: &Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::Check { .. } | Command::Backup { .. }) {
        return run_data_command(cli);
    }
    let client = Client::new(&cli.server, &cli.data_dir)?;
    let mut out = std::io::stdout().lock();
    match &cli.command {
        Command::Server(_) => {
            bail!("`fazt server` runs the server; it is not a client command")
        }
        Command::Check { .. } | Command::Backup { .. } => return run_data_command(cli),
        Command::App { command } => match command {
            AppCommand::Deploy { dir, name } => {
                let name = match name {
                    Some(n) => n.clone(),
                    None => dir
                        .canonicalize()
                        .with_context(|| format!("no such folder {}", dir.display()))?
                        .file_name()
                        .map(|n| n.to_string_lossy().to_lowercase())
                        .context("cannot take an app name from the folder; pass --name")?,
                };
                crate::apps::check_name(&name).map_err(anyhow::Error::msg)?;
                let files = crate::apps::read_dir_files(dir)
                    .with_context(|| format!("reading {}", dir.display()))?;
                if files.is_empty() {
                    bail!("{} has no files to deploy", dir.display());
                }
                let body = crate::apps::encode_upload(&files);
                let info = client.call("PUT", &format!("/api/apps/{name}"), Some(body))?;
                writeln!(
                    out,
                    "deployed {name}: version {}, {} files, {} bytes",
                    info["version"], info["files"], info["bytes"]
                )?;
            }
            AppCommand::List => {
                let apps = client.call("GET", "/api/apps", None)?;
                writeln!(
                    out,
                    "{:<30} {:>8} {:>6} {:>10}",
                    "NAME", "VERSION", "FILES", "BYTES"
                )?;
                for a in apps.as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "{:<30} {:>8} {:>6} {:>10}",
                        a["name"].as_str().unwrap_or(""),
                        a["version"].to_string(),
                        a["files"].to_string(),
                        a["bytes"].to_string()
                    )?;
                }
            }
            AppCommand::Remove { name } => {
                client.call("DELETE", &format!("/api/apps/{name}"), None)?;
                writeln!(out, "removed {name}")?;
            }
        },
        Command::Job { command } => match command {
            JobCommand::List {
                app,
                status,
                path,
                error,
                before,
                limit,
                json,
            } => {
                let mut q = format!("/api/jobs?limit={limit}");
                for (k, v) in [
                    ("app", app),
                    ("status", status),
                    ("path", path),
                    ("q", error),
                    ("before", before),
                ] {
                    if let Some(v) = v {
                        q.push_str(&format!("&{k}={}", url_encode(v)));
                    }
                }
                let (jobs, next) = client.call_with_header(&q, "x-next-cursor")?;
                if *json {
                    let page = serde_json::json!({ "jobs": jobs, "next": next });
                    writeln!(out, "{}", serde_json::to_string_pretty(&page)?)?;
                    return Ok(());
                }
                writeln!(
                    out,
                    "{:<28} {:<16} {:<24} {:<10} {:>4}  ERROR",
                    "ID", "APP", "PATH", "STATUS", "PCT"
                )?;
                for j in jobs.as_array().into_iter().flatten() {
                    writeln!(
                        out,
                        "{:<28} {:<16} {:<24} {:<10} {:>4}  {}",
                        j["id"].as_str().unwrap_or(""),
                        j["app"].as_str().unwrap_or(""),
                        j["path"].as_str().unwrap_or(""),
                        j["status"].as_str().unwrap_or(""),
                        j["progress"].to_string(),
                        j["error"].as_str().unwrap_or("")
                    )?;
                }
            }
            JobCommand::Show { id } => {
                let job = client.call("GET", &format!("/api/jobs/{id}"), None)?;
                writeln!(out, "{}", serde_json::to_string_pretty(&job)?)?;
            }
            JobCommand::Cancel { id } => {
                let job = client.call("POST", &format!("/api/jobs/{id}/cancel"), None)?;
                writeln!(out, "{id}: {}", job["status"].as_str().unwrap_or("?"))?;
            }
            JobCommand::Logs { id, follow } => follow_logs(&client, id, *follow, &mut out)?,
            JobCommand::Retry {
                id,
                app,
                status,
                all_failed,
            } => match (id, app) {
                (Some(id), _) => {
                    let job = client.call("POST", &format!("/api/jobs/{id}/retry"), None)?;
                    writeln!(
                        out,
                        "{id}: {} (attempt {})",
                        job["status"].as_str().unwrap_or("?"),
                        job["attempt"]
                    )?;
                }
                (None, Some(app)) => {
                    let st = if *all_failed { "failed" } else { status };
                    let r = client.call(
                        "POST",
                        &format!("/api/apps/{app}/jobs/retry?status={}", url_encode(st)),
                        None,
                    )?;
                    writeln!(out, "retried {} {st} job(s) of {app}", r["retried"])?;
                    if r["left"].as_i64().is_some_and(|n| n > 0) {
                        writeln!(
                            out,
                            "{} more {st} job(s) wait: the app's job queue is full; run this again once it drains",
                            r["left"]
                        )?;
                    }
                }
                (None, None) => bail!("name a job id, or --app APP for a bulk retry"),
            },
            JobCommand::Delete {
                id,
                app,
                status,
                all_failed,
            } => match (id, app) {
                (Some(id), _) => {
                    client.call("DELETE", &format!("/api/jobs/{id}"), None)?;
                    writeln!(out, "deleted {id}")?;
                }
                (None, Some(app)) => {
                    let st = if *all_failed { "failed" } else { status };
                    let r = client.call(
                        "DELETE",
                        &format!("/api/apps/{app}/jobs?status={}", url_encode(st)),
                        None,
                    )?;
                    writeln!(out, "deleted {} {st} job(s) of {app}", r["deleted"])?;
                }
                (None, None) => bail!("name a job id, or --app APP for a bulk delete"),
            },
        },
    }
    Ok(())
}

fn print_log_line(out: &mut (impl Write + ?Sized), l: &serde_json::Value) -> std::io::Result<()> {
    writeln!(
        out,
        "{} [{}] {}",
        clock_time(l["ts"].as_i64().unwrap_or(0)),
        l["level"].as_str().unwrap_or(""),
        l["msg"].as_str().unwrap_or("")
    )
}

/// `HH:MM:SS.mmm` (UTC) of an epoch-ms timestamp.
fn clock_time(ms: i64) -> String {
    let day_ms = ms.rem_euclid(86_400_000);
    let (h, m, s, milli) = (
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000,
    );
    format!("{h:02}:{m:02}:{s:02}.{milli:03}")
}

/// Prints the job's log; with `follow`, keeps printing new lines until the job ends,
/// with a progress bar on a terminal (a plain status line at the end otherwise).
fn follow_logs(
    client: &Client,
    id: &str,
    follow: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let mut after = 0i64;
    let print_new = |out: &mut dyn Write, after: &mut i64| -> anyhow::Result<()> {
        let lines = client.call("GET", &format!("/api/jobs/{id}/logs?after={after}"), None)?;
        for l in lines.as_array().into_iter().flatten() {
            *after = (*after).max(l["id"].as_i64().unwrap_or(*after));
            print_log_line(out, l)?;
        }
        Ok(())
    };
    print_new(out, &mut after)?;
    if !follow {
        return Ok(());
    }
    loop {
        let job = client.call("GET", &format!("/api/jobs/{id}"), None)?;
        let status = job["status"].as_str().unwrap_or("");
        let pct = job["progress"].as_i64().unwrap_or(0).clamp(0, 100);
        let done = !matches!(status, "queued" | "running");
        let bar = || {
            let filled = (pct / 5) as usize;
            format!(
                "[{}{}] {pct:>3}% {status}",
                "#".repeat(filled),
                "-".repeat(20 - filled)
            )
        };
        if tty && !done {
            write!(out, "{}", bar())?;
            out.flush()?;
            std::thread::sleep(Duration::from_millis(500));
            // Clear the bar before log lines are printed over it.
            write!(out, "\r\x1b[2K")?;
        } else if !done {
            std::thread::sleep(Duration::from_millis(500));
        }
        // Lines written up to (and after) the status read.
        print_new(out, &mut after)?;
        if done {
            writeln!(out, "{}", bar())?;
            if let Some(e) = job["error"].as_str() {
                writeln!(out, "error: {e}")?;
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::clock_time;

    #[test]
    fn log_times_are_utc_clock_times() {
        assert_eq!(clock_time(0), "00:00:00.000");
        assert_eq!(clock_time(86_400_000 + 3_723_004), "01:02:03.004");
    }
}
