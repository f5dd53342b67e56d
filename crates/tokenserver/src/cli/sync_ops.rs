//! `tokenserver user …`, `tokenserver events` and `tokenserver purge`: the Sync operations beside
//! `node …`, over the same code as the internal API ([`crate::ops`]).

use std::io::{BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::app;
use crate::config::Config;
use crate::ops::purge::{PurgeOptions, PurgeReport, Purger};
use crate::ops::user::{self, UserRef, UserView};
use crate::ops::{account, OpsError};

/// `user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Show a user's current node and history (by email `<fxa_uid>@<domain>` or by uid).
    Show {
        /// Email or uid.
        user: String,
        /// Service.
        #[arg(long, default_value = "sync-1.5")]
        service: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Put a user on a named node (created there when new); its other rows are replaced.
    Assign {
        /// Email or uid.
        user: String,
        /// Node URL, as added.
        node: String,
        /// Service.
        #[arg(long, default_value = "sync-1.5")]
        service: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Count live users created at or before a time (Mozilla's count_users: one JSON line).
    Count {
        /// Milliseconds since the epoch; default: the previous UTC midnight.
        #[arg(short = 't', long, allow_negative_numbers = true)]
        timestamp: Option<u64>,
        /// Only this service; default: all.
        #[arg(long)]
        service: Option<String>,
        /// Append the line to this file instead of printing it (`-`: stdout).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
}

/// `bucket …`.
#[derive(Debug, Subcommand)]
pub enum BucketCommand {
    /// The buckets that have a node.
    List {
        /// Service.
        #[arg(long, default_value = "sync-1.5")]
        service: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Assign a bucket to a node; its users elsewhere move there on their next request.
    Move {
        /// The bucket (0 ≤ bucket < tokenserver.buckets).
        #[arg(allow_negative_numbers = true)]
        bucket: u32,
        /// Node URL, as added.
        node: String,
        /// Service.
        #[arg(long, default_value = "sync-1.5")]
        service: String,
    },
}

/// Runs `bucket …`.
pub async fn bucket(cmd: BucketCommand, config: &Config) -> Result<(), String> {
    let store = match &cmd {
        BucketCommand::List { .. } => app::open_existing_store(config).await,
        BucketCommand::Move { .. } => app::open_store(config).await,
    }
    .map_err(text)?;
    let buckets = config.sync.buckets;
    match cmd {
        BucketCommand::List { service, json } => {
            let list = crate::ops::bucket::list(store.as_ref(), buckets, &service).await.map_err(text)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list).map_err(text)?);
            } else {
                println!("{:>8}  NODE", "BUCKET");
                for b in list {
                    println!(
                        "{:>8}  {}",
                        b.bucket,
                        b.node.as_deref().unwrap_or("(removed: chosen again on next user)")
                    );
                }
            }
        }
        BucketCommand::Move { bucket, node, service } => {
            let n = crate::ops::bucket::move_to(store.as_ref(), buckets, &service, i64::from(bucket), &node)
                .await
                .map_err(text)?;
            println!("bucket {bucket} assigned to {node}; {n} users unassigned from other nodes");
        }
    }
    Ok(())
}

/// `events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// JSON lines file (`-` or absent: stdin): SNS envelopes `{"Message": "…"}` or bare events
    /// `{"event": "delete"|"reset"|"passwordChange", "uid", "iss", "generation"}`.
    pub file: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    /// Keep rows replaced more recently than this (e.g. `1day`, `12h`, `0s`).
    #[arg(long, default_value = "1day", value_parser = humantime::parse_duration)]
    pub grace_period: Duration,
    /// Rows read per batch (Mozilla's --max-per-loop).
    #[arg(
        long,
        alias = "max-per-loop",
        default_value_t = 100,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub batch_size: u32,
    /// Stop after deleting this many rows (0: no limit).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub max_records: u64,
    /// Report what would be done; call no node and change no row.
    #[arg(long, alias = "dryrun")]
    pub dry_run: bool,
    /// Delete rows of downed nodes without deleting their data.
    #[arg(long)]
    pub force: bool,
    /// Only uids strictly above this.
    #[arg(long, allow_negative_numbers = true)]
    pub range_start: Option<u64>,
    /// Only uids strictly below this.
    #[arg(long, allow_negative_numbers = true)]
    pub range_end: Option<u64>,
    /// Timeout of one storage-node request.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Retries of a storage request failing with 429, 5xx or a network error.
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    pub retries: u32,
    /// Wait before the first retry (doubled for each next one).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// Only this service; default: every configured one.
    #[arg(long)]
    pub service: Option<String>,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Runs `user …`.
pub async fn user(cmd: UserCommand, config: &Config) -> Result<(), String> {
    let store = match &cmd {
        UserCommand::Assign { .. } => app::open_store(config).await,
        UserCommand::Show { .. } | UserCommand::Count { .. } => app::open_existing_store(config).await,
    }
    .map_err(text)?;
    match cmd {
        UserCommand::Show { user: who, service, json } => {
            let view = user::show(store.as_ref(), &service, &UserRef::parse(&who)).await.map_err(text)?;
            print_user(&view, json);
        }
        UserCommand::Assign { user: who, node, service, json } => {
            let view = user::assign(store.as_ref(), &service, &UserRef::parse(&who), &node).await.map_err(text)?;
            print_user(&view, json);
        }
        UserCommand::Count { timestamp, service, output } => {
            let ts = timestamp.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
            let count = user::count(store.as_ref(), service.as_deref(), ts).await.map_err(text)?;
            let line = serde_json::to_string(&count).map_err(text)?;
            match output.filter(|p| p.as_os_str() != "-") {
                Some(path) => {
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                    writeln!(f, "{line}").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                }
                None => println!("{line}"),
            }
        }
    }
    Ok(())
}

fn print_user(view: &UserView, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(view).unwrap_or_default());
        return;
    }
    let c = &view.current;
    println!("user {} (service {}): {}", view.email, view.service, view.status);
    println!(
        "current: uid {} on {} generation {} keys_changed_at {} client_state {:?}",
        c.uid,
        c.node.as_deref().unwrap_or("(no node)"),
        c.generation,
        c.keys_changed_at.map_or("-".into(), |k| k.to_string()),
        c.client_state
    );
    println!(
        "{:>10}  {:<40}  {:>14}  {:>14}  {:>14}  CLIENT_STATE",
        "UID", "NODE", "GENERATION", "CREATED", "REPLACED"
    );
    for r in &view.history {
        println!(
            "{:>10}  {:<40}  {:>14}  {:>14}  {:>14}  {}",
            r.uid,
            r.node.as_deref().unwrap_or("(removed)"),
            r.generation,
            r.created_at,
            r.replaced_at.map_or("-".into(), |t| t.to_string()),
            r.client_state
        );
    }
}

