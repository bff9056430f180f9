//! The PostgreSQL opening parser (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage)
//! on arbitrary client bytes, fed in arbitrary chunks: it must never panic, and it must
//! consume what it parses.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rds_iam_proxy::postgres::frontend::parse_opening;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map(|b| *b as usize).unwrap_or(0).min(data.len());
    let mut buf = BytesMut::from(&data[..split]);
    let mut rest = &data[split..];
    loop {
        let before = buf.len();
        match parse_opening(&mut buf) {
            Ok(Some(_)) => assert!(buf.len() < before),
            Ok(None) => {
                if rest.is_empty() {
                    break;
                }
                let n = rest.len().min(7);
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            Err(_) => break,
        }
    }
});
