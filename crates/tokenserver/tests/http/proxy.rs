//! A TCP proxy the tests can cut and restore, standing in for a database that goes away.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
    /// Connections being forwarded (counted from their accept to their close).
    live: Arc<AtomicUsize>,
}

/// Counts one forwarded connection until dropped.
struct Forwarding(Arc<AtomicUsize>);

impl Drop for Forwarding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Proxy {
    /// Forwards connections on a new local port to `target` (`host:port`).
    pub async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _) = watch::channel(true);
        let up = Arc::new(tx);
        let live = Arc::new(AtomicUsize::new(0));
        let (state, counter) = (up.clone(), live.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*state.borrow() {
                    // Down: refuse by closing at once.
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let mut down = state.subscribe();
                counter.fetch_add(1, Ordering::SeqCst);
                let forwarding = Forwarding(counter.clone());
                tokio::spawn(async move {
                    let _forwarding = forwarding;
                    let Ok(mut server) = TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up, live }
    }

    /// Forwards again after [`Proxy::cut`].
    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    /// Refuses new connections and cuts every forwarded one; returns once all are closed, so that
    /// nothing sent afterwards reaches the database (the cuts happen on the connections' own
    /// tasks: without the wait, a statement sent at once could still get through and commit).
    pub async fn cut(&self) {
        self.up.send_replace(false);
        for _ in 0..1000 {
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the proxy's connections were not closed within 5 s");
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(self.addr.port())).unwrap();
        u.to_string()
    }
}

/// `host:port` of a database URL.
pub fn target_of(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port_or_known_default().unwrap_or(5432))
}
