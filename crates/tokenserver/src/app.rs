//! Wiring: opens the stores, prepares secrets, keys and the verifier, and serves both listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokenserver_auth::fxa::FxaVerifier;
use tokenserver_core::Secret;
use tokenserver_store::{AccessStore, Family, SessionStore, StoreSettings, SyncStore};
use tokio::net::TcpListener;

use crate::config::Config;
pub use crate::state::{AppState, SyncFamily};
use crate::sync::SyncTokens;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Database problem.
    #[error("database: {0}")]
    Store(#[from] tokenserver_store::StoreError),
    /// Anything else, with its explanation.
    #[error("{0}")]
    Other(String),
}

/// What the configuration opens its stores with.
pub fn store_settings(config: &Config) -> StoreSettings {
    let mut pool = config.database.pool.clone();
    if let Some(access) = &config.access {
        pool.listing_connections = access.listing_connections;
    }
    StoreSettings { pool, memory: config.sessions.as_ref().map(|s| s.memory).unwrap_or_default() }
}

/// The stores the configuration names.
pub struct OpenStores {
    /// Sync node assignment, when enabled.
    pub sync: Option<Arc<dyn SyncStore>>,
    /// Session tokens, when enabled.
    pub sessions: Option<Arc<dyn SessionStore>>,
    /// Access tokens, when enabled.
    pub access: Option<Arc<dyn AccessStore>>,
}

/// Every enabled family's store, each URL opened once for all the families it holds (on SQLite,
/// families in one file share its writer). The Sync schema is migrated when configured to.
pub async fn open_stores(config: &Config) -> Result<OpenStores, StartError> {
    let settings = store_settings(config);
    let mut asked: Vec<(&str, Family)> = Vec::new();
    if config.sync.enabled {
        asked.push((config.database.url.expose(), Family::Sync));
    }
    if let Some(s) = &config.sessions {
        asked.push((s.url.expose(), Family::Sessions));
    }
    if let Some(a) = &config.access {
        asked.push((a.url.expose(), Family::Access));
    }
    let mut wanted: Vec<(&str, Vec<Family>)> = Vec::new();
    for (url, family) in asked {
        match wanted.iter_mut().find(|(u, _)| *u == url) {
            Some((_, families)) => families.push(family),
            None => wanted.push((url, vec![family])),
        }
    }
    let (mut sync, mut sessions, mut access) = (None, None, None);
    for (url, families) in &wanted {
        let opened = open_reachable(url, &settings, families).await?;
        sync = sync.or(opened.sync);
        sessions = sessions.or(opened.sessions);
        access = access.or(opened.access);
    }
    if let Some(sync) = &sync {
        migrate_if_configured(config, sync.as_ref()).await?;
    }
    Ok(OpenStores { sync, sessions, access })
}

/// How long startup waits for a network store to answer before naming it and giving up.
pub const STARTUP_BOUND: Duration = Duration::from_secs(5);

/// What a store URL holds, for messages: "Sync database", "session store" …
fn store_label(families: &[Family]) -> String {
    let names: Vec<&str> = families
        .iter()
        .map(|f| match f {
            Family::Sync => "Sync database",
            Family::Sessions => "session store",
            Family::Access => "access-token store",
        })
        .collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The `host:port`s a network store URL names (credentials left out), with the backend's
/// default port; empty for SQLite and memory.
fn endpoints(url: &str) -> Vec<String> {
    use tokenserver_store::Backend;
    let port = match Backend::from_url(url) {
        Ok(Backend::Postgres) => 5432,
        Ok(Backend::MySql) => 3306,
        Ok(Backend::Redis | Backend::RedisCluster) => 6379,
        _ => return Vec::new(),
    };
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            let has_port = h.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !h.ends_with(']');
            if has_port {
                h.to_string()
            } else {
                format!("{h}:{port}")
            }
        })
        .collect()
}

