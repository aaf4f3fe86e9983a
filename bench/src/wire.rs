//! A PostgreSQL wire-protocol proxy that counts round trips.
//!
//! Every exchange of the extended or the simple query protocol ends with the
//! server's `ReadyForQuery` ('Z'): one 'Z' is one round trip the client
//! waited for. The proxy forwards bytes unchanged and, per connection, reads
//! the startup packet (for `application_name`: vitals names its pools
//! `vitals-work`, `vitals-lock`, `vitals-listen`, `vitals-probe`) and the
//! message headers in both directions. While tracing it also records what
//! each round trip carried (Query, Parse, Execute of which SQL, or a bare
//! Sync: sqlx's connection check).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// Protocol messages seen for one application name.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Counts {
    /// ReadyForQuery messages after start-up: round trips.
    pub(crate) round_trips: u64,
    /// Simple-protocol queries ('Q').
    pub(crate) queries: u64,
    /// Statements prepared ('P').
    pub(crate) parses: u64,
    /// Prepared statements executed ('E').
    pub(crate) executes: u64,
}

/// One traced event.
#[derive(Debug, Clone, Serialize)]
pub(crate) enum Event {
    /// Set by the benchmark between requests (label, microseconds since the
    /// proxy started).
    Marker(String, u64),
    /// A completed round trip.
    RoundTrip {
        app: String,
        /// What the client sent in it.
        what: String,
        /// Statements in it (Query + Execute).
        statements: u32,
        /// Prepares in it.
        parses: u32,
        /// From the client's first message of the round trip to the server's
        /// ReadyForQuery, microseconds.
        waited_us: u64,
        /// When the round trip ended, microseconds since the proxy started.
        at_us: u64,
    },
}

#[derive(Debug)]
struct Shared {
    started: Instant,
    counts: BTreeMap<String, Counts>,
    tracing: bool,
    events: Vec<Event>,
}

/// The proxy; stops accepting when dropped.
pub(crate) struct WireProxy {
    pub(crate) addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

impl Drop for WireProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WireProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("proxy bind")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared {
            started: Instant::now(),
            counts: BTreeMap::new(),
            tracing: false,
            events: Vec::new(),
        }));
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = handle(client, upstream, s).await;
                });
            }
        });
        Ok(WireProxy { addr, shared, task })
    }

    /// Starts or stops recording events.
    pub(crate) fn set_tracing(&self, on: bool) {
        if let Ok(mut s) = self.shared.lock() {
            s.tracing = on;
        }
    }

    /// Records a marker (only while tracing).
    pub(crate) fn mark(&self, label: String) {
        if let Ok(mut s) = self.shared.lock() {
            if s.tracing {
                let at = u64::try_from(s.started.elapsed().as_micros()).unwrap_or(u64::MAX);
                s.events.push(Event::Marker(label, at));
            }
        }
    }

    /// The events recorded so far.
    pub(crate) fn events(&self) -> Vec<Event> {
        self.shared.lock().map(|s| s.events.clone()).unwrap_or_default()
    }
}

/// State of one proxied connection, shared by its two directions.
#[derive(Debug, Default)]
struct Conn {
    app: String,
    /// Prepared statement name -> SQL.
    statements: HashMap<String, String>,
    /// SQL of the statement last bound.
    bound: String,
    /// What the client sent since the last ReadyForQuery.
    pending: Vec<String>,
    pending_statements: u32,
    pending_parses: u32,
    /// When the client sent the first message since the last ReadyForQuery.
    pending_since: Option<Instant>,
    /// Single-byte answers (SSL/GSS refusals) the server owes before framed
    /// messages resume.
    raw_server_bytes: u32,
    ready_seen: bool,
}

async fn handle(client: TcpStream, upstream: SocketAddr, shared: Arc<Mutex<Shared>>) -> Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let conn = Arc::new(Mutex::new(Conn::default()));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, Parser::new(true), conn.clone(), shared.clone());
    let down = pump(sr, cw, Parser::new(false), conn, shared);
    let _ = tokio::join!(up, down);
    Ok(())
}

async fn pump<R, W>(
    mut r: R,
    mut w: W,
    mut parser: Parser,
    conn: Arc<Mutex<Conn>>,
    shared: Arc<Mutex<Shared>>,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        // Parsed before it is forwarded, so an SSL request is noted before
        // the server can answer it.
        parser.feed(&buf[..n], &conn, &shared);
        w.write_all(&buf[..n]).await?;
    }
}

/// Splits one direction's bytes into protocol messages.
struct Parser {
    from_client: bool,
    in_startup: bool,
    buf: Vec<u8>,
}

