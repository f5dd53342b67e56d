//! Command line: `serve` (the default), `migrate`, `node add|list|update|drain|unassign|remove`,
//! `user show|assign|count`, `bucket list|move`, `events`, `purge`, `token inspect`, `keys`,
//! `secret show|rotate`, `backup`, `config check`, `access …`.

mod access;
mod secrets;
mod sync_ops;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use tokenserver_core::sync::tokenlib::parse_token;

use crate::app;
use crate::config::{self, Config};
use crate::ops::node::{self, NodePatch, NodeSpec, NodeView};

/// Issues, checks, rotates and revokes tokens (Mozilla Tokenserver compatible).
#[derive(Debug, Parser)]
#[command(name = "tokenserver", version, about)]
pub struct Cli {
    /// TOML configuration file (Mozilla's syncserver files work as they are).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Unknown configuration keys are warnings, not errors (as `config.unknown_keys = "warn"`).
    #[arg(long, global = true)]
    pub lenient: bool,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (public and internal listeners).
    Serve,
    /// Create or upgrade the database schema, then exit.
    Migrate,
    /// Storage node operations.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Sync users: look up, assign to a node, count.
    #[command(subcommand)]
    User(sync_ops::UserCommand),
    /// Bucketed assignment: list buckets, move one to another node.
    #[command(subcommand)]
    Bucket(sync_ops::BucketCommand),
    /// Apply account events (delete, reset, passwordChange) from JSON lines, as the legacy
    /// process_account_events did from SQS.
    Events(sync_ops::EventsArgs),
    /// Purge old Sync records once: delete replaced users' data on their storage nodes, then
    /// their rows.
    Purge(sync_ops::PurgeArgs),
    /// Token utilities.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Access tokens: create, get, delete, list, revoke; import from apisonator's Redis.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// The master secret shared with the storage nodes: show it, rotate a generated one.
    #[command(subcommand)]
    Secret(secrets::SecretCommand),
    /// Copy the SQLite database (node assignments, generated secrets, sessions, access tokens)
    /// to FILE while servers keep running.
    Backup(secrets::BackupArgs),
    /// The configuration itself.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show the keys and secrets in force and where each comes from; generated ones (kept in
    /// the database) are printed so that they can be given to storage nodes and API clients.
    Keys {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration, each value with its source (default, file or
    /// environment variable), secrets masked; then validate it (exit 2 when invalid).
    Check,
}

/// `node …`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Register a storage node.
    Add(NodeAdd),
    /// List nodes with their load, flags and live user counts.
    List {
        /// Only this service (e.g. sync-1.5).
        #[arg(long)]
        service: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Change a node's capacity, available slots or load, and set or clear its flags.
    Update(NodeUpdate),
    /// Stop giving a node new users (available 0, backoff set); its users keep it.
    Drain(NodeTarget),
    /// Unassign every user of a node: each is given a node again on its next request.
    Unassign(NodeTarget),
    /// Delete a node and unassign its users.
    Remove(NodeTarget),
}

/// The node a command acts on.
#[derive(Debug, Args)]
pub struct NodeTarget {
    /// Node URL, as added.
    pub url: String,
    /// Service.
    #[arg(long, default_value = "sync-1.5")]
    pub service: String,
}

/// `node update`.
#[derive(Debug, Args)]
pub struct NodeUpdate {
    #[command(flatten)]
    pub target: NodeTarget,
    #[command(flatten)]
    pub patch: NodePatch,
}

/// `node add`.
#[derive(Debug, Args)]
pub struct NodeAdd {
    /// Node URL, e.g. https://sync-1.example.com
    #[allow(rustdoc::bare_urls)] // clap prints this line as the argument's help
    pub url: String,
    /// Maximum number of users.
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(1..))]
    pub capacity: i64,
    /// Slots available now (default: ceil(capacity × release rate)).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(0..))]
    pub available: Option<i64>,
    /// Initial load.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(0..))]
    pub current_load: i64,
    /// Add it downed.
    #[arg(long)]
    pub downed: bool,
    /// Add it in backoff.
    #[arg(long)]
    pub backoff: bool,
    /// Service.
    #[arg(long, default_value = "sync-1.5")]
    pub service: String,
}

/// `token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Verify a Sync token as a storage node would, and print its payload and derived key.
    Inspect {
        /// The token (`id` of the token response).
        id: String,
        /// Master secret to try (repeatable); default: the configured ones.
        #[arg(long = "secret")]
        secrets: Vec<String>,
    },
}