/// Opens `url` for `families` at startup: a network store that refuses or does not answer within
/// [`STARTUP_BOUND`] stops startup with one line naming the store, its host and the cause
/// (rather than the pool's 30 s wait and a generic message).
async fn open_reachable(
    url: &str,
    settings: &StoreSettings,
    families: &[Family],
) -> Result<tokenserver_store::Stores, StartError> {
    let hosts = endpoints(url);
    if hosts.is_empty() {
        return Ok(tokenserver_store::open(url, settings, families).await?);
    }
    let label = store_label(families);
    let at = hosts.join(",");
    let mut causes = Vec::new();
    for host in &hosts {
        // One host: the host is in the message already.
        let who = if hosts.len() > 1 { format!("{host}: ") } else { String::new() };
        match tokio::time::timeout(STARTUP_BOUND, tokio::net::TcpStream::connect(host.as_str())).await {
            Ok(Ok(_)) => {
                causes.clear();
                break;
            }
            Ok(Err(e)) => causes.push(format!("{who}{e}")),
            Err(_) => causes.push(format!("{who}no answer within {}s", STARTUP_BOUND.as_secs())),
        }
    }
    if !causes.is_empty() {
        return Err(StartError::Other(format!("cannot reach the {label} at {at}: {}", causes.join("; "))));
    }
    match tokio::time::timeout(STARTUP_BOUND, tokenserver_store::open(url, settings, families)).await {
        Ok(Ok(stores)) => Ok(stores),
        Ok(Err(e)) => Err(StartError::Other(format!("cannot open the {label} at {at}: {e}"))),
        Err(_) => Err(StartError::Other(format!(
            "the {label} at {at} accepts connections but did not answer within {}s",
            STARTUP_BOUND.as_secs()
        ))),
    }
}

/// The Sync store alone (the CLI's node and key commands), migrated when configured to.
pub async fn open_store(config: &Config) -> Result<Arc<dyn SyncStore>, StartError> {
    let store = open_reachable(config.database.url.expose(), &store_settings(config), &[Family::Sync])
        .await?
        .sync
        .ok_or_else(|| StartError::Other("no Sync store".into()))?;
    migrate_if_configured(config, store.as_ref()).await?;
    Ok(store)
}

/// [`open_store`] for commands that only read: an SQLite database that does not exist yet is
/// reported rather than created (an empty one would answer "nothing", silently, from the wrong
/// directory).
pub async fn open_existing_store(config: &Config) -> Result<Arc<dyn SyncStore>, StartError> {
    let url = config.database.url.expose();
    if matches!(tokenserver_store::Backend::from_url(url), Ok(tokenserver_store::Backend::Sqlite)) {
        if let Some(path) = tokenserver_store::sqlite::database_file(url)? {
            if !path.exists() {
                return Err(StartError::Other(format!(
                    "no database at {}: nothing to read yet (the server, `tokenserver migrate` or `node add` creates it; \
                     is tokenserver.database_url right?)",
                    path.display()
                )));
            }
        }
    }
    open_store(config).await
}

async fn migrate_if_configured(config: &Config, store: &dyn SyncStore) -> Result<(), StartError> {
    if config.database.run_migrations {
        let report = store.migrate().await?;
        for version in &report.applied {
            tracing::info!(version = %version, "applied migration");
        }
    }
    Ok(())
}

/// The configured master secrets, or the one generated and kept in the database.
pub async fn master_secrets(config: &Config, store: &dyn SyncStore) -> Result<Vec<Secret<String>>, StartError> {
    if !config.master_secrets.is_empty() {
        return Ok(config.master_secrets.clone());
    }
    let Some((secret, created)) = store.generated_secret("master_secret", &crate::keys::generate_secret).await? else {
        return Err(StartError::Other(
            "master_secret must be set when the database is PostgreSQL or MySQL \
             (Mozilla's schema has nowhere to keep a generated one)"
                .into(),
        ));
    };
    // Kept one per line, newest last (`tokenserver secret rotate` appends).
    let secrets: Vec<Secret<String>> =
        secret.lines().filter(|l| !l.is_empty()).map(|l| Secret::new(l.to_string())).collect();
    if created {
        tracing::warn!(
            "no master_secret configured: generated one and stored it in the database; \
             production should set master_secret (SYNC_MASTER_SECRET) and share it with the storage nodes"
        );
    } else {
        tracing::warn!("no master_secret configured: using the one generated on first run (kept in the database)");
    }
    Ok(secrets)
}

