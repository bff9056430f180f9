//! The byte pump after authentication, shared by both engines.
//!
//! Both directions are polled independently (a client streaming COPY while the server
//! streams results must not deadlock), each through one fixed buffer. The client-to-server
//! direction can be watched by an [`Inspect`]or: the MySQL engine uses it to take over at a
//! `COM_CHANGE_USER`, which needs a fresh token rather than the client's scramble.
//!
//! A direction holds its buffer only while bytes are in flight: when everything read has been
//! written and the reader has nothing more, the buffer goes back to a small per-thread pool.
//! An idle connection then holds no relay buffer at all (issue 6: memory per idle
//! connection), and a busy one takes a pooled buffer instead of allocating per chunk.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::session::Meter;

/// Per-direction buffer size: one full TLS record (16 KiB of plaintext), so a read from the
/// server's TLS session drains a whole record at once. Measured in docs/performance.md:
/// smaller buffers cost COPY throughput, larger ones gained nothing.
pub const BUF_SIZE: usize = 16 * 1024;

/// Buffers kept per worker thread for reuse; beyond that they are freed.
const POOL_KEEP: usize = 64;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Buffers taken and not given back, on this thread.
    static HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn take_buffer() -> Box<[u8]> {
    #[cfg(test)]
    HELD.with(|h| h.set(h.get() + 1));
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buffer(buf: Box<[u8]>) {
    if buf.len() != BUF_SIZE {
        return; // none, or an oversized first chunk: not worth keeping
    }
    #[cfg(test)]
    HELD.with(|h| h.set(h.get() - 1));
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < POOL_KEEP {
            pool.push(buf);
        }
    });
}

/// Bytes moved, by direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Relayed {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// What an inspector decides about bytes on their way from the client to the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward this many bytes; hold the rest until more arrives (a split header).
    Pass(usize),
    /// Forward this many bytes, then hand the rest to the engine.
    Stop(usize),
}

pub trait Inspect: Send {
    /// Look at client bytes not yet forwarded (held bytes come again, first).
    fn inspect(&mut self, data: &[u8]) -> Verdict;
}

/// Why the relay ended.
#[derive(Debug)]
pub enum End {
    /// The client closed first; the server side was shut down and has closed too.
    ClientClosed,
    /// The server closed while the client was still there (restart, failover, kill).
    /// The client side is not shut down yet: the engine may say why first.
    ServerClosed,
    /// The client side failed.
    ClientError(io::Error),
    /// The server side failed.
    ServerError(io::Error),
    /// No byte either way for the idle timeout.
    Idle,
    /// The inspector stopped: these client bytes were not forwarded; nothing is pending
    /// toward the client. The engine takes over and may call [`relay`] again.
    Handover(BytesMut),
}

impl End {
    /// The error worth logging, if any.
    pub fn error(self) -> Option<String> {
        match self {
            End::ClientClosed | End::Handover(_) => None,
            End::ServerClosed => Some("the server closed the connection".into()),
            End::ClientError(e) => Some(format!("client: {e}")),
            End::ServerError(e) => Some(format!("server: {e}")),
            End::Idle => Some("idle timeout".into()),
        }
    }

    /// The server went away under a client that is still there.
    pub fn server_lost(&self) -> bool {
        matches!(self, End::ServerClosed | End::ServerError(_))
    }
}

/// What watches a relay: inspectors per direction, live byte counters, an idle timeout.
#[derive(Default)]
pub struct Watch<'a> {
    pub up: Option<&'a mut dyn Inspect>,
    pub down: Option<&'a mut dyn Inspect>,
    pub meter: Option<&'a Meter>,
    pub idle: Option<std::time::Duration>,
}

struct Pipe {
    /// Empty (not allocated) while nothing is in flight.
    buf: Box<[u8]>,
    /// Bytes `[written..approved)` are to be written; `[approved..filled)` are held.
    written: usize,
    approved: usize,
    filled: usize,
    eof: bool,
    stopped: bool,
    need_flush: bool,
    bytes: u64,
    /// Bumped as bytes are written, so a scrape sees long sessions too.
    counter: Option<Counter>,
    /// Shut the writer down on reader EOF (client to server), or leave that to the engine.
    shutdown_on_eof: bool,
}

enum PipeState {
    /// The reader reached EOF and the writer was shut down.
    Done,
    /// Stopped by the inspector with everything approved written and flushed.
    Stopped,
}

enum Failed {
    Read(io::Error),
    Write(io::Error),
}

impl Pipe {
    fn new(initial: &[u8], counter: Option<Counter>, shutdown_on_eof: bool) -> Pipe {
        let buf = if initial.is_empty() {
            Box::default()
        } else if initial.len() <= BUF_SIZE {
            let mut buf = take_buffer();
            buf[..initial.len()].copy_from_slice(initial);
            buf
        } else {
            initial.into()
        };
        Pipe {
            buf,
            written: 0,
            approved: 0,
            filled: initial.len(),
            eof: false,
            stopped: false,
            need_flush: false,
            bytes: 0,
            counter,
            shutdown_on_eof,
        }
    }

