//! The listening sockets: accepting connections, capping how many are open,
//! and the TLS handshake.
//!
//! tonic accepts from a stream of connections; this module is that stream.
//! It exists because each of its jobs must happen before HTTP/2 starts:
//!
//! - **Connection cap.** At most `VITALS_MAX_CONNECTIONS` client connections
//!   are open at once; one past it is closed at once, so a client that
//!   opens connections in a loop costs a file descriptor for a moment, not
//!   an HTTP/2 connection's buffers each, and the clients already connected
//!   are served as before.
//! - **TCP_NODELAY** on every accepted socket: without it every reply waits
//!   for the client's delayed ACK (~40 ms on loopback).
//! - **TLS.** The handshake runs in a task of its own, bounded by
//!   [`HANDSHAKE_TIMEOUT`], with the configuration current when it starts
//!   ([`TlsSettings`]), so a rotated certificate reaches new connections
//!   while established ones keep theirs, and a slow or silent client holds
//!   up nobody else's handshake. The verified client certificate's SANs are
//!   read once per connection and handed to every request on it
//!   ([`ConnInfo`]).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::auth::{PeerIdentity, TlsSettings};

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after an accept error (out of file
/// descriptors, say), so it does not spin on it.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What every request on a connection may know of it, in the request's
/// extensions (tonic puts a connection's info there).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The verified client certificate's identity (mTLS only).
    pub peer: Option<PeerIdentity>,
}

/// An accepted connection, plaintext or TLS, holding its place under the
/// connection cap for as long as it is open.
#[derive(Debug)]
pub struct Conn {
    io: ConnIo,
    info: ConnInfo,
    _place: OwnedSemaphorePermit,
}

#[derive(Debug)]
enum ConnIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            ConnIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            ConnIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            ConnIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            ConnIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A bound listener and what its connections go through.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    /// Places under the connection cap.
    places: Arc<Semaphore>,
    /// TLS, when configured: every connection speaks it.
    tls: Option<Arc<TlsSettings>>,
}

impl Listener {
    /// `tcp` with at most `max_connections` open at once, speaking TLS
    /// with `tls` when given.
    pub fn new(tcp: TcpListener, max_connections: usize, tls: Option<Arc<TlsSettings>>) -> Listener {
        Listener {
            tcp,
            places: Arc::new(Semaphore::new(max_connections)),
            tls,
        }
    }

    /// The connections as tonic takes them. Accepting stops when tonic
    /// drops the stream (it stops accepting at shutdown), which closes the
    /// listening socket.
    pub fn incoming(self) -> ReceiverStream<io::Result<Conn>> {
        // One connection handed over at a time: tonic takes each at once.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(self.accept_loop(tx));
        ReceiverStream::new(rx)
    }

    async fn accept_loop(self, tx: mpsc::Sender<io::Result<Conn>>) {
        loop {
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, remote_addr) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(place) = self.places.clone().try_acquire_owned() else {
                tracing::warn!(%remote_addr, "connection refused: VITALS_MAX_CONNECTIONS connections are open");
                drop(stream);
                continue;
            };
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY");
            }
            let info = ConnInfo {
                remote_addr: Some(remote_addr),
                peer: None,
            };
            match &self.tls {
                None => {
                    let conn = Conn {
                        io: ConnIo::Plain(stream),
                        info,
                        _place: place,
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    tokio::spawn(handshake(
                        TlsAcceptor::from(tls.current()),
                        stream,
                        info,
                        place,
                        tx.clone(),
                    ));
                }
            }
        }
    }
}

/// Completes one TLS handshake and hands the connection to tonic; a failed
/// handshake (a plaintext client, an unknown CA, no client certificate) is
/// logged and the socket closed.
async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    mut info: ConnInfo,
    place: OwnedSemaphorePermit,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::debug!(remote_addr = ?info.remote_addr, error = %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(remote_addr = ?info.remote_addr, "TLS handshake timed out");
            return;
        }
    };
    let (_, session) = stream.get_ref();
    info.peer = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| PeerIdentity::of_certificate(leaf));
    let conn = Conn {
        io: ConnIo::Tls(Box::new(stream)),
        info,
        _place: place,
    };
    let _ = tx.send(Ok(conn)).await;
}
