//! TLS to Redis (`rediss://`, #18): a redis-server that speaks only TLS, with a certificate
//! from a private CA (made here with openssl). A replica that trusts the CA (`SSL_CERT_FILE`,
//! read by the system trust store) serves both directions over it; one that does not refuses
//! the server (not ready, and says why). The same through a Sentinel that speaks only TLS too,
//! naming a primary that does.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

/// A private CA and a certificate for 127.0.0.1 signed by it.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn make() -> Self {
        let dir = scratch_dir();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl must be installed (the README's test command installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=wsbridge test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The server-side TLS settings, as `redis-server` arguments / config lines.
    fn server_settings(&self) -> Vec<(String, String)> {
        vec![
            ("tls-cert-file".into(), self.path("server.pem")),
            ("tls-key-file".into(), self.path("server.key")),
            ("tls-ca-cert-file".into(), self.path("ca.pem")),
            ("tls-auth-clients".into(), "no".into()),
        ]
    }
}

/// A process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A redis-server listening only on a TLS port.
fn tls_redis(certs: &Certs) -> (Process, u16) {
    let port = free_port();
    let dir = scratch_dir();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir);
    for (name, value) in certs.server_settings() {
        cmd.arg(format!("--{name}")).arg(value);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let process = Process(child);
    wait_tls_ping(certs, port);
    (process, port)
}

/// A Sentinel listening only on a TLS port, monitoring the TLS primary at `primary`.
fn tls_sentinel(certs: &Certs, primary: u16) -> (Process, u16) {
    let port = free_port();
    let dir = scratch_dir();
    let mut conf = format!(
        "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {dir}\ntls-replication yes\n\
         sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary} 1\n",
        dir = dir.display()
    );
    for (name, value) in certs.server_settings() {
        conf += &format!("{name} {value}\n");
    }
    let path = dir.join("sentinel.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("redis-server")
        .arg(&path)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server --sentinel");
    let process = Process(child);
    wait_tls_ping(certs, port);
    (process, port)
}

/// `redis-cli --tls` against `port`, trusting the test CA.
fn tls_cli(certs: &Certs, port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &certs.path("ca.pem"),
            "-h",
            "127.0.0.1",
        ])
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_tls_ping(certs: &Certs, port: u16) {
    let deadline = Instant::now() + PATIENCE;
    while !tls_cli(certs, port, &["ping"]).contains("PONG") {
        assert!(Instant::now() < deadline, "no PONG over TLS from {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Both directions through `gw`: a client subscribed to `lobby` gets a backend's message, and
/// its `send` is acked, then read from the stream over TLS.
async fn serves_both_directions(gw: &Gateway, certs: &Certs, data_port: u16, prefix: &str) {
    gw.wait_ready().await;
    let mut client = Client::connect(gw).await;
    client.subscribe("lobby").await;
    let (status, answer) = gw
        .post(
            "/send",
            &json!({"to": {"channel": "lobby"}, "data": "over tls"}),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(client.recv().await["data"], "over tls");
    let entry = send_acked(&mut client, "t1", json!("hello")).await;
    let stored = tls_cli(
        certs,
        data_port,
        &["xrange", &format!("{prefix}:in:chat"), "-", "+"],
    );
    assert!(stored.contains(&entry), "{entry} not in {stored}");
}

fn trusting(certs: &Certs) -> [(&'static str, String); 1] {
    [("SSL_CERT_FILE", certs.path("ca.pem"))]
}

/// `redis.url = "rediss://…"`: every link (commands, pub/sub, stream appends) speaks TLS and
/// checks the server's certificate against the trusted roots.
#[tokio::test]
async fn a_replica_speaks_tls_to_redis_and_checks_its_certificate() {
    deadline(Duration::from_secs(60), async {
        let certs = Certs::make();
        let (_redis, port) = tls_redis(&certs);
        let url = format!("rediss://127.0.0.1:{port}");
        let prefix = unique_prefix("tls");
        let trust = trusting(&certs);
        let env: Vec<(&str, &str)> = trust.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let gw = Gateway::spawn(&base_config(&url, &prefix), &prefix, &env);
        serves_both_directions(&gw, &certs, port, &prefix).await;

        // Without the CA among its roots, the replica does not take the server's word.
        let untrusting = Gateway::spawn(&base_config(&url, &prefix), &prefix, &[]);
        eventually("the replica says why it is not ready", || async {
            let (status, body) = untrusting.readyz().await;
            status == 503 && body.to_lowercase().contains("certificate")
        })
        .await;
    })
    .await;
}

/// `redis.sentinel_urls = ["rediss://…"]` and `redis.url = "rediss://…"`: the Sentinel is asked
/// over TLS, and the primary it names is spoken to over TLS.
#[tokio::test]
async fn a_replica_finds_the_primary_through_a_tls_sentinel() {
    deadline(Duration::from_secs(60), async {
        let certs = Certs::make();
        let (_redis, port) = tls_redis(&certs);
        let (_sentinel, sentinel_port) = tls_sentinel(&certs, port);
        let prefix = unique_prefix("tls-sentinel");
        let config = base_config("rediss://127.0.0.1:6379", &prefix).replacen(
            "[redis]\n",
            &format!(
                "[redis]\nsentinel_urls = [\"rediss://127.0.0.1:{sentinel_port}\"]\n\
                 sentinel_master = \"{SENTINEL_MASTER}\"\n"
            ),
            1,
        );
        let trust = trusting(&certs);
        let env: Vec<(&str, &str)> = trust.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let gw = Gateway::spawn(&config, &prefix, &env);
        serves_both_directions(&gw, &certs, port, &prefix).await;
        let log = gw.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("Sentinel names the primary") && l.contains(&port.to_string())),
            "{log}"
        );
    })
    .await;
}
