//! An HTTP/2 connection whose frames a test writes and reads one by one, so
//! that it can send them in an order an HTTP/2 library never would: a
//! request's DATA after the server has answered and reset the stream, which
//! a real client's frames only do when they lose a race with the server.
//!
//! Only what the tests need: prior knowledge (no TLS, no upgrade), request
//! headers encoded with HPACK literals (no dynamic table, no Huffman), and
//! the server's SETTINGS and PINGs acknowledged as they arrive.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// One frame as read.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            GOAWAY => 4,
            RST_STREAM => 0,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// A client connection speaking HTTP/2 frame by frame.
pub struct RawH2 {
    socket: TcpStream,
}

/// An HPACK string literal: no Huffman, a length below 127.
fn literal(out: &mut Vec<u8>, s: &str) {
    let len = u8::try_from(s.len())
        .ok()
        .filter(|&n| n < 127)
        .expect("a short literal");
    out.push(len);
    out.extend_from_slice(s.as_bytes());
}

/// One frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a small frame");
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes()[1..]);
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The header block of a gRPC call of `path`.
pub fn grpc_header_block(path: &str) -> Vec<u8> {
    let mut block = vec![
        0x83, // :method POST (static table 3)
        0x86, // :scheme http (static table 6)
        0x04, // :path, a literal value (static name 4)
    ];
    literal(&mut block, path);
    block.push(0x01); // :authority, a literal value (static name 1)
    literal(&mut block, "localhost");
    block.extend_from_slice(&[0x0f, 0x10]); // content-type (static name 31)
    literal(&mut block, "application/grpc");
    block.push(0x00); // te: a literal name and value
    literal(&mut block, "te");
    literal(&mut block, "trailers");
    block
}

impl RawH2 {
    /// Connects to `addr` and sends the connection preface with empty
    /// SETTINGS (the defaults).
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        let socket = TcpStream::connect(addr).await.expect("connect to vitals");
        socket.set_nodelay(true).expect("set TCP_NODELAY");
        let mut conn = RawH2 { socket };
        conn.socket
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("send the preface");
        conn.send(SETTINGS, 0, 0, &[]).await;
        conn
    }

    /// Writes one frame.
    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let frame = frame(kind, flags, stream, payload);
        self.socket.write_all(&frame).await.expect("send a frame");
    }

    /// Writes `frames` (made with [`frame`]) at once: a burst the server
    /// reads in one go. `false` when the server had closed the connection.
    pub async fn send_burst(&mut self, frames: &[u8]) -> bool {
        self.socket.write_all(frames).await.is_ok()
    }

    /// Opens stream `stream` with the headers of a gRPC call of `path`; the
    /// body follows with [`RawH2::data`].
    pub async fn grpc_headers(&mut self, stream: u32, path: &str) {
        self.send(HEADERS, END_HEADERS, stream, &grpc_header_block(path)).await;
    }

    /// Sends `message` on `stream` as one gRPC length-prefixed message in one
    /// DATA frame.
    pub async fn grpc_message(&mut self, stream: u32, message: &[u8], end_stream: bool) {
        let mut payload = vec![0];
        payload.extend_from_slice(&u32::try_from(message.len()).expect("a small message").to_be_bytes());
        payload.extend_from_slice(message);
        self.send(DATA, if end_stream { END_STREAM } else { 0 }, stream, &payload)
            .await;
    }

    /// The next frame other than SETTINGS and PING, which are acknowledged
    /// here; `None` when the server closed the connection. Panics after 10 s.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.read_frame())
                .await
                .expect("a frame from the server within 10 s")?;
            // An acknowledgement may find the connection closing (after a
            // GOAWAY): the frames already read are still returned.
            match (frame.kind, frame.flags & ACK) {
                (SETTINGS, 0) => {
                    let _ = self.send_burst(&self::frame(SETTINGS, ACK, 0, &[])).await;
                }
                (PING, 0) => {
                    let _ = self.send_burst(&self::frame(PING, ACK, 0, &frame.payload)).await;
                }
                (SETTINGS | PING, _) => {}
                _ => return Some(frame),
            }
        }
    }

    async fn read_frame(&mut self) -> Option<Frame> {
        let mut head = [0_u8; 9];
        self.socket.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
        let mut payload = vec![0; usize::try_from(len).ok()?];
        self.socket.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    }
}