fn env_vars() -> Vec<(String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect()
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Config(ConfigCommand::Check)) = cli.command {
        return config_check(cli.config.as_deref(), &env_vars(), cli.lenient);
    }
    let config = match config::load_with(cli.config.as_deref(), &env_vars(), cli.lenient) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tokenserver: {e}");
            return ExitCode::from(2);
        }
    };
    let serving = matches!(cli.command, None | Some(Command::Serve));
    let _log_guard = crate::telemetry::init_logging(config.human_logs || !serving);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokenserver: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenserver: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> Result<(), String> {
    match command {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            let settings =
                tokenserver_store::StoreSettings { pool: config.database.pool.clone(), ..Default::default() };
            let store = tokenserver_store::open_sync(config.database.url.expose(), &settings)
                .await
                .map_err(|e| e.to_string())?;
            let report = store.migrate().await.map_err(|e| e.to_string())?;
            if report.applied.is_empty() {
                println!("database schema is up to date");
            } else {
                println!("applied migrations: {}", report.applied.join(", "));
            }
            Ok(())
        }
        Command::Node(cmd) => node_command(cmd, config).await,
        Command::User(cmd) => sync_ops::user(cmd, &config).await,
        Command::Bucket(cmd) => sync_ops::bucket(cmd, &config).await,
        Command::Events(args) => sync_ops::events(args, &config).await,
        Command::Purge(args) => sync_ops::purge(args, &config).await,
        Command::Token(TokenCommand::Inspect { id, secrets }) => inspect(&id, secrets, &config).await,
        Command::Keys { json } => keys(&config, json).await,
        Command::Config(ConfigCommand::Check) => Ok(()),
        Command::Secret(cmd) => secrets::secret(cmd, &config).await,
        Command::Backup(args) => secrets::backup(args, &config).await,
        Command::Access(cmd) => access::run(cmd, &config).await,
    }
}

/// `tokenserver config check`.
fn config_check(path: Option<&std::path::Path>, vars: &[(String, String)], lenient: bool) -> ExitCode {
    match config::check::effective(path, vars) {
        Ok(entries) => {
            let width = entries.iter().map(|e| e.key.len() + e.value.len() + 3).max().unwrap_or(0).min(72);
            for e in &entries {
                let line = format!("{} = {}", e.key, e.value);
                println!("{line:<width$}  # {}", e.source);
            }
        }
        Err(e) => eprintln!("tokenserver: cannot read the configuration: {e}"),
    }
    match config::load_with(path, vars, lenient) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            eprintln!("configuration is valid");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tokenserver: {e}");
            ExitCode::from(2)
        }
    }
}

async fn keys(config: &Config, json: bool) -> Result<(), String> {
    use crate::keys::{KeyInForce, Origin};
    let store = app::open_store(config).await.map_err(|e| e.to_string())?;
    let master = if config.master_secrets.is_empty() {
        match store.generated_secret("master_secret", &crate::keys::generate_secret).await.map_err(|e| e.to_string())? {
            Some((value, created)) => KeyInForce {
                setting: "master_secret",
                value: Some(tokenserver_core::Secret::new(value)),
                origin: Origin::Generated { created },
            },
            None => KeyInForce { setting: "master_secret", value: None, origin: Origin::Missing },
        }
    } else {
        KeyInForce { setting: "master_secret", value: None, origin: Origin::Configured }
    };
    let admin = crate::keys::admin_key(config, Some(store.as_ref())).await.map_err(|e| e.to_string())?;
    let sessions = crate::keys::sessions_api_key(config, Some(store.as_ref())).await.map_err(|e| e.to_string())?;
    let access = crate::keys::access_api_key(config, Some(store.as_ref())).await.map_err(|e| e.to_string())?;
    let rows: Vec<(&str, &str, Option<&str>)> = [&master, &admin, &sessions, &access]
        .iter()
        .map(|k| {
            let (origin, value) = match k.origin {
                // Configured values are the operator's own: not repeated here.
                Origin::Configured => ("configured", None),
                Origin::Generated { .. } => ("generated", k.value.as_ref().map(|v| v.expose().as_str())),
                Origin::Missing => ("missing", None),
                Origin::NotRequired => ("not required", None),
            };
            (k.setting, origin, value)
        })
        .collect();
    if json {
        let map: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(setting, origin, value)| {
                (setting.to_string(), serde_json::json!({ "origin": origin, "value": value }))
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&map).unwrap_or_default());
        return Ok(());
    }
    for (setting, origin, value) in rows {
        let shown = match (origin, value) {
            (_, Some(v)) => v.to_string(),
            ("configured", _) => "(set in the configuration)".into(),
            ("missing", _) => "(none: set it in the configuration)".into(),
            _ => String::new(),
        };
        println!("{setting:<20} {origin:<13} {shown}");
    }
    Ok(())
}