    fn judge(&mut self, inspector: &mut Option<&mut dyn Inspect>) {
        let fresh = &self.buf[self.approved..self.filled];
        match inspector {
            None => self.approved = self.filled,
            Some(i) => match i.inspect(fresh) {
                Verdict::Pass(n) => self.approved += n.min(fresh.len()),
                Verdict::Stop(n) => {
                    self.approved += n.min(fresh.len());
                    self.stopped = true;
                }
            },
        }
        if self.eof && !self.stopped {
            // Nothing more will come to complete a held header: let it through.
            self.approved = self.filled;
        }
    }

    /// `drain_only`: write what is pending but read nothing more.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        inspector: &mut Option<&mut dyn Inspect>,
        drain_only: bool,
    ) -> Poll<Result<PipeState, Failed>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            while self.written < self.approved {
                let n =
                    ready!(Pin::new(&mut *writer)
                        .poll_write(cx, &self.buf[self.written..self.approved]))
                    .map_err(Failed::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(Failed::Write(io::ErrorKind::WriteZero.into())));
                }
                self.written += n;
                self.bytes += n as u64;
                if let Some(c) = &self.counter {
                    c.inc_by(n as u64);
                }
                self.need_flush = true;
            }
            if self.stopped || drain_only {
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(Failed::Write)?;
                    self.need_flush = false;
                }
                if self.stopped {
                    return Poll::Ready(Ok(PipeState::Stopped));
                }
                return Poll::Pending;
            }
            if self.eof {
                if self.shutdown_on_eof {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(Failed::Write)?;
                } else if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(Failed::Write)?;
                    self.need_flush = false;
                }
                return Poll::Ready(Ok(PipeState::Done));
            }
            // Everything approved is written: keep only held bytes, at the front.
            if self.written > 0 {
                self.buf.copy_within(self.written..self.filled, 0);
                self.filled -= self.written;
                self.approved -= self.written;
                self.written = 0;
            }
            if self.buf.is_empty() {
                self.buf = take_buffer();
            } else if self.filled == self.buf.len() {
                // An inspector holding a whole buffer would stall: let it through.
                self.approved = self.filled;
                continue;
            }
            let mut rb = ReadBuf::new(&mut self.buf[self.filled..]);
            match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.eof = true;
                    }
                    self.filled += n;
                    self.judge(inspector);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failed::Read(e))),
                Poll::Pending => {
                    if self.filled == 0 {
                        // Nothing in flight or held: the buffer is not needed until bytes come.
                        give_buffer(std::mem::take(&mut self.buf));
                    }
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(Failed::Write)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn rest(&self) -> BytesMut {
        BytesMut::from(&self.buf[self.approved..self.filled])
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        give_buffer(std::mem::take(&mut self.buf));
    }
}