/// Builds the application state: store, secrets, bootstrap rows, verifier.
pub async fn build(config: Config) -> Result<AppState, StartError> {
    // Installed before the stores open: their threads take metric handles once, at start.
    let metrics = crate::telemetry::metrics_handle();
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let OpenStores { sync: sync_store, sessions: session_store, access: access_store } = open_stores(&config).await?;
    let config = Arc::new(config);
    let jobs = Arc::new(crate::jobs::Jobs::default());
    let sync = match sync_store {
        Some(store) => Some(sync_family(&config, store, &jobs).await?),
        None => {
            tracing::info!("Sync tokens off (sync.enabled = false): no public listener");
            None
        }
    };
    let store = sync.as_ref().map(|s| s.store.as_ref());
    let admin = crate::keys::admin_key(&config, store).await?;
    crate::keys::log_origin(&admin, "admin routes (node API, metrics, session dumps)");
    let sessions_key = crate::keys::sessions_api_key(&config, store).await?;
    if config.sessions.is_some() {
        crate::keys::log_origin(&sessions_key, "session routes");
    }
    let access_key = crate::keys::access_api_key(&config, store).await?;
    if config.access.is_some() {
        crate::keys::log_origin(&access_key, "access-token v1 routes");
    }
    let sessions = match (&config.sessions, session_store) {
        (Some(cfg), Some(store)) => {
            let sessions = Arc::new(crate::session::Sessions::new(store, cfg));
            sessions.spawn_purge(&jobs);
            tracing::info!(
                backend = sessions.store().backend(),
                token_lifetime = %humantime::format_duration(cfg.token_lifetime),
                purge_interval = %humantime::format_duration(cfg.purge_interval),
                "session tokens enabled"
            );
            Some(sessions)
        }
        _ => None,
    };
    let access = match (&config.access, access_store) {
        (Some(cfg), Some(store)) => {
            let access = Arc::new(crate::access::AccessTokens::new(store, cfg));
            access.spawn_purge(&jobs);
            tracing::info!(backend = access.store().backend(), "access tokens enabled");
            Some(access)
        }
        _ => None,
    };
    Ok(AppState {
        config,
        sync,
        sessions,
        admin_key: admin.bearer(),
        session_access: crate::keys::RouteAccess::of(&sessions_key),
        access,
        access_access: crate::keys::RouteAccess::of(&access_key),
        jobs,
        metrics,
    })
}

/// The Sync family on its store: secrets, services, bootstrap rows, the FxA verifier, the purge.
async fn sync_family(
    config: &Arc<Config>,
    store: Arc<dyn SyncStore>,
    jobs: &Arc<crate::jobs::Jobs>,
) -> Result<SyncFamily, StartError> {
    let secrets = master_secrets(config, store.as_ref()).await?;
    for app in &config.sync.applications {
        store.ensure_service(&app.service, &app.pattern).await?;
    }
    if let Some(buckets) = config.sync.buckets {
        store.enable_buckets().await?;
        tracing::info!(buckets, "bucketed assignment: users are placed by bucket");
    }
    if let Some((url, capacity)) = &config.sync.init_node {
        // One node row per configured service: a server with several applications routes each
        // one's users to the node (Mozilla's init_node_url knows only sync-1.5).
        for service in config.sync.services() {
            if store.init_node(service, url, *capacity).await? {
                tracing::info!(node = %url, capacity, service, "Initialized syncstorage node entry");
            }
        }
    }
    let nodes = store.list_nodes(None).await?;
    if !nodes.iter().any(|n| n.state.downed == 0 && n.state.capacity > n.state.current_load) {
        tracing::warn!("no storage node can take users yet: add one with `tokenserver node add <url> --capacity <n>`");
    }
    let verifier = Arc::new(FxaVerifier::new(&config.fxa).map_err(StartError::Other)?);
    {
        let verifier = verifier.clone();
        tokio::spawn(async move {
            verifier.prefetch_keys().await;
        });
    }
    let tokens = SyncTokens::new(config, &secrets, store.clone(), verifier.clone()).map_err(StartError::Other)?;
    let purger = Arc::new(
        crate::ops::purge::Purger::new(store.clone(), purge_targets(config), &secrets)
            .map_err(|e| StartError::Other(e.to_string()))?,
    );
    if let Some(cfg) = &config.purge {
        crate::jobs::spawn_sync_purge(jobs, &purger, cfg);
        tracing::info!(
            interval = %humantime::format_duration(cfg.interval),
            grace_period = %humantime::format_duration(cfg.grace_period),
            "purge of old Sync records enabled"
        );
    }
    Ok(SyncFamily { config: config.clone(), store, verifier, tokens: Arc::new(tokens), purger })
}

/// Each configured service once, with its endpoint pattern (the first application's).
pub fn purge_targets(config: &Config) -> Vec<crate::ops::purge::PurgeTarget> {
    let mut targets: Vec<crate::ops::purge::PurgeTarget> = Vec::new();
    for app in &config.sync.applications {
        if !targets.iter().any(|t| t.service == app.service) {
            targets.push(crate::ops::purge::PurgeTarget { service: app.service.clone(), pattern: app.pattern.clone() });
        }
    }
    targets
}

