//! RS256 authentication: tokens are checked against the configured public key, with the
//! configured audience and issuer, before the upgrade; a key that cannot be used stops start-up.
//!
//! Key pairs are generated at test time with the `openssl` command line tool.

use std::path::{Path, PathBuf};
use std::process::Command;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::common::*;

/// A scratch directory with RSA key pairs, removed on drop.
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_prefix("rsa-keys"));
        std::fs::create_dir_all(&dir).unwrap();
        Keys { dir }
    }

    /// Generates `<name>.key` (private) and `<name>.pub` (public, PEM); returns their paths.
    fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        let private = self.dir.join(format!("{name}.key"));
        let public = self.dir.join(format!("{name}.pub"));
        openssl(&["genrsa", "-out", path(&private), "2048"]);
        openssl(&[
            "rsa",
            "-in",
            path(&private),
            "-pubout",
            "-out",
            path(&public),
        ]);
        (private, public)
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed (Debian package `openssl`)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rs256(private_key: &Path, claims: Value) -> String {
    let pem = std::fs::read(private_key).unwrap();
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

/// Unpadded base64url, for hand-made token segments.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The HTTP status of an upgrade with this token with the welcome's `user`: 101 and the user
/// when it connected, else the refusal's status and null.
async fn upgrade(gw: &Gateway, token: &str) -> (u16, Value) {
    match Client::connect_url(&format!("{}?token={token}", gw.ws_url), false).await {
        Ok(client) => (101, client.user),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            (response.status().as_u16(), Value::Null)
        }
        Err(other) => panic!("upgrade failed without an HTTP status: {other:?}"),
    }
}