/// Relay until a side closes, a side fails, the link idles out, or the inspector hands over.
/// `client_first`: client bytes already read (they go through the inspector too).
pub async fn relay<C, S>(
    client: &mut C,
    server: &mut S,
    client_first: &[u8],
    watch: Watch<'_>,
) -> (Relayed, End)
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Watch {
        up: mut up_watch,
        down: mut down_watch,
        meter,
        idle,
    } = watch;
    let mut up = Pipe::new(
        client_first,
        meter.map(|m| m.client_to_server.clone()),
        true,
    );
    up.judge(&mut up_watch);
    let mut down = Pipe::new(&[], meter.map(|m| m.server_to_client.clone()), false);
    let mut up_done = false;
    // Set once the client side has stopped with everything approved written and flushed.
    let mut up_stopped = false;
    // Checked lazily: the timer is only re-armed when it fires, not per chunk.
    let mut idle_timer = idle.map(|d| Box::pin(tokio::time::sleep(d)));
    let mut moved = 0u64;
    let mut last_activity = tokio::time::Instant::now();
    let end = poll_fn(|cx| {
        if !up_done {
            match up.poll(cx, client, server, &mut up_watch, false) {
                Poll::Ready(Ok(PipeState::Done)) => up_done = true,
                Poll::Ready(Ok(PipeState::Stopped)) => up_stopped = true,
                Poll::Ready(Err(Failed::Read(e))) => return Poll::Ready(End::ClientError(e)),
                Poll::Ready(Err(Failed::Write(e))) => return Poll::Ready(End::ServerError(e)),
                Poll::Pending => {}
            }
        }
        let state = match down.poll(cx, server, client, &mut down_watch, up.stopped) {
            Poll::Ready(Ok(PipeState::Done)) if up_done => Poll::Ready(End::ClientClosed),
            // The server ended the session: nothing the client sends matters any more.
            Poll::Ready(Ok(PipeState::Done)) => Poll::Ready(End::ServerClosed),
            Poll::Ready(Ok(PipeState::Stopped)) => Poll::Ready(End::ServerClosed),
            Poll::Ready(Err(Failed::Read(e))) => Poll::Ready(End::ServerError(e)),
            Poll::Ready(Err(Failed::Write(e))) => Poll::Ready(End::ClientError(e)),
            // Hand over only once the bytes before the stop point are really sent.
            Poll::Pending if up_stopped && down.written == down.approved && !down.need_flush => {
                Poll::Ready(End::Handover(up.rest()))
            }
            Poll::Pending => Poll::Pending,
        };
        if state.is_ready() {
            return state;
        }
        if let (Some(timer), Some(limit)) = (idle_timer.as_mut(), idle) {
            let total = up.bytes + down.bytes;
            if total != moved {
                moved = total;
                last_activity = tokio::time::Instant::now();
            }
            while timer.as_mut().poll(cx).is_ready() {
                let deadline = last_activity + limit;
                if tokio::time::Instant::now() >= deadline {
                    return Poll::Ready(End::Idle);
                }
                timer.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    })
    .await;
    (
        Relayed {
            client_to_server: up.bytes,
            server_to_client: down.bytes,
        },
        end,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Stops at the first 'X' byte.
    struct StopAtX;
    impl Inspect for StopAtX {
        fn inspect(&mut self, data: &[u8]) -> Verdict {
            match data.iter().position(|&b| b == b'X') {
                Some(i) => Verdict::Stop(i),
                None => Verdict::Pass(data.len()),
            }
        }
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_and_counts_them() {
        let (mut client_app, mut client) = tokio::io::duplex(64);
        let (mut server, mut server_app) = tokio::io::duplex(64);
        let pump = tokio::spawn(async move {
            relay(&mut client, &mut server, b"first ", Watch::default()).await
        });
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let big2 = big.clone();
        let writer = tokio::spawn(async move {
            client_app.write_all(&big2).await.unwrap();
            let mut back = Vec::new();
            client_app.shutdown().await.unwrap();
            client_app.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..6], b"first ");
        assert!(got[6..] == big[..]);
        server_app.write_all(b"bye").await.unwrap();
        drop(server_app);
        assert_eq!(writer.await.unwrap(), b"bye");
        let (n, end) = pump.await.unwrap();
        assert!(matches!(end, End::ClientClosed), "{end:?}");
        assert_eq!(n.client_to_server, 200_006);
        assert_eq!(n.server_to_client, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_link_ends_after_the_idle_timeout_and_traffic_resets_it() {
        let (mut client_app, mut client) = tokio::io::duplex(64);
        let (mut server, _server_app) = tokio::io::duplex(64);
        let pump = tokio::spawn(async move {
            let watch = Watch {
                idle: Some(std::time::Duration::from_secs(10)),
                ..Watch::default()
            };
            let started = tokio::time::Instant::now();
            let (_, end) = relay(&mut client, &mut server, b"", watch).await;
            (end, started.elapsed())
        });
        tokio::time::sleep(std::time::Duration::from_secs(6)).await;
        client_app.write_all(b"x").await.unwrap();
        let (end, elapsed) = pump.await.unwrap();
        assert!(matches!(end, End::Idle), "{end:?}");
        // 6 s quiet, a byte, then 10 s quiet.
        assert!(elapsed >= std::time::Duration::from_secs(16), "{elapsed:?}");
    }

    #[tokio::test]
    async fn an_idle_link_holds_no_buffer_between_exchanges() {
        // current_thread runtime: the pump runs on this thread, so HELD counts its buffers.
        let (mut client_app, mut client) = tokio::io::duplex(64);
        let (mut server, mut server_app) = tokio::io::duplex(64);
        let pump =
            tokio::spawn(
                async move { relay(&mut client, &mut server, b"", Watch::default()).await },
            );
        for _ in 0..3 {
            client_app.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            server_app.read_exact(&mut got).await.unwrap();
            server_app.write_all(b"pong").await.unwrap();
            client_app.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
            // The pump wrote "pong" and found both sides quiet in that same poll.
            assert_eq!(HELD.with(|h| h.get()), 0);
        }
        drop(client_app);
        drop(server_app);
        let (n, _) = pump.await.unwrap();
        assert_eq!(n.client_to_server, 12);
        assert_eq!(HELD.with(|h| h.get()), 0);
    }

    #[tokio::test]
    async fn hands_over_at_the_inspected_point_with_the_rest() {
        let (mut client_app, mut client) = tokio::io::duplex(64);
        let (mut server, mut server_app) = tokio::io::duplex(64);
        client_app.write_all(b"abcXdef").await.unwrap();
        let mut insp = StopAtX;
        let watch = Watch {
            up: Some(&mut insp),
            ..Watch::default()
        };
        let (n, end) = relay(&mut client, &mut server, b"", watch).await;
        let End::Handover(rest) = end else {
            panic!("{end:?}")
        };
        assert_eq!(&rest[..], b"Xdef");
        assert_eq!(n.client_to_server, 3);
        let mut got = [0u8; 3];
        server_app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abc");
    }
}