/// Serves the public (when the Sync family is on) and internal routers until `shutdown`
/// resolves, each listener within its connection limits.
pub async fn serve(
    state: AppState,
    public: Option<TcpListener>,
    internal: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let limits = state.config.limits;
    let grace = state.config.shutdown_timeout;
    let jobs = state.jobs.clone();
    let public_srv = {
        let (sync, rx) = (state.sync.clone(), rx.clone());
        async move {
            if let (Some(public), Some(sync)) = (public, sync) {
                crate::http::serve::serve(public, crate::http::public_service(sync), limits.public, rx).await;
            }
        }
    };
    let internal_srv = crate::http::serve::serve(internal, crate::http::internal_service(state), limits.internal, rx);
    let servers = async move {
        tokio::join!(public_srv, internal_srv);
    };
    tokio::pin!(servers);
    tokio::select! {
        () = &mut servers => return Ok(()),
        () = shutdown => {}
    }
    tracing::info!(
        shutdown_timeout = %humantime::format_duration(grace),
        "shutting down: no new connections, in-flight requests finishing, background jobs stopping"
    );
    let _ = tx.send(true);
    jobs.stop().await;
    if tokio::time::timeout(grace, servers).await.is_err() {
        tracing::warn!("shutdown_timeout reached: the connections still open are dropped");
    }
    Ok(())
}

/// A server started by [`start`].
pub struct Running {
    /// Bound public address (`None`: the Sync family is off, no public listener).
    pub public_addr: Option<SocketAddr>,
    /// Bound internal address.
    pub internal_addr: SocketAddr,
    /// The state it serves (tests use its store).
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Descriptors kept back from the connection caps: database connections, files, logs.
const RESERVED_DESCRIPTORS: usize = 256;

/// Raises the open-file limit to its hard maximum, then lowers the public listener's cap if both
/// caps do not fit in it, so that a flood of the public listener can never leave the internal
/// one without descriptors.
fn fit_to_descriptors(limits: &mut crate::config::ListenerLimits) {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => usize::try_from(n).unwrap_or(usize::MAX),
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the open-file limit; connection caps left as configured");
            return;
        }
    };
    let room = limit.saturating_sub(RESERVED_DESCRIPTORS + limits.internal.max_connections);
    if limits.public.max_connections > room {
        tracing::warn!(
            open_file_limit = limit,
            configured = limits.public.max_connections,
            effective = room.max(1),
            "limits.public_max_connections lowered to fit the open-file limit (raise LimitNOFILE / ulimit -n)"
        );
        limits.public.max_connections = room.max(1);
    }
}

/// Builds the state, binds both listeners (port 0 allowed) and serves in the background.
pub async fn start(mut config: Config) -> Result<Running, StartError> {
    fit_to_descriptors(&mut config.limits);
    let public = match config.sync.enabled {
        true => Some(
            TcpListener::bind(&config.public_addr)
                .await
                .map_err(|e| StartError::Other(format!("cannot listen on {}: {e}", config.public_addr)))?,
        ),
        false => None,
    };
    let internal = TcpListener::bind(&config.internal_addr)
        .await
        .map_err(|e| StartError::Other(format!("cannot listen on {}: {e}", config.internal_addr)))?;
    let public_addr =
        public.as_ref().map(TcpListener::local_addr).transpose().map_err(|e| StartError::Other(e.to_string()))?;
    let internal_addr = internal.local_addr().map_err(|e| StartError::Other(e.to_string()))?;
    let state = build(config).await?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(state.clone(), public, internal, async move {
        let _ = rx.await;
    }));
    Ok(Running { public_addr, internal_addr, state, stop: Some(tx), task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_leave_credentials_out_and_default_the_port() {
        assert_eq!(endpoints("postgres://u:p@db.example/ts"), ["db.example:5432"]);
        assert_eq!(endpoints("mysql://root@127.0.0.1:3307/ts?ssl-mode=disabled"), ["127.0.0.1:3307"]);
        assert_eq!(endpoints("redis://:pw@cache:6380/0"), ["cache:6380"]);
        assert_eq!(endpoints("redis+cluster://a:7101,b:7102,c/?prefix=x"), ["a:7101", "b:7102", "c:6379"]);
        assert_eq!(endpoints("postgres://[::1]/ts"), ["[::1]:5432"]);
        assert!(endpoints("sqlite://tokenserver.db").is_empty() && endpoints("memory:").is_empty());
        assert_eq!(store_label(&[Family::Sync]), "Sync database");
        assert_eq!(store_label(&[Family::Sync, Family::Access]), "Sync database and access-token store");
    }

    #[test]
    fn the_access_listing_connections_reach_the_store_settings() {
        let config = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            crate::config::load(None, &vars).unwrap_or_else(|e| unreachable!("{e}"))
        };
        let settings = store_settings(&config(&[("TOKENSERVER_ACCESS__LISTING_CONNECTIONS", "7")]));
        assert_eq!((settings.pool.listing_connections, settings.pool.max_size), (7, 10));
        let settings = store_settings(&config(&[]));
        assert_eq!(settings.pool.listing_connections, tokenserver_store::LISTING_CONNECTIONS);
    }
}
