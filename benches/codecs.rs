//! The handshake codecs on the path of every new connection (criterion).
//! `cargo bench --bench codecs`

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use mysql_common::constants::CapabilityFlags;
use mysql_common::packets::{AuthPlugin, HandshakeResponse};
use mysql_common::proto::MySerialize;
use rds_iam_proxy::mysql::backend::parse_greeting;
use rds_iam_proxy::mysql::frontend::{greeting, parse_response};
use rds_iam_proxy::postgres::frontend::parse_opening;

fn pg_startup() -> Vec<u8> {
    let params =
        b"user\0bytebase\0database\0postgres\0application_name\0psql\0client_encoding\0UTF8\0\0";
    let mut m = ((8 + params.len()) as i32).to_be_bytes().to_vec();
    m.extend(196608i32.to_be_bytes());
    m.extend(params);
    m
}

fn mysql_greeting() -> Vec<u8> {
    // A MariaDB 10.11 greeting as the lab server sends it.
    let mut g = b"\x0a5.5.5-10.11.19-MariaDB\0".to_vec();
    g.extend(7u32.to_le_bytes());
    g.extend(b"abcdefgh\0");
    g.extend(0xfffeu16.to_le_bytes());
    g.push(45);
    g.extend(2u16.to_le_bytes());
    g.extend(0x81ffu16.to_le_bytes());
    g.push(21);
    g.extend([0u8; 6]);
    g.extend(0x1du32.to_le_bytes());
    g.extend(b"ijklmnopqrst\0mysql_native_password\0");
    g
}

fn codecs(c: &mut Criterion) {
    let startup = pg_startup();
    c.bench_function("postgres: parse StartupMessage", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&startup[..]);
            parse_opening(&mut buf).unwrap().unwrap()
        })
    });

    let raw = mysql_greeting();
    c.bench_function("mysql: parse the server greeting", |b| {
        b.iter(|| parse_greeting(&raw, "bench:3306").unwrap())
    });
    let upstream = parse_greeting(&raw, "bench:3306").unwrap();
    c.bench_function("mysql: build the client greeting", |b| {
        b.iter(|| greeting(&upstream, false))
    });
    let caps = CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_SECURE_CONNECTION
        | CapabilityFlags::CLIENT_PLUGIN_AUTH
        | CapabilityFlags::CLIENT_DEPRECATE_EOF;
    let mut response = Vec::new();
    HandshakeResponse::new(
        Some(&[7u8; 20][..]),
        (8, 0, 36),
        Some(&b"bytebase"[..]),
        Some(&b"appdb"[..]),
        Some(AuthPlugin::MysqlNativePassword),
        caps,
        None,
        1 << 24,
    )
    .serialize(&mut response);
    c.bench_function("mysql: parse the client's HandshakeResponse", |b| {
        b.iter(|| parse_response(1, &response, CapabilityFlags::all()).unwrap())
    });
}

criterion_group!(benches, codecs);
criterion_main!(benches);
