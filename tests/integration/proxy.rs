//! An in-process TCP proxy between vitals and PostgreSQL that a test can cut
//! and restore: the database "goes away" without touching the shared cluster.
//! It can also freeze: every connection stays open but no byte moves in
//! either direction (a network partition, or a peer that stopped), until it
//! thaws. Started with [`Proxy::start_counting`], it also reads the
//! PostgreSQL protocol going through it and records every round trip
//! ([`Wire`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
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
    /// The round trips seen, when started with [`Proxy::start_counting`].
    pub wire: Option<Arc<Wire>>,
    up: watch::Sender<bool>,
    frozen: watch::Sender<bool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<random> to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        Self::listen(target, None).await
    }

    /// [`Proxy::start`] that also records every PostgreSQL round trip in
    /// [`Proxy::wire`]. The client must not ask for TLS (`sslmode=disable`,
    /// see [`url_via_plain`]): the proxy reads the protocol in the clear.
    pub async fn start_counting(target: SocketAddr) -> Proxy {
        Self::listen(target, Some(Arc::new(Wire::default()))).await
    }

    async fn listen(target: SocketAddr, wire: Option<Arc<Wire>>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, up_rx) = watch::channel(true);
        let (frozen, frozen_rx) = watch::channel(false);
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept_links = links.clone();
        let accept_wire = wire.clone();
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
                let wire = accept_wire.clone();
                let link = tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    if let Ok(server) = TcpStream::connect(target).await {
                        let _ = server.set_nodelay(true);
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let (up, down) = match wire {
                            Some(wire) => {
                                let conn = wire.open();
                                (
                                    Some(Tap::new(wire.clone(), conn, true)),
                                    Some(Tap::new(wire, conn, false)),
                                )
                            }
                            None => (None, None),
                        };
                        tokio::join!(
                            pump(client_read, server_write, frozen.clone(), up),
                            pump(server_read, client_write, frozen, down)
                        );
                    }
                });
                accept_links.lock().unwrap().push(link);
            }
        });
        Proxy {
            addr,
            wire,
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
/// the end of the stream) is passed on once thawed. A tap reads the bytes
/// just before they are passed on, so a round trip is recorded as begun
/// before the server can see it and as ended before the client can.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    mut tap: Option<Tap>,
) {
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if frozen.wait_for(|frozen| !*frozen).await.is_err() {
            break;
        }
        if n == 0 {
            break;
        }
        if let Some(tap) = &mut tap {
            tap.feed(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if let Some(tap) = &tap {
        tap.wire.close(tap.conn);
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

/// [`url_via`] with `sslmode=disable`, for a [`Proxy::start_counting`] proxy.
pub fn url_via_plain(url: &str, addr: SocketAddr) -> String {
    let via = url_via(url, addr);
    let separator = if via.contains('?') { '&' } else { '?' };
    format!("{via}{separator}sslmode=disable")
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

/// One round trip: what the client sent up to the server's `ReadyForQuery`
/// ('Z'), which ends every exchange of the simple and the extended query
/// protocol once.
#[derive(Debug, Clone)]
pub struct Trip {
    /// The proxied connection, numbered from 0 in the order they opened.
    pub conn: usize,
    /// The connection's `application_name` (vitals names its pools
    /// `vitals-work`, `vitals-lock`, `vitals-listen`, `vitals-probe`).
    pub app: String,
    /// The SQL of each statement run: a simple query, or the execution of a
    /// prepared statement. Empty for a bare Sync: sqlx's ping.
    pub statements: Vec<String>,
    /// Whether the client prepared a statement in it.
    pub prepared: bool,
    /// When the server's `ReadyForQuery` passed the proxy.
    pub ended: Instant,
}

impl Trip {
    /// A round trip that ran and prepared nothing: sqlx's ping.
    pub fn is_ping(&self) -> bool {
        self.statements.is_empty() && !self.prepared
    }
}

/// The round trips a counting [`Proxy`] saw, in the order they ended.
#[derive(Debug, Default)]
pub struct Wire {
    state: Mutex<WireState>,
}

#[derive(Debug, Default)]
struct WireState {
    trips: Vec<Trip>,
    conns: HashMap<usize, Conn>,
    opened: usize,
}

/// What a connection has said so far, shared by its two directions.
#[derive(Debug, Default)]
struct Conn {
    app: String,
    /// Prepared statement name -> SQL.
    prepared: HashMap<String, String>,
    /// The SQL of the statement last bound.
    bound: String,
    /// The statements run since the last ReadyForQuery.
    statements: Vec<String>,
    /// Whether a statement was prepared since the last ReadyForQuery.
    parsed: bool,
    /// The client sent something the server has not answered with
    /// `ReadyForQuery` yet.
    in_flight: bool,
    /// The first ReadyForQuery ends the start-up, not a round trip.
    started_up: bool,
    /// One-byte answers to SSL or GSS encryption requests the server owes.
    owed_bytes: usize,
    /// Whether the last round trip was a ping.
    pinged_last: bool,
}

impl Wire {
    /// Every round trip so far.
    pub fn trips(&self) -> Vec<Trip> {
        self.state.lock().unwrap().trips.clone()
    }

    /// Connections on which the client sent something the server has not
    /// answered with `ReadyForQuery` yet.
    pub fn in_flight(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .conns
            .values()
            .filter(|c| c.in_flight)
            .count()
    }

    /// Whether every open connection named `app` is idle after a ping, as
    /// sqlx leaves a connection it gave back to its pool: nothing in flight,
    /// and no statement since the last ping.
    pub fn all_pinged(&self, app: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .conns
            .values()
            .filter(|c| c.app == app && c.started_up)
            .all(|c| !c.in_flight && c.pinged_last)
    }

    fn open(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        let id = state.opened;
        state.opened += 1;
        state.conns.insert(id, Conn::default());
        id
    }

    fn close(&self, conn: usize) {
        self.state.lock().unwrap().conns.remove(&conn);
    }

    fn client_message(&self, conn: usize, tag: u8, body: &[u8]) {
        let mut state = self.state.lock().unwrap();
        let Some(c) = state.conns.get_mut(&conn) else { return };
        c.in_flight = true;
        match tag {
            b'Q' => c.statements.push(cstr(body).0.to_owned()),
            b'P' => {
                let (name, rest) = cstr(body);
                let (sql, _) = cstr(rest);
                c.prepared.insert(name.to_owned(), sql.to_owned());
                c.parsed = true;
            }
            b'B' => {
                let (_portal, rest) = cstr(body);
                let (statement, _) = cstr(rest);
                c.bound = c.prepared.get(statement).cloned().unwrap_or_default();
            }
            b'E' => {
                let sql = c.bound.clone();
                c.statements.push(sql);
            }
            // Terminate: the connection ends, nothing answers it.
            b'X' => c.in_flight = false,
            _ => {}
        }
    }

    fn ready_for_query(&self, conn: usize) {
        let mut state = self.state.lock().unwrap();
        let Some(c) = state.conns.get_mut(&conn) else { return };
        c.in_flight = false;
        let statements = std::mem::take(&mut c.statements);
        let prepared = std::mem::take(&mut c.parsed);
        if !c.started_up {
            c.started_up = true;
            c.pinged_last = true;
            return;
        }
        c.pinged_last = statements.is_empty() && !prepared;
        let trip = Trip {
            conn,
            app: c.app.clone(),
            statements,
            prepared,
            ended: Instant::now(),
        };
        state.trips.push(trip);
    }
}

/// One direction of one connection, split into protocol messages.
struct Tap {
    wire: Arc<Wire>,
    conn: usize,
    from_client: bool,
    /// The client's first message has no type byte.
    in_startup: bool,
    buf: Vec<u8>,
}

const SSL_REQUEST: usize = 80_877_103;
const GSSENC_REQUEST: usize = 80_877_104;

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// A NUL-terminated string and what follows it.
fn cstr(b: &[u8]) -> (&str, &[u8]) {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    (
        std::str::from_utf8(&b[..end]).unwrap_or(""),
        b.get(end + 1..).unwrap_or(&[]),
    )
}

impl Tap {
    fn new(wire: Arc<Wire>, conn: usize, from_client: bool) -> Tap {
        Tap {
            wire,
            conn,
            from_client,
            in_startup: from_client,
            buf: Vec::new(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            if !self.from_client && !rest.is_empty() && self.take_owed_byte() {
                at += 1;
                continue;
            }
            if self.in_startup {
                if rest.len() < 8 || rest.len() < be32(rest) {
                    break;
                }
                let len = be32(rest);
                match be32(&rest[4..]) {
                    // Answered by one byte, then the start-up proper follows.
                    SSL_REQUEST | GSSENC_REQUEST => self.owe_byte(),
                    _ => {
                        self.startup(&rest[8..len]);
                        self.in_startup = false;
                    }
                }
                at += len.max(8);
                continue;
            }
            if rest.len() < 5 || rest.len() < 1 + be32(&rest[1..]) {
                break;
            }
            let total = 1 + be32(&rest[1..]);
            let (tag, body) = (rest[0], &rest[5..total]);
            if self.from_client {
                self.wire.client_message(self.conn, tag, body);
            } else if tag == b'Z' {
                self.wire.ready_for_query(self.conn);
            }
            at += total;
        }
        self.buf.drain(..at);
    }

    /// The start-up packet's parameters: the `application_name`.
    fn startup(&self, mut params: &[u8]) {
        let mut state = self.wire.state.lock().unwrap();
        let Some(c) = state.conns.get_mut(&self.conn) else {
            return;
        };
        while !params.is_empty() && params[0] != 0 {
            let (key, after) = cstr(params);
            let (value, after) = cstr(after);
            if key == "application_name" {
                c.app = value.to_owned();
            }
            params = after;
        }
    }

    fn owe_byte(&self) {
        if let Some(c) = self.wire.state.lock().unwrap().conns.get_mut(&self.conn) {
            c.owed_bytes += 1;
        }
    }

    fn take_owed_byte(&self) -> bool {
        let mut state = self.wire.state.lock().unwrap();
        match state.conns.get_mut(&self.conn) {
            Some(c) if c.owed_bytes > 0 => {
                c.owed_bytes -= 1;
                true
            }
            _ => false,
        }
    }
}
