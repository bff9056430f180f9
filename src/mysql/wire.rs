//! MySQL packet framing on buffers (3-byte length + sequence id), and the inspector that
//! finds a `COM_CHANGE_USER` in the client's byte stream.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::relay::{Inspect, Verdict};

pub const COM_CHANGE_USER: u8 = 0x11;
/// A single packet's payload is at most this long; longer ones continue in the next packet.
const MAX_PAYLOAD: usize = 0xff_ffff;

/// Read one whole packet: `(sequence id, payload)`. `Ok(None)`: closed before it started.
/// Handshake packets never span several packets; `max_len` bounds what a peer can make us hold.
pub async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_len: usize,
) -> std::io::Result<Option<(u8, BytesMut)>> {
    loop {
        if buf.len() >= 4 {
            let len = (buf[0] as usize) | (buf[1] as usize) << 8 | (buf[2] as usize) << 16;
            if len > max_len || len == MAX_PAYLOAD {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("packet of {len} bytes during the handshake"),
                ));
            }
            if buf.len() >= 4 + len {
                let seq = buf[3];
                buf.advance(4);
                return Ok(Some((seq, buf.split_to(len))));
            }
            buf.reserve(4 + len - buf.len());
        }
        if stream.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Frame a payload (shorter than 16 MiB) as one packet.
pub fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() < MAX_PAYLOAD);
    let len = payload.len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&[len as u8, (len >> 8) as u8, (len >> 16) as u8, seq]);
    out.extend_from_slice(payload);
    out
}

pub async fn write_packet<S: AsyncWrite + Unpin>(
    stream: &mut S,
    seq: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    stream.write_all(&packet(seq, payload)).await?;
    stream.flush().await
}

/// Watches client packets for a command packet that is COM_CHANGE_USER. A command has
/// sequence id 0, but so does every 256th packet of a long LOAD DATA LOCAL INFILE stream:
/// a packet that follows the previous client packet in sequence, with nothing from the
/// server in between, continues that stream rather than starting a command.
#[derive(Default)]
pub struct ChangeUserWatch {
    /// Bytes of the current packet still to pass.
    skip: usize,
    /// The last command the client sent (COM_QUIT = 1 means the server will close).
    pub last_command: u8,
    /// Sequence id of the client's previous packet.
    prev_seq: Option<u8>,
    /// Set by [`ServerActivity`] when the server sends anything.
    pub server_spoke: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Watches the server's stream only to tell [`ChangeUserWatch`] that the server spoke.
pub struct ServerActivity(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Inspect for ServerActivity {
    fn inspect(&mut self, data: &[u8]) -> Verdict {
        if !data.is_empty() {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Verdict::Pass(data.len())
    }
}

impl Inspect for ChangeUserWatch {
    fn inspect(&mut self, data: &[u8]) -> Verdict {
        let mut at = 0;
        loop {
            let take = self.skip.min(data.len() - at);
            at += take;
            self.skip -= take;
            if at == data.len() {
                return Verdict::Pass(at);
            }
            let rest = &data[at..];
            if rest.len() < 4 {
                return Verdict::Pass(at); // hold a split header
            }
            let len = (rest[0] as usize) | (rest[1] as usize) << 8 | (rest[2] as usize) << 16;
            let seq = rest[3];
            if seq == 0 && len > 0 && rest.len() < 5 {
                return Verdict::Pass(at); // need the command byte
            }
            let spoke = self
                .server_spoke
                .swap(false, std::sync::atomic::Ordering::Relaxed);
            let continues = !spoke && self.prev_seq.is_some_and(|p| seq == p.wrapping_add(1));
            if seq == 0 && len > 0 && !continues {
                if rest[4] == COM_CHANGE_USER {
                    return Verdict::Stop(at);
                }
                self.last_command = rest[4];
            }
            self.prev_seq = Some(seq);
            self.skip = 4 + len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(seq: u8, body: &[u8]) -> Vec<u8> {
        packet(seq, body)
    }

    #[test]
    fn finds_change_user_only_at_a_command_start() {
        let mut stream = Vec::new();
        stream.extend(cmd(0, b"\x03select 1"));
        // Infile data that happens to start with 0x11 is not a command.
        stream.extend(cmd(2, b"\x11not a command"));
        let stop = stream.len();
        stream.extend(cmd(0, b"\x11bytebase\0"));
        let mut w = ChangeUserWatch::default();
        assert_eq!(w.inspect(&stream), Verdict::Stop(stop));
    }

    #[test]
    fn a_long_infile_stream_wrapping_to_sequence_0_is_not_a_command() {
        let mut stream = cmd(0, b"\x03load data local infile 'x' into table t");
        // The server asked for the file (it spoke), then 300 data packets with no answer.
        let mut w = ChangeUserWatch::default();
        assert_eq!(w.inspect(&stream), Verdict::Pass(stream.len()));
        w.server_spoke
            .store(true, std::sync::atomic::Ordering::Relaxed);
        stream.clear();
        for i in 0..300u32 {
            stream.extend(cmd(
                (2 + i) as u8,
                b"\x11 data that looks like COM_CHANGE_USER",
            ));
        }
        assert_eq!(w.inspect(&stream), Verdict::Pass(stream.len()));
        assert_ne!(w.last_command, 0x11);
        // After the server's answer, a real COM_CHANGE_USER is caught.
        w.server_spoke
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let change = cmd(0, b"\x11u\0");
        assert_eq!(w.inspect(&change), Verdict::Stop(0));
    }

    #[test]
    fn holds_split_headers_and_resumes_across_chunks() {
        let mut stream = cmd(0, b"\x03select 'a long query'");
        let change_at = stream.len();
        stream.extend(cmd(0, b"\x11u\0"));
        let mut w = ChangeUserWatch::default();
        // Feed in small pieces, re-presenting held bytes as the relay does.
        let mut held = 0;
        let mut passed = 0;
        let mut end = 0;
        let mut stopped = None;
        while stopped.is_none() {
            end = (end + 3).min(stream.len());
            match w.inspect(&stream[passed..end]) {
                Verdict::Pass(n) => {
                    passed += n;
                    held = end - passed;
                }
                Verdict::Stop(n) => stopped = Some(passed + n),
            }
        }
        assert_eq!(stopped, Some(change_at));
        assert!(held <= 4);
    }
}
