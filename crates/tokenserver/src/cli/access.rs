//! `tokenserver access …`: the access-token flows from a shell, on the store `access.url` names,
//! through the same service as the HTTP APIs (same rules, same errors); output is the v1 API's
//! JSON. And `access import-redis`, the migration from apisonator.

use std::sync::Arc;

use clap::Subcommand;
use serde_json::json;
use tokenserver_store::redis::apisonator::ApisonatorSource;

use crate::access::{AccessTokens, CreateRequest};
use crate::config::Config;
use crate::http::access::TokenView;
use crate::ops::access_import::{import_redis, ImportReport};

/// `access …`.
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Register a token (generated when --token is not given) and print it.
    Create {
        /// Service id.
        service: String,
        /// Application id.
        app_id: String,
        /// The token; generated (256 bits, base64url) when absent.
        #[arg(long)]
        token: Option<String>,
        /// User id.
        #[arg(long)]
        user: Option<String>,
        /// Lifetime in seconds; 0: permanent; default: access.default_ttl.
        #[arg(long, allow_negative_numbers = true)]
        ttl: Option<u64>,
    },
    /// Show who a live token names.
    Get {
        /// Service id.
        service: String,
        /// The token.
        token: String,
    },
    /// Delete a live token.
    Delete {
        /// Service id.
        service: String,
        /// The token.
        token: String,
    },
    /// List an application's live tokens, one page at a time (or --all).
    List {
        /// Service id.
        service: String,
        /// Application id.
        app_id: String,
        /// Only this user's tokens.
        #[arg(long)]
        user: Option<String>,
        /// Tokens per page (1..=1000).
        #[arg(long, default_value_t = crate::access::DEFAULT_PAGE, allow_negative_numbers = true)]
        limit: usize,
        /// Continue after this page (`next_cursor` of the previous one).
        #[arg(long)]
        cursor: Option<String>,
        /// Every page, one token per line (JSON lines).
        #[arg(long)]
        all: bool,
    },
    /// Delete every live token of an application, or with no --app of the whole service.
    Revoke {
        /// Service id.
        service: String,
        /// Only this application's tokens.
        #[arg(long = "app")]
        app_id: Option<String>,
    },
    /// Copy apisonator's tokens (its Redis key layout, R1 and R2 values) into access.url.
    /// Idempotent: tokens already present are left alone.
    ImportRedis {
        /// apisonator's Redis: redis://host:port/db, or redis+cluster://h1:p1,h2:p2/.
        #[arg(long = "from", value_name = "URL")]
        from: String,
        /// Only these services (repeatable); their ids also split keys whose service id holds
        /// `/` (without it, a service id ends at the first `/`).
        #[arg(long = "service")]
        services: Vec<String>,
    },
}

/// Runs one `access` subcommand.
pub async fn run(cmd: AccessCommand, config: &Config) -> Result<(), String> {
    let Some(cfg) = &config.access else {
        return Err("access tokens are disabled (access.enabled = false)".into());
    };
    let settings = crate::app::store_settings(config);
    let store = tokenserver_store::open_access(cfg.url.expose(), &settings).await.map_err(|e| e.to_string())?;
    let access = Arc::new(AccessTokens::new(store, cfg));
    fn show(v: &impl serde::Serialize) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
    match cmd {
        AccessCommand::Create { service, app_id, token, user, ttl } => {
            let req = CreateRequest { token: token.as_deref(), app_id: &app_id, user_id: user.as_deref(), ttl_s: ttl };
            let created = access.create(&service, &req).await.map_err(|e| e.to_string())?;
            show(&TokenView::of(&created));
        }
        AccessCommand::Get { service, token } => {
            let t = access.get(&service, &token).await.map_err(|e| e.to_string())?;
            show(&TokenView::of(&t));
        }
        AccessCommand::Delete { service, token } => {
            access.delete(&service, &token).await.map_err(|e| e.to_string())?;
            println!("deleted");
        }
        AccessCommand::List { service, app_id, user, limit, cursor, all } => {
            let mut cursor = cursor;
            loop {
                let page = access
                    .list(&service, &app_id, user.as_deref(), cursor.as_deref(), Some(limit))
                    .await
                    .map_err(|e| e.to_string())?;
                if !all {
                    let tokens: Vec<_> = page.tokens.iter().map(TokenView::of).collect();
                    show(&json!({ "tokens": tokens, "next_cursor": page.next }));
                    break;
                }
                for t in &page.tokens {
                    println!("{}", serde_json::to_string(&TokenView::of(t)).unwrap_or_default());
                }
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
        }
        AccessCommand::Revoke { service, app_id } => {
            let revoked = match &app_id {
                Some(app) => access.revoke_app(&service, app).await,
                None => access.revoke_service(&service).await,
            }
            .map_err(|e| e.to_string())?;
            println!("revoked {revoked} token(s)");
        }
        AccessCommand::ImportRedis { from, services } => {
            let mut source = ApisonatorSource::open(&from, services).await.map_err(|e| format!("{from}: {e}"))?;
            let mut last_shown = 0;
            let progress = |r: &ImportReport| {
                if r.read() >= last_shown + 10_000 {
                    last_shown = r.read();
                    eprintln!(
                        "… {} read: {} imported, {} already present, {} refused",
                        r.read(),
                        r.imported,
                        r.present,
                        r.refused
                    );
                }
            };
            let refused = |r: &crate::ops::access_import::Refusal| {
                eprintln!("refused a token of service {:?} ({}): {}", r.service, r.fingerprint, r.error);
            };
            let report = import_redis(&access, &mut source, progress, refused).await.map_err(|e| e.to_string())?;
            println!(
                "imported {} token(s); {} already present, {} refused, {} other key(s) passed over",
                report.imported, report.present, report.refused, report.passed_over
            );
        }
    }
    Ok(())
}
