//! Framing helpers on buffers: read one whole message, and patch BackendKeyData.

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::relay::{Inspect, Verdict};

/// Follows message boundaries in the server's stream (passing everything), so the proxy
/// knows whether it may add an ErrorResponse of its own when the server goes away.
#[derive(Default)]
pub struct Boundaries {
    /// Bytes of the current message still to come.
    rest: usize,
    /// A header split across reads: its first `header_len` bytes (no allocation per message).
    header: [u8; 5],
    header_len: usize,
    /// The type byte of the last message that started.
    last_type: u8,
}

impl Boundaries {
    pub fn at_boundary(&self) -> bool {
        self.rest == 0 && self.header_len == 0
    }

    /// On the client's stream: it sent Terminate, so the server closing is the normal end.
    pub fn terminated(&self) -> bool {
        self.last_type == b'X'
    }
}

impl Inspect for Boundaries {
    fn inspect(&mut self, data: &[u8]) -> Verdict {
        let mut at = 0;
        while at < data.len() {
            if self.rest > 0 {
                let take = self.rest.min(data.len() - at);
                self.rest -= take;
                at += take;
                continue;
            }
            let take = (5 - self.header_len).min(data.len() - at);
            self.header[self.header_len..self.header_len + take]
                .copy_from_slice(&data[at..at + take]);
            self.header_len += take;
            at += take;
            if self.header_len == 5 {
                self.last_type = self.header[0];
                let len = (&self.header[1..5]).get_i32().max(4) as usize;
                self.rest = len - 4;
                self.header_len = 0;
            }
        }
        Verdict::Pass(data.len())
    }
}

/// Read until `buf` holds one whole tagged message; split it off (tag + length + body).
/// `Ok(None)` means the peer closed cleanly before a message started.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_len: usize,
) -> std::io::Result<Option<BytesMut>> {
    loop {
        if buf.len() >= 5 {
            let len = (&buf[1..5]).get_i32();
            if len < 4 || len as usize > max_len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("message '{}' has length {len}", buf[0] as char),
                ));
            }
            let total = 1 + len as usize;
            if buf.len() >= total {
                return Ok(Some(buf.split_to(total)));
            }
            buf.reserve(total - buf.len());
        }
        if stream.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Replace the key in the (single) BackendKeyData message inside `msgs` with ours.
pub fn rewrite_backend_key(msgs: &mut BytesMut, pid: i32, secret: i32) {
    let mut at = 0;
    while at + 5 <= msgs.len() {
        let len = (&msgs[at + 1..at + 5]).get_i32() as usize;
        if msgs[at] == b'K' {
            let mut out = BytesMut::with_capacity(msgs.len());
            out.extend_from_slice(&msgs[..at]);
            out.put_u8(b'K');
            out.put_i32(12);
            out.put_i32(pid);
            out.put_i32(secret);
            out.extend_from_slice(&msgs[at + 1 + len..]);
            *msgs = out;
            return;
        }
        at += 1 + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_follow_split_messages() {
        let mut b = Boundaries::default();
        let msg = [b'D', 0, 0, 0, 8, 1, 2, 3, 4];
        for split in 0..msg.len() {
            assert_eq!(b.inspect(&msg[..split]), Verdict::Pass(split));
            assert_eq!(b.at_boundary(), split == 0, "split {split}");
            b.inspect(&msg[split..]);
            assert!(b.at_boundary());
        }
    }

    #[test]
    fn rewrites_only_the_key() {
        let mut m = BytesMut::new();
        m.put_u8(b'S');
        m.put_i32(4 + 2);
        m.put_slice(b"a\0");
        m.put_u8(b'K');
        m.put_i32(4 + 4 + 8); // a protocol-3.2 style long key
        m.put_i32(77);
        m.put_slice(&[9; 8]);
        m.put_u8(b'Z');
        m.put_i32(5);
        m.put_u8(b'I');
        rewrite_backend_key(&mut m, 1, 2);
        let want: &[u8] = &[
            b'S', 0, 0, 0, 6, b'a', 0, b'K', 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 2, b'Z', 0, 0, 0, 5,
            b'I',
        ];
        assert_eq!(&m[..], want);
    }
}
