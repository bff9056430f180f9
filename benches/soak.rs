//! Soak: N concurrent clients (default 1,000) held through the proxy for a while (default
//! 60 s), each running a query every 100 ms. Prints errors, the proxy's peak memory and its
//! file descriptors before, at peak and after. Figures, not assertions: see benches/soak.sh,
//! which starts a lab sized for it.
//!
//!   RDS_IAM_LAB=/tmp/lab/lab.json SOAK_CLIENTS=1000 SOAK_SECONDS=60 cargo bench --bench soak

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proxy(Child);
impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` asks; the soak only runs on purpose.
    }
    let Ok(lab_path) = std::env::var("RDS_IAM_LAB") else {
        eprintln!("soak: set RDS_IAM_LAB (benches/soak.sh starts a lab sized for it)");
        return;
    };
    let clients = env_or("SOAK_CLIENTS", 1000) as usize;
    let seconds = env_or("SOAK_SECONDS", 60);
    let lab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&lab_path).unwrap()).unwrap();
    let s = |p: &str| {
        lab.pointer(p)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap()
    };
    let port = free_port();
    let admin = free_port();
    let dir = std::env::temp_dir().join(format!("rip-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[target]]\nname = \"soak\"\nengine = \"postgres\"\nlisten = \"127.0.0.1:{port}\"\nhost = \"localhost\"\nport = {}\nregion = \"{}\"\ndb_user = \"lab_trust\"\nca_file = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            s("/postgres/port"), s("/region"), s("/ca_file"), s("/base/access_key_id"), s("/base/secret_access_key")
        ),
    )
    .unwrap();
    // It holds the lab's static keys.
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let bin = std::env::var("SOAK_PROXY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_rds-iam-proxy").to_string());
    let child = Command::new(bin)
        .args(["--config", cfg.to_str().unwrap(), "--log-level", "warn"])
        .env("AWS_ENDPOINT_URL_STS", s("/sts/endpoint"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _proxy = Proxy(child);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let fds_before = fds(pid);
    let rss_before = proc_status(pid, "VmRSS:");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let queries = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (peak_fds, rss_held) = rt.block_on(async {
        let conn =
            format!("host=127.0.0.1 port={port} user=lab_trust dbname=postgres sslmode=disable");
        let mut tasks = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        for _ in 0..clients {
            let (queries, errors, conn) = (queries.clone(), errors.clone(), conn.clone());
            tasks.push(tokio::spawn(async move {
                let client = match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
                    Ok((c, connection)) => {
                        tokio::spawn(connection);
                        c
                    }
                    Err(e) => {
                        eprintln!("connect: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while tokio::time::Instant::now() < deadline {
                    tick.tick().await;
                    match client.query_one("select 1", &[]).await {
                        Ok(_) => queries.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        // Sample while all are open.
        tokio::time::sleep(Duration::from_secs(seconds / 2)).await;
        let sample = (fds(pid), proc_status(pid, "VmRSS:"));
        for t in tasks {
            let _ = t.await;
        }
        sample
    });
    drop(rt);
    // Let the proxy see every close.
    let settle = Instant::now();
    while fds(pid) > fds_before && settle.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let fds_after = fds(pid);
    let peak = proc_status(pid, "VmHWM:");
    println!("soak: {clients} clients for {seconds} s through rds-iam-proxy (release build) to PostgreSQL");
    println!("  queries          {}", queries.load(Ordering::Relaxed));
    println!("  errors           {}", errors.load(Ordering::Relaxed));
    println!(
        "  elapsed          {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("  proxy fds        before {fds_before}, held {peak_fds}, after {fds_after}");
    println!("  proxy RSS        before {rss_before} KiB, held {rss_held} KiB, peak {peak} KiB");
    println!(
        "  per connection   {:.1} KiB (held RSS growth / clients)",
        (rss_held.saturating_sub(rss_before)) as f64 / clients as f64
    );
    let _ = std::fs::remove_dir_all(dir);
}