fn cstr(b: &[u8]) -> (&str, &[u8]) {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = std::str::from_utf8(&b[..end]).unwrap_or("");
    (s, b.get(end + 1..).unwrap_or(&[]))
}

fn short(sql: &str) -> String {
    let one_line = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 90 {
        format!("{}...", one_line.chars().take(90).collect::<String>())
    } else {
        one_line
    }
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// What a round trip without a statement is: sqlx's `ping`.
pub(crate) const SYNC_ONLY: &str = "Sync only";

const SSL_REQUEST: usize = 80_877_103;
const GSSENC_REQUEST: usize = 80_877_104;
const PROTOCOL_3: usize = 196_608;

impl Parser {
    fn new(from_client: bool) -> Self {
        Parser {
            from_client,
            in_startup: from_client,
            buf: Vec::new(),
        }
    }

    fn feed(&mut self, bytes: &[u8], conn: &Mutex<Conn>, shared: &Mutex<Shared>) {
        self.buf.extend_from_slice(bytes);
        let Ok(mut conn) = conn.lock() else { return };
        let mut at = 0;
        loop {
            let rest = &self.buf[at..];
            if !self.from_client && conn.raw_server_bytes > 0 {
                if rest.is_empty() {
                    break;
                }
                conn.raw_server_bytes -= 1;
                at += 1;
                continue;
            }
            if self.in_startup {
                if rest.len() < 8 {
                    break;
                }
                let len = be32(rest);
                if len < 8 || rest.len() < len {
                    break;
                }
                let code = be32(&rest[4..]);
                match code {
                    SSL_REQUEST | GSSENC_REQUEST => conn.raw_server_bytes += 1,
                    PROTOCOL_3 => {
                        let mut params = &rest[8..len];
                        while !params.is_empty() && params[0] != 0 {
                            let (key, after) = cstr(params);
                            let (value, after) = cstr(after);
                            if key == "application_name" {
                                conn.app = value.to_owned();
                            }
                            params = after;
                        }
                        self.in_startup = false;
                    }
                    _ => self.in_startup = false,
                }
                at += len;
                continue;
            }
            if rest.len() < 5 {
                break;
            }
            let total = 1 + be32(&rest[1..]);
            if rest.len() < total {
                break;
            }
            let (tag, body) = (rest[0], &rest[5..total]);
            if self.from_client {
                client_message(tag, body, &mut conn, shared);
            } else if tag == b'Z' {
                ready_for_query(&mut conn, shared);
            }
            at += total;
        }
        self.buf.drain(..at);
    }
}

fn client_message(tag: u8, body: &[u8], conn: &mut Conn, shared: &Mutex<Shared>) {
    conn.pending_since.get_or_insert_with(Instant::now);
    let Ok(mut s) = shared.lock() else { return };
    let counts = s.counts.entry(conn.app.clone()).or_default();
    match tag {
        b'Q' => {
            counts.queries += 1;
            let (sql, _) = cstr(body);
            conn.pending.push(format!("Query {}", short(sql)));
            conn.pending_statements += 1;
        }
        b'P' => {
            counts.parses += 1;
            let (name, rest) = cstr(body);
            let (sql, _) = cstr(rest);
            conn.statements.insert(name.to_owned(), sql.to_owned());
            conn.pending.push(format!("Parse {}", short(sql)));
            conn.pending_parses += 1;
        }
        b'B' => {
            let (_portal, rest) = cstr(body);
            let (statement, _) = cstr(rest);
            conn.bound = conn.statements.get(statement).cloned().unwrap_or_default();
        }
        b'E' => {
            counts.executes += 1;
            conn.pending.push(format!("Execute {}", short(&conn.bound)));
            conn.pending_statements += 1;
        }
        _ => {}
    }
}

fn ready_for_query(conn: &mut Conn, shared: &Mutex<Shared>) {
    if !conn.ready_seen {
        // The first ReadyForQuery ends authentication, not a request.
        conn.ready_seen = true;
        conn.pending.clear();
        conn.pending_since = None;
        return;
    }
    let Ok(mut s) = shared.lock() else { return };
    s.counts.entry(conn.app.clone()).or_default().round_trips += 1;
    if s.tracing {
        let at_us = u64::try_from(s.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let what = if conn.pending.is_empty() {
            SYNC_ONLY.to_owned()
        } else {
            conn.pending.join(" + ")
        };
        s.events.push(Event::RoundTrip {
            app: conn.app.clone(),
            what,
            statements: conn.pending_statements,
            parses: conn.pending_parses,
            waited_us: conn
                .pending_since
                .map_or(0, |t| u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)),
            at_us,
        });
    }
    conn.pending.clear();
    conn.pending_statements = 0;
    conn.pending_parses = 0;
    conn.pending_since = None;
}