async fn serve(config: Config) -> Result<(), String> {
    let running = app::start(config).await.map_err(|e| e.to_string())?;
    match running.public_addr {
        Some(public) => tracing::info!(internal = %running.internal_addr, "Server running on http://{public}"),
        None => tracing::info!("Server running on http://{} (internal listener only)", running.internal_addr),
    }
    shutdown_signal().await;
    tracing::info!("Server closing");
    running.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn node_command(cmd: NodeCommand, config: Config) -> Result<(), String> {
    let store = match &cmd {
        NodeCommand::List { .. } => app::open_existing_store(&config).await,
        _ => app::open_store(&config).await,
    }
    .map_err(|e| e.to_string())?;
    match cmd {
        NodeCommand::Add(a) => {
            // A configured application's service may not have its row yet (the server adds it at
            // start): add it, so nodes can be registered before the first start.
            if let Some(app) = config.sync.applications.iter().find(|app| app.service == a.service) {
                store.ensure_service(&app.service, &app.pattern).await.map_err(|e| e.to_string())?;
            }
            let spec = NodeSpec {
                node: a.url,
                capacity: a.capacity,
                available: a.available,
                current_load: a.current_load,
                downed: a.downed,
                backoff: a.backoff,
                service: Some(a.service),
            };
            let view = node::add(store.as_ref(), &spec, config.sync.release_rate).await.map_err(|e| e.to_string())?;
            println!(
                "added node {} (id {}, service {}, capacity {}, available {})",
                view.node, view.id, view.service, view.capacity, view.available
            );
            Ok(())
        }
        NodeCommand::List { service, json } => {
            let nodes = node::list(store.as_ref(), service.as_deref()).await.map_err(|e| e.to_string())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes).unwrap_or_default());
                return Ok(());
            }
            println!(
                "{:>5}  {:<10}  {:<40}  {:>8}  {:>9}  {:>8}  {:>8}  FLAGS",
                "ID", "SERVICE", "NODE", "LOAD", "CAPACITY", "AVAIL", "USERS"
            );
            for n in nodes {
                let flags = [(n.downed, "downed"), (n.backoff, "backoff")]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, f)| *f)
                    .collect::<Vec<_>>()
                    .join(",");
                println!(
                    "{:>5}  {:<10}  {:<40}  {:>8}  {:>9}  {:>8}  {:>8}  {}",
                    n.id, n.service, n.node, n.current_load, n.capacity, n.available, n.live_users, flags
                );
            }
            Ok(())
        }
        NodeCommand::Update(u) => {
            let view = node::update(store.as_ref(), &u.target.service, &u.target.url, &u.patch)
                .await
                .map_err(|e| e.to_string())?;
            print_node("updated", &view);
            Ok(())
        }
        NodeCommand::Drain(t) => {
            let view = node::drain(store.as_ref(), &t.service, &t.url).await.map_err(|e| e.to_string())?;
            print_node("drained", &view);
            Ok(())
        }
        NodeCommand::Unassign(t) => {
            let n = node::unassign(store.as_ref(), &t.service, &t.url).await.map_err(|e| e.to_string())?;
            println!("unassigned {n} users of node {}", t.url);
            Ok(())
        }
        NodeCommand::Remove(t) => {
            let n = node::remove(store.as_ref(), &t.service, &t.url).await.map_err(|e| e.to_string())?;
            println!("removed node {} and unassigned its {n} users", t.url);
            Ok(())
        }
    }
}

fn print_node(what: &str, n: &NodeView) {
    println!(
        "{what} node {} (id {}, service {}): capacity {}, load {}, available {}, downed {}, backoff {}",
        n.node, n.id, n.service, n.capacity, n.current_load, n.available, n.downed, n.backoff
    );
}

/// The master secrets in force, newest last: the configured ones (no database needed), else the
/// generated ones of an existing database.
pub(crate) async fn secrets_in_force(config: &Config) -> Result<Vec<String>, String> {
    if !config.master_secrets.is_empty() {
        return Ok(config.master_secrets.iter().map(|s| s.expose().clone()).collect());
    }
    let store = app::open_existing_store(config).await.map_err(|e| e.to_string())?;
    let secrets = app::master_secrets(config, store.as_ref()).await.map_err(|e| e.to_string())?;
    Ok(secrets.into_iter().map(|s| s.expose().clone()).collect())
}

async fn inspect(id: &str, secrets: Vec<String>, config: &Config) -> Result<(), String> {
    let secrets: Vec<String> = if !secrets.is_empty() { secrets } else { secrets_in_force(config).await? };
    let bytes: Vec<&[u8]> = secrets.iter().map(|s| s.as_bytes()).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let parsed = parse_token(id.trim(), &bytes, now, true).map_err(|e| format!("invalid token: {e}"))?;
    let out = serde_json::json!({
        "valid": true,
        "expired": parsed.expired,
        "secret_index": parsed.secret_index,
        "payload": parsed.payload,
        "key": parsed.key,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}