#[tokio::test]
async fn rs256_tokens_must_be_signed_by_the_configured_key() {
    deadline(TEST_DEADLINE, async {
        let keys = Keys::new();
        let (private, public) = keys.pair("good");
        let (other_private, _) = keys.pair("other");
        let redis = Redis::start();
        let prefix = unique_prefix("rs256");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__AUTH__JWT_PUBLIC_KEY", path(&public))],
        )
        .await;

        let valid = rs256(&private, json!({"sub": "alice", "exp": now_secs() + 600}));
        assert_eq!(upgrade(&gw, &valid).await, (101, json!("alice")));
        // Without `exp` the token never expires, and `nbf` in the past is fine.
        let lasting = rs256(&private, json!({"sub": "bob", "nbf": now_secs() - 10}));
        assert_eq!(upgrade(&gw, &lasting).await, (101, json!("bob")));

        let mut refused = vec![
            (
                "signed by another key",
                rs256(&other_private, json!({"sub": "alice"})),
            ),
            (
                // The classic algorithm confusion: HMAC keyed with the (public) verification key.
                "HS256 keyed with the public key",
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &json!({"sub": "alice"}),
                    &EncodingKey::from_secret(&std::fs::read(&public).unwrap()),
                )
                .unwrap(),
            ),
            (
                "HS256 with some secret",
                token("secret", json!({"sub": "alice"})),
            ),
            (
                "expired",
                rs256(&private, json!({"sub": "alice", "exp": now_secs() - 10})),
            ),
            (
                "not valid yet",
                rs256(&private, json!({"sub": "alice", "nbf": now_secs() + 600})),
            ),
            ("not a token", "not-a-token".to_string()),
        ];
        // An unsigned token (`alg: none`), and a validly signed token whose claims were swapped.
        let claims = b64url(br#"{"sub":"mallory"}"#);
        refused.push((
            "alg none",
            format!("{}.{claims}.", b64url(br#"{"alg":"none","typ":"JWT"}"#)),
        ));
        let mut parts: Vec<&str> = valid.split('.').collect();
        parts[1] = &claims;
        refused.push(("claims swapped under a valid signature", parts.join(".")));
        for (what, token) in &refused {
            assert_eq!(upgrade(&gw, token).await.0, 401, "{what}");
        }
        // No token at all.
        match Client::connect_url(&gw.ws_url, false).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401)
            }
            other => panic!("expected 401 without a token, got {:?}", other.map(|_| ())),
        }
        // Refusals happen before the upgrade: only the two good tokens ever made a connection.
        assert_eq!(gw.metric("wsbridge_connections_opened_total").await, 2.0);
    })
    .await;
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    deadline(TEST_DEADLINE, async {
        let keys = Keys::new();
        let (private, public) = keys.pair("aud");
        let redis = Redis::start();
        let prefix = unique_prefix("audiss");
        let gw = Gateway::start_with(
            &redis,
            &prefix,
            &[
                ("WSBRIDGE__AUTH__JWT_PUBLIC_KEY", path(&public)),
                ("WSBRIDGE__AUTH__AUDIENCE", "wsbridge-test"),
                ("WSBRIDGE__AUTH__ISSUER", "https://issuer.test"),
            ],
        )
        .await;
        let good = json!({"sub": "carol", "aud": "wsbridge-test", "iss": "https://issuer.test"});
        assert_eq!(
            upgrade(&gw, &rs256(&private, good.clone())).await,
            (101, json!("carol"))
        );
        // `aud` may be a list that holds ours.
        let mut listed = good.clone();
        listed["aud"] = json!(["elsewhere", "wsbridge-test"]);
        assert_eq!(upgrade(&gw, &rs256(&private, listed)).await.0, 101);

        let with = |key: &str, value: Value| {
            let mut claims = good.clone();
            claims[key] = value;
            rs256(&private, claims)
        };
        let without = |key: &str| {
            let mut claims = good.clone();
            claims.as_object_mut().unwrap().remove(key);
            rs256(&private, claims)
        };
        let refused = [
            ("wrong aud", with("aud", json!("someone-else"))),
            ("aud list without ours", with("aud", json!(["a", "b"]))),
            ("wrong iss", with("iss", json!("https://evil.test"))),
            ("no aud", without("aud")),
            ("no iss", without("iss")),
            ("numeric aud", with("aud", json!(5))),
            ("numeric iss", with("iss", json!(5))),
        ];
        for (what, token) in &refused {
            assert_eq!(upgrade(&gw, token).await.0, 401, "{what}");
        }
        assert_eq!(gw.metric("wsbridge_connections_opened_total").await, 2.0);
    })
    .await;
}

/// Runs the binary with a valid config plus `env` and returns its exit code and stderr.
fn start_and_exit(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(unique_prefix("authconfig"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("wsbridge.toml");
    // Nothing listens on port 1: start-up must fail on the key before Redis matters.
    std::fs::write(&config, base_config("redis://127.0.0.1:1", "authconfig")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsbridge"));
    cmd.arg("--config").arg(&config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A replica that accepted the key would run until killed; give it a bounded time.
    let deadline = std::time::Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (status.and_then(|s| s.code()), stderr)
}

#[test]
fn an_unusable_public_key_stops_startup_with_exit_code_2() {
    let keys = Keys::new();
    let cases = [
        ("a path that does not exist", keys.dir.join("missing.pub")),
        (
            "a file that is not PEM",
            keys.file("garbage.pub", "this is not a key\n"),
        ),
        (
            "a PEM that is not a key",
            keys.file(
                "notakey.pub",
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            ),
        ),
        ("an empty file", keys.file("empty.pub", "")),
        // jsonwebtoken would take it, and then no valid token would verify.
        ("a private key", keys.pair("private").0),
    ];
    for (what, key) in &cases {
        let (code, stderr) = start_and_exit(&[("WSBRIDGE__AUTH__JWT_PUBLIC_KEY", path(key))]);
        assert_eq!(code, Some(2), "{what}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{what}: one line: {stderr}"
        );
        assert!(stderr.contains("auth.jwt_public_key"), "{what}: {stderr}");
    }
}
