//! Test harness: the lab started by tests/run.sh (its lab.json in RDS_IAM_LAB), free ports,
//! a proxy process per test with its own config, and readers for the lab's own logs
//! (the STS emulator's and the token verifier's), which are the independent witnesses.
#![allow(dead_code)]

use std::io::{BufRead, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Lab {
    pub json: Value,
}

impl Lab {
    /// The running lab. tests/run.sh starts it once per run and sets RDS_IAM_LAB.
    pub fn get() -> Lab {
        let path = std::env::var("RDS_IAM_LAB").unwrap_or_else(|_| {
            panic!("RDS_IAM_LAB is not set: run the suite with `bash tests/run.sh`, which starts the local RDS-IAM lab")
        });
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        Lab {
            json: serde_json::from_str(&text).unwrap(),
        }
    }
    pub fn s(&self, pointer: &str) -> String {
        match self.json.pointer(pointer) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            other => panic!("lab.json has no {pointer}: {other:?}"),
        }
    }
    pub fn mysql_port(&self) -> u16 {
        self.s("/mysql/port").parse().unwrap()
    }
    pub fn pg_port(&self) -> u16 {
        self.s("/postgres/port").parse().unwrap()
    }
    pub fn sts_endpoint(&self) -> String {
        self.s("/sts/endpoint")
    }
    /// Lines of a JSONL log.
    fn log(&self, pointer: &str) -> Vec<Value> {
        let path = self.s(pointer);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(_) => return Vec::new(),
        };
        std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect()
    }
    /// Every STS emulator record (AssumeRole, IMDS, ECS, AssumeRoleWithWebIdentity...).
    pub fn sts_log(&self) -> Vec<Value> {
        self.log("/sts/log")
    }
    pub fn sts_calls(&self, session_name: &str) -> Vec<Value> {
        self.log("/sts/log")
            .into_iter()
            .filter(|r| r["session_name"] == session_name && r["action"] == "AssumeRole")
            .collect()
    }
    pub fn verifications_by_key(&self, akid: &str) -> Vec<Value> {
        self.log("/verifier/log")
            .into_iter()
            .filter(|r| r["akid"] == akid)
            .collect()
    }
    pub fn verifications(&self, session_name: &str) -> Vec<Value> {
        self.log("/verifier/log")
            .into_iter()
            .filter(|r| r["session_name"] == session_name)
            .collect()
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A unique, valid STS session name for this test (the lab's logs are filtered by it).
pub fn session(test: &str) -> String {
    let n: u32 = std::process::id();
    let mut s = format!("t-{test}-{n}");
    s.truncate(64);
    s
}

/// One `[[target]]` of the reference scenario: static base keys, then the hop role (with
/// its external id), then the cross-account target role. Keys can be overridden per test.
pub struct TargetSpec {
    pub name: String,
    pub port: u16,
    pub session: String,
    keys: Vec<(String, String)>,
    /// Assume the hop role before `role_arn` (the cross-account chain).
    pub chain: bool,
    hop_external_id: String,
    hop_arn: String,
}

impl TargetSpec {
    pub fn new(lab: &Lab, name: &str, session: &str) -> Self {
        let q = |v: String| format!("\"{v}\"");
        let port = free_port();
        let keys = vec![
            ("name", q(name.into())),
            ("engine", q("postgres".into())),
            ("listen", q(format!("127.0.0.1:{port}"))),
            ("host", q("localhost".into())),
            ("port", lab.pg_port().to_string()),
            ("region", q(lab.s("/region"))),
            ("db_user", q("bytebase".into())),
            ("ca_file", q(lab.s("/ca_file"))),
            ("access_key_id", q(lab.s("/base/access_key_id"))),
            ("secret_access_key", q(lab.s("/base/secret_access_key"))),
            ("role_arn", q(lab.s("/roles/target/arn"))),
            ("session_name", q(session.into())),
        ];
        TargetSpec {
            name: name.into(),
            port,
            session: session.into(),
            keys: keys.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            chain: true,
            hop_external_id: lab.s("/roles/hop/external_id"),
            hop_arn: lab.s("/roles/hop/arn"),
        }
    }
    /// A MySQL target on the lab's MariaDB, same credentials and chain.
    pub fn mysql(lab: &Lab, name: &str, session: &str) -> Self {
        Self::new(lab, name, session)
            .set("engine", "\"mysql\"")
            .set("port", &lab.s("/mysql/port"))
    }
    /// Set a key to a raw TOML value (`"text"` needs its quotes).
    pub fn set(mut self, key: &str, raw: &str) -> Self {
        self.keys.retain(|(k, _)| k != key);
        self.keys.push((key.into(), raw.into()));
        self
    }
    pub fn unset(mut self, key: &str) -> Self {
        self.keys.retain(|(k, _)| k != key);
        self
    }
    pub fn hop_external_id(mut self, id: &str) -> Self {
        self.hop_external_id = id.into();
        self
    }
    pub fn toml(&self) -> String {
        let mut s = String::from("\n[[target]]\n");
        for (k, v) in &self.keys {
            s.push_str(&format!("{k} = {v}\n"));
        }
        if self.chain {
            s.push_str(&format!(
                "[[target.role_chain]]\nrole_arn = \"{}\"\nexternal_id = \"{}\"\nsession_name = \"{}\"\n",
                self.hop_arn, self.hop_external_id, self.session
            ));
        }
        s
    }
}

pub struct ProxyProcess {
    child: Child,
    pub admin_port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub dir: PathBuf,
}

impl ProxyProcess {
    /// Start the proxy on `config` and wait until every listed port accepts.
    pub fn start(lab: &Lab, config: &str, ports: &[u16], extra_args: &[&str]) -> ProxyProcess {
        Self::start_env(lab, config, ports, extra_args, &[])
    }

    /// As `start`, with extra environment; an empty value removes the variable.
    pub fn start_env(
        lab: &Lab,
        config: &str,
        ports: &[u16],
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let dir =
            std::env::temp_dir().join(format!("rip-test-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("config.toml");
        // Each proxy gets its own admin port (tests run in parallel).
        let admin_port = free_port();
        let config = if config.contains("[admin]") {
            config.to_string()
        } else {
            format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{config}")
        };
        std::fs::write(&cfg, &config).unwrap();
        // It holds the lab's static keys: private, as a real one should be.
        std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let log_path = dir.join("proxy.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
        cmd.arg("--config").arg(&cfg).args(extra_args);
        // A clean AWS environment: only what the lab provides.
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("AWS_ENDPOINT_URL_STS", lab.sts_endpoint())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.join("no-aws-credentials"),
            )
            .stdin(Stdio::null())
            .current_dir(&dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v.replace("{dir}", &dir.display().to_string()));
            }
        }
        let child = cmd.spawn().expect("start rds-iam-proxy");
        let mut p = ProxyProcess {
            child,
            admin_port,
            config_path: cfg,
            log_path,
            dir,
        };
        let _ = ports; // all bound before the admin endpoint answers
        p.wait_up();
        p
    }

    /// Wait until the proxy is up: its admin endpoint answers /liveness, which it binds
    /// after every listener (probing a target port would count as a client connection).
    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)) {
                use std::io::Write;
                let _ =
                    s.write_all(b"GET /liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut r = String::new();
                let _ = s.read_to_string(&mut r);
                if r.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "rds-iam-proxy exited ({status}) before listening:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "rds-iam-proxy did not come up:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal by name (TERM, INT, HUP).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait (bounded) for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "rds-iam-proxy did not exit within {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET a path of the admin endpoint: (status, body).
    pub fn admin(&self, path: &str) -> (u16, String) {
        http_get(self.admin_port, path)
    }

    pub fn output(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.output()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn conn_str(port: u16, user: &str, db: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} dbname={db} sslmode=disable connect_timeout=20")
}

/// Run psql against the proxy; returns (success, stdout, stderr).
pub fn psql(port: u16, user: &str, db: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new("psql")
        .arg(conn_str(port, user, db))
        .args(["-X", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGPASSWORD")
        .env("PGAPPNAME", "psql-through-proxy")
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

pub async fn pg(
    port: u16,
    user: &str,
    db: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) =
        tokio_postgres::connect(&conn_str(port, user, db), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub fn path_exists(p: &str) -> bool {
    Path::new(p).exists()
}

/// A minimal HTTP/1.1 GET (no client library needed for four endpoints).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample in a metrics text (`name{labels}` exactly as printed).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// Poll `f` until it returns Some, for at most `limit`.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lab of the test's own (its servers get restarted, which must not disturb other tests).
/// Stopped and removed on drop.
pub struct PrivateLab {
    pub lab: Lab,
    dir: PathBuf,
}

impl PrivateLab {
    pub fn start(name: &str) -> PrivateLab {
        let dir = std::env::temp_dir().join(format!("rip-private-{name}-{}", std::process::id()));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/lab/lab.py");
        let out = Command::new("/usr/bin/python3")
            .args([script, "start", "--dir", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "private lab: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json = serde_json::from_slice(&out.stdout).unwrap();
        PrivateLab {
            lab: Lab { json },
            dir,
        }
    }

    /// `lab.py restart --engine ENGINE --mode MODE`: returns once the server is back.
    pub fn restart(&self, engine: &str, mode: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/lab/lab.py");
        let out = Command::new("/usr/bin/python3")
            .args([
                script,
                "restart",
                "--dir",
                self.dir.to_str().unwrap(),
                "--engine",
                engine,
                "--mode",
                mode,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateLab {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/lab/lab.py");
        let _ = Command::new("/usr/bin/python3")
            .args([
                script,
                "stop",
                "--dir",
                self.dir.to_str().unwrap(),
                "--purge",
            ])
            .output();
    }
}

/// Assert that no secret material is in `log`: the base secret key, the lab's master secret,
/// any IAM token fragment, any lab session token, and the secret keys STS issued to the
/// sessions named in `sessions`.
pub fn assert_no_secrets(lab: &Lab, log: &str, sessions: &[&str]) {
    let mut secrets = vec![
        lab.s("/base/secret_access_key"),
        std::fs::read_to_string(lab.s("/master_secret_file"))
            .unwrap()
            .trim()
            .to_string(),
        "X-Amz-Signature".to_string(),
        "X-Amz-Security-Token".to_string(),
        "Action=connect".to_string(),
        // Every lab session token starts with base64("LABSTS1\0").
        "TEFCU1RTMQ".to_string(),
    ];
    for sess in sessions {
        for c in lab.sts_calls(sess) {
            if let Some(akid) = c["issued_akid"].as_str() {
                secrets.push(issued_secret(lab, akid));
            }
        }
    }
    for s in &secrets {
        assert!(!s.is_empty());
        if let Some(line) = log.lines().find(|l| l.contains(s.as_str())) {
            let shown: String = line
                .replace(s.as_str(), "<SECRET>")
                .chars()
                .take(600)
                .collect();
            panic!(
                "secret material {:.6}... found in the proxy log: {shown}",
                s
            );
        }
    }
}

/// The secret key the lab's STS derives for an access key id (the lab's own formula).
fn issued_secret(lab: &Lab, akid: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import base64,hashlib,hmac,sys; m=open(sys.argv[1]).read().strip().encode(); \
             print(base64.b64encode(hmac.new(m, b'secret:'+sys.argv[2].encode(), hashlib.sha256).digest()).decode()[:40])",
            &lab.s("/master_secret_file"),
            akid,
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
