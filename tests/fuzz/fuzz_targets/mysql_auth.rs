//! The MySQL auth parsers: COM_CHANGE_USER, the COM_CHANGE_USER watch over the client's
//! stream, ERR packets and the client-secret check, on arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mysql_common::constants::CapabilityFlags;
use rds_iam_proxy::client_auth::ClientSecret;
use rds_iam_proxy::mysql::error::parse_err;
use rds_iam_proxy::mysql::parse_change_user;
use rds_iam_proxy::mysql::wire::ChangeUserWatch;
use rds_iam_proxy::relay::{Inspect, Verdict};

fuzz_target!(|data: &[u8]| {
    let _ = parse_change_user(data);
    let _ = parse_err(data, CapabilityFlags::CLIENT_PROTOCOL_41);
    // Feed the watch as the relay does: held bytes come again with the next chunk.
    let mut watch = ChangeUserWatch::default();
    let (mut passed, mut end) = (0, 0);
    while end < data.len() {
        end = (end + 3).min(data.len());
        match watch.inspect(&data[passed..end]) {
            Verdict::Pass(n) => passed += n,
            Verdict::Stop(_) => break,
        }
    }
    thread_local! {
        // PBKDF2 runs once, not per input.
        static SECRET: std::sync::Arc<ClientSecret> = ClientSecret::new(b"pw");
    }
    let nonce = [9u8; 20];
    let accepted = SECRET.with(|s| s.check_mysql(b"mysql_native_password", &nonce, data));
    assert!(!accepted || data.len() == 20);
});