/// Runs `events`.
pub async fn events(args: EventsArgs, config: &Config) -> Result<(), String> {
    let store = app::open_store(config).await.map_err(text)?;
    let services: Vec<&str> = config.sync.services();
    let warn = |line: usize, why: &str| eprintln!("line {line}: {why}");
    let summary = match args.file.filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            let file = std::fs::File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            account::replay(store.as_ref(), &services, BufReader::new(file), warn).await?
        }
        None => account::replay(store.as_ref(), &services, std::io::stdin().lock(), warn).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary).map_err(text)?);
    } else {
        println!(
            "{} messages: {} delete, {} reset, {} passwordChange, {} unknown, {} invalid; {} user rows changed",
            summary.messages,
            summary.delete,
            summary.reset,
            summary.password_change,
            summary.unknown,
            summary.invalid,
            summary.rows_changed
        );
    }
    Ok(())
}

/// Runs `purge` once.
pub async fn purge(args: PurgeArgs, config: &Config) -> Result<(), String> {
    let store = app::open_store(config).await.map_err(text)?;
    let secrets = app::master_secrets(config, store.as_ref()).await.map_err(text)?;
    let mut targets = app::purge_targets(config);
    if let Some(service) = &args.service {
        targets.retain(|t| &t.service == service);
        if targets.is_empty() {
            return Err(format!("service {service:?} is not configured (tokenserver.applications)"));
        }
    }
    let bound = |v: Option<u64>| v.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    let opts = PurgeOptions {
        grace_period: args.grace_period,
        batch_size: i64::from(args.batch_size),
        max_records: args.max_records,
        dry_run: args.dry_run,
        force: args.force,
        uid_above: bound(args.range_start),
        uid_below: bound(args.range_end),
        request_timeout: args.request_timeout,
        retries: args.retries,
        retry_backoff: args.retry_backoff,
    };
    let purger = Purger::new(store, targets, &secrets).map_err(|e: OpsError| e.to_string())?;
    let tty = std::io::stderr().is_terminal();
    let report = purger
        .run(&opts, |r| {
            // One line per batch; rewritten in place on a terminal.
            let line = progress_line(r);
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        })
        .await
        .map_err(text)?;
    if tty {
        eprintln!();
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).map_err(text)?);
    } else {
        println!("{}{}", if report.dry_run { "dry run: " } else { "" }, progress_line(&report));
    }
    if report.failed > 0 {
        return Err(format!("{} rows could not be purged (kept; retried after another grace period)", report.failed));
    }
    Ok(())
}

fn progress_line(r: &PurgeReport) -> String {
    format!(
        "purge: {} examined, {} deleted ({} data deleted, {} node removed, {} forced), {} on downed nodes kept, {} failed{}",
        r.examined,
        r.deleted,
        r.data_deleted,
        r.nodeless,
        r.forced,
        r.skipped_downed,
        r.failed,
        if r.stopped_at_max { ", stopped at --max-records" } else { "" }
    )
}
