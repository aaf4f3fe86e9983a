//! An in-process TCP proxy between vitals and PostgreSQL that a test can cut
//! and restore: the database "goes away" without touching the shared cluster.
//! It can also freeze: every connection stays open but no byte moves in
//! either direction (a network partition, or a peer that stopped), until it
//! thaws.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
    task::JoinHandle,
};

pub struct Proxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    frozen: watch::Sender<bool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<random> to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, up_rx) = watch::channel(true);
        let (frozen, frozen_rx) = watch::channel(false);
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept_links = links.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !*up_rx.borrow() {
                    drop(client); // cut: refuse by closing at once
                    continue;
                }
                let frozen = frozen_rx.clone();
                let link = tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    if let Ok(server) = TcpStream::connect(target).await {
                        let _ = server.set_nodelay(true);
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::join!(
                            pump(client_read, server_write, frozen.clone()),
                            pump(server_read, client_write, frozen)
                        );
                    }
                });
                accept_links.lock().unwrap().push(link);
            }
        });
        Proxy {
            addr,
            up,
            frozen,
            links,
            accept,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    /// Stops moving bytes on every connection, open or opened later, in
    /// both directions, without closing any: what was sent is held (a close
    /// too) until [`thaw`](Self::thaw). Neither side can tell.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Moves the held bytes on and forwards again.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

/// Copies `from` to `to` while not frozen; what arrives while frozen (or
/// the end of the stream) is passed on once thawed.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if frozen.wait_for(|frozen| !*frozen).await.is_err() {
            return;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

/// host:port of a postgres URL (TCP only).
pub fn url_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport
        .parse()
        .unwrap_or_else(|_| panic!("the test database URL must name a TCP host:port, got {url}"))
}

/// `url` pointed at `addr` instead of its own host:port.
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{tail}")
}
