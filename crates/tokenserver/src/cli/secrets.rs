//! `secret show|rotate` (the master secret the storage nodes share) and `backup` (an online copy
//! of the SQLite database, which holds the generated secrets).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::app;
use crate::config::Config;

/// `secret …`.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Print the master secret that signs tokens (the newest), for the storage nodes'
    /// `SYNC_MASTER_SECRET`; `--all` prints every one in force, newest last.
    Show {
        /// Every secret, one per line, newest last.
        #[arg(long)]
        all: bool,
    },
    /// Add a new newest generated master secret; the older ones keep verifying tokens already
    /// issued. Restart the servers (after giving the storage nodes the new secret) to sign with it.
    Rotate,
}

/// `backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The copy to write (must not exist).
    pub file: PathBuf,
}

/// Runs `secret …`.
pub async fn secret(cmd: SecretCommand, config: &Config) -> Result<(), String> {
    match cmd {
        SecretCommand::Show { all } => {
            let secrets = super::secrets_in_force(config).await?;
            let shown: &[String] = if all { &secrets } else { secrets.last().map(std::slice::from_ref).unwrap_or(&[]) };
            for s in shown {
                println!("{s}");
            }
            Ok(())
        }
        SecretCommand::Rotate => {
            if !config.master_secrets.is_empty() {
                return Err(
                    "master_secret is configured: rotate it there (add the new secret last, keep the old ones \
                            while their tokens live)"
                        .into(),
                );
            }
            let store = app::open_store(config).await.map_err(|e| e.to_string())?;
            let fresh = crate::keys::generate_secret();
            let Some(list) = store.add_generated_secret("master_secret", &fresh).await.map_err(|e| e.to_string())?
            else {
                return Err(
                    "this database keeps no generated secrets (PostgreSQL/MySQL): configure master_secret".into()
                );
            };
            eprintln!(
                "master secrets: {} in force, the new one signs after a restart of the servers; \
                 `tokenserver secret show` prints it for the storage nodes",
                list.len()
            );
            Ok(())
        }
    }
}

/// Runs `backup FILE`.
pub async fn backup(args: BackupArgs, config: &Config) -> Result<(), String> {
    let url = config.database.url.expose().clone();
    if !matches!(tokenserver_store::Backend::from_url(&url), Ok(tokenserver_store::Backend::Sqlite)) {
        return Err("backup copies an SQLite database; for PostgreSQL use pg_dump, for MySQL/MariaDB mysqldump \
                    (or mariadb-dump)"
            .into());
    }
    let dest = args.file.clone();
    let report = tokio::task::spawn_blocking(move || {
        let mut last = -1;
        tokenserver_store::sqlite::backup(&url, &dest, &mut |done, total| {
            let pct = if total > 0 { done * 100 / total } else { 100 };
            if pct / 10 != last / 10 {
                eprint!("\rbackup: {done}/{total} pages");
                last = pct;
            }
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    eprintln!();
    println!("backed up {} pages ({} bytes) to {}", report.pages, report.bytes, args.file.display());
    Ok(())
}
