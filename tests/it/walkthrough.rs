//! The walk-throughs of docs/try-it.md, followed step by step as a user would: the actual script
//! (`REPLICAS=2 examples/local-stack.sh`), the documented backend
//! (`examples/backends/python/backend.py`), the terminal chat clients (`examples/js/chat.mjs`
//! under node), and the documented commands (`kill <pid>`, Ctrl-C, `redis-cli shutdown`, GET
//! `/readyz`, `redis-server ... --daemonize yes`). What is asserted is what the user would see:
//! the lines the chat clients print, the script's own lines, the HTTP status.
//!
//! The stack runs on free ports (`REDIS_PORT`, `PORT`) with the binary under test
//! (`WSBRIDGE_BIN`), so that it neither collides with other tests nor builds a release binary.
//! The whiteboard walk-through is followed by `tests/browser/whiteboard.test.mjs`.
//! Needs node, python3 with `pip install -r examples/backends/python/requirements.txt` and
//! redis-server: run with `tests/run.sh`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

type Lines = Arc<Mutex<Vec<String>>>;

/// Appends each line `pipe` gives to `lines`, on a thread of its own.
fn collect(pipe: impl std::io::Read + Send + 'static, lines: &Lines) {
    let lines = Arc::clone(lines);
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line);
        }
    });
}

/// A process the test started, its output collected line by line; on drop it is killed (with
/// its whole process group when it leads one).
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Lines,
    err: Lines,
    group: bool,
}

impl Proc {
    /// Starts `cmd`; with `group`, as the leader of a new process group (a terminal's job).
    fn spawn(name: &str, mut cmd: Command, group: bool) -> Self {
        if group {
            cmd.process_group(0);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (out, err): (Lines, Lines) = (Arc::default(), Arc::default());
        collect(child.stdout.take().unwrap(), &out);
        collect(child.stderr.take().unwrap(), &err);
        Proc {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            out,
            err,
            group,
        }
    }

    fn out(&self) -> Vec<String> {
        self.out.lock().unwrap().clone()
    }

    /// Everything it printed, for a failure message.
    fn transcript(&self) -> String {
        format!(
            "{} stdout:\n{}\n{} stderr:\n{}",
            self.name,
            self.out().join("\n"),
            self.name,
            self.err.lock().unwrap().join("\n")
        )
    }

    /// Waits until what it printed on stdout satisfies `check`.
    async fn until(&self, what: &str, check: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !check(&self.out()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {}: {what}\n{}",
                self.name,
                self.transcript()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Types a line into its standard input.
    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Sends `sig` to it, or to its whole process group.
    fn signal(&self, sig: &str) {
        let target = if self.group {
            format!("-{}", self.child.id())
        } else {
            self.child.id().to_string()
        };
        let _ = Command::new("kill")
            .args([sig, "--", &target])
            .stderr(Stdio::null())
            .status();
    }

    /// Waits for it to exit by itself.
    async fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit\n{}",
                self.name,
                self.transcript()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal("-TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // A script's children may outlive it: the group goes in any case.
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

/// A first port such that it and the ports 1, 10 and 11 above it are free: the script's
/// `PORT` (replica 1 on PORT and PORT+1, replica 2 on PORT+10 and PORT+11). The twelve ports
/// from it are taken from [`free_port`]'s sequence in a row, so no other test of this run is
/// handed one of them.
fn free_port_base() -> u16 {
    'again: loop {
        let base = free_port();
        for n in 1..12 {
            if free_port() != base + n {
                continue 'again; // taken, or another test drew from the sequence meanwhile
            }
        }
        return base;
    }
}

/// `REPLICAS=2 examples/local-stack.sh` in a process group of its own, on free ports; both
/// replicas ready.
struct Stack {
    script: Proc,
    redis_port: u16,
    port: u16,
    redis_dir: PathBuf,
}

impl Stack {
    async fn start() -> Self {
        let (redis_port, port) = (free_port(), free_port_base());
        let redis_dir = scratch_dir();
        let mut cmd = Command::new("bash");
        cmd.arg(root().join("examples/local-stack.sh"))
            .env("REPLICAS", "2")
            .env("REDIS_PORT", redis_port.to_string())
            .env("REDIS_DIR", &redis_dir)
            .env("PORT", port.to_string())
            .env("WSBRIDGE_BIN", env!("CARGO_BIN_EXE_wsbridge"))
            // The replicas take their settings from config/wsbridge.toml and the script only.
            .env_remove("WSBRIDGE__OUTBOUND__ROUTING")
            .env_remove("RUST_LOG");
        let stack = Stack {
            script: Proc::spawn("local-stack.sh", cmd, true),
            redis_port,
            port,
            redis_dir,
        };
        for n in [1, 2] {
            stack.replica_pid(n).await;
            let url = format!("{}/readyz", stack.api(n));
            eventually(&format!("replica {n} ready"), || async {
                http("GET", &url, None, None).await.0 == 200
            })
            .await;
        }
        stack
    }

    fn ws(&self, n: u16) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port + 10 * (n - 1))
    }

    fn api(&self, n: u16) -> String {
        format!("http://127.0.0.1:{}", self.port + 10 * (n - 1) + 1)
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    /// The process id the script printed for replica `n`.
    async fn replica_pid(&self, n: u16) -> String {
        let named = format!(
            "==> the replica on {} (API {}), pid ",
            self.ws(n),
            self.api(n)
        );
        let find = |lines: &[String]| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&named).map(str::to_string))
        };
        self.script
            .until(&format!("replica {n}'s pid"), |l| find(l).is_some())
            .await;
        find(&self.script.out()).unwrap()
    }

    /// `redis-cli -p <port> ARGS`, as the user types it.
    fn redis_cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.redis_port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The documented backend: `python3 examples/backends/python/backend.py`, pointed at the
    /// replica that stays up (`WSBRIDGE_API=http://127.0.0.1:8091`).
    fn python_backend(&self) -> Proc {
        let mut cmd = Command::new("python3");
        cmd.arg(root().join("examples/backends/python/backend.py"))
            .env("REDIS_URL", self.redis_url())
            .env("WSBRIDGE_API", self.api(2))
            .env("PYTHONUNBUFFERED", "1");
        for name in [
            "REDIS_CLUSTER",
            "PREFIX",
            "STREAM",
            "GROUP",
            "CONSUMER",
            "WSBRIDGE_API_KEY",
        ] {
            cmd.env_remove(name);
        }
        Proc::spawn("backend.py", cmd, false)
    }

    /// `node examples/js/chat.mjs URL,URL` (with `--experimental-websocket` on Node 20/21, as
    /// the docs say).
    fn chat(&self, name: &str, first: u16, second: u16) -> Proc {
        let mut cmd = Command::new("node");
        if !node_has_websocket() {
            cmd.arg("--experimental-websocket");
        }
        cmd.arg(root().join("examples/js/chat.mjs")).arg(format!(
            "{},{}",
            self.ws(first),
            self.ws(second)
        ));
        Proc::spawn(name, cmd, false)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A Redis the walk-through started again by hand (--daemonize) is not the script's.
        self.redis_cli(&["shutdown", "nosave"]);
        let _ = std::fs::remove_dir_all(&self.redis_dir);
    }
}

fn node_has_websocket() -> bool {
    Command::new("node")
        .args([
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ])
        .status()
        .expect("node must be installed (tests/run.sh installs it)")
        .success()
}

/// The JSON events a chat client printed.
fn events(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("chat.mjs printed {l:?}: {e}")))
        .collect()
}

/// The texts of the chat messages a client printed, in order.
fn texts(lines: &[String]) -> Vec<String> {
    events(lines)
        .iter()
        .filter_map(|e| e["message"]["data"]["text"].as_str().map(str::to_string))
        .collect()
}

fn count(lines: &[String], event: &str) -> usize {
    events(lines)
        .iter()
        .filter(|e| e.get(event).is_some())
        .count()
}

/// Terminals 1 to 4: the stack, the backend, and two chat clients that have joined room:lobby.
async fn two_clients() -> (Stack, Proc, Proc, Proc) {
    let stack = Stack::start().await;
    let backend = stack.python_backend();
    let alice = stack.chat("alice (terminal 3)", 1, 2);
    let bob = stack.chat("bob (terminal 4)", 2, 1);
    for client in [&alice, &bob] {
        client
            .until("joined room:lobby", |l| {
                events(l)
                    .iter()
                    .any(|e| e["subscribed"]["channel"] == "room:lobby")
            })
            .await;
    }
    (stack, backend, alice, bob)
}

/// "Try it: two clients, two replicas, one Python backend": a line typed in one client is
/// printed by both, as `{"message":{"channel":"room:lobby","data":{"from":...,"text":...},
/// "offset":...}}`.
#[tokio::test]
async fn chat_on_two_replicas() {
    deadline(TEST_DEADLINE, async {
        let (_stack, backend, mut alice, bob) = two_clients().await;
        alice.type_line("hello from terminal 3");
        for client in [&alice, &bob] {
            client
                .until("the line typed in terminal 3", |l| {
                    texts(l).contains(&"hello from terminal 3".to_string())
                })
                .await;
        }
        let message = events(&bob.out())
            .into_iter()
            .find(|e| e.get("message").is_some())
            .unwrap();
        let keys: Vec<&String> = message["message"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["channel", "data", "offset"], "{message}");
        assert_eq!(message["message"]["channel"], "room:lobby");
        assert!(message["message"]["data"]["from"].is_string(), "{message}");
        // The backend acknowledges after the gateway took its answer, so it may log that after
        // the clients printed the message.
        backend
            .until("the backend to acknowledge the line", |l| {
                l.iter().any(|l| {
                    l.contains(" chat room:lobby from ") && l.contains("sent, acknowledged")
                })
            })
            .await;
    })
    .await;
}

/// "Stop the replica on 8080 (kill its pid)": the other replica and Redis keep running, the
/// client in terminal 3 fails over to 8090, resumes room:lobby from the last offset it saw and
/// prints what it missed, then carries on. Then Ctrl-C in terminal 1 stops everything the
/// script started.
#[tokio::test]
async fn killing_one_replica_leaves_the_other_serving() {
    deadline(TEST_DEADLINE, async {
        let (mut stack, _backend, mut alice, mut bob) = two_clients().await;
        alice.type_line("before");
        bob.until("the first line", |l| texts(l).contains(&"before".into()))
            .await;
        alice
            .until("the first line", |l| texts(l).contains(&"before".into()))
            .await;

        let pid = stack.replica_pid(1).await;
        assert!(Command::new("kill").arg(&pid).status().unwrap().success());
        bob.type_line("said while terminal 3 was away");
        stack
            .script
            .until("the script to report the replica gone", |l| {
                l.iter()
                    .any(|l| l.contains(&format!("(pid {pid}) exited with status")))
            })
            .await;

        alice
            .until(
                "terminal 3 to resume room:lobby on the other replica",
                |l| {
                    events(l).iter().any(|e| {
                        e["subscribed"]["channel"] == "room:lobby"
                            && e["subscribed"]["resumed"] == true
                    })
                },
            )
            .await;
        let events_a = events(&alice.out());
        let resumed = events_a
            .iter()
            .find(|e| e["subscribed"]["resumed"] == true)
            .unwrap();
        assert_eq!(resumed["subscribed"]["recovered"], true, "{resumed}");
        let welcome = events_a.iter().rev().find(|e| e.get("welcome").is_some());
        assert_eq!(welcome.unwrap()["welcome"]["url"], stack.ws(2));
        alice
            .until("terminal 3 to print what it missed", |l| {
                texts(l).contains(&"said while terminal 3 was away".into())
            })
            .await;
        alice.type_line("back");
        for client in [&alice, &bob] {
            client
                .until("the line after the failover", |l| {
                    texts(l).contains(&"back".into())
                })
                .await;
        }
        let want = ["before", "said while terminal 3 was away", "back"];
        assert_eq!(texts(&alice.out()), want, "{}", alice.transcript());
        assert_eq!(texts(&bob.out()), want, "{}", bob.transcript());
        assert_eq!(count(&alice.out(), "error"), 0, "{}", alice.transcript());

        // The stack is still up: the script, the other replica, Redis.
        assert!(stack.script.running(), "{}", stack.script.transcript());
        assert_eq!(stack.redis_cli(&["ping"]), "PONG");
        let readyz = format!("{}/readyz", stack.api(2));
        assert_eq!(http("GET", &readyz, None, None).await.0, 200);

        // Ctrl-C in terminal 1: the terminal sends SIGINT to the script's process group.
        drop((alice, bob));
        stack.script.signal("-INT");
        stack.script.exited().await;
        eventually("the other replica and Redis stopped", || async {
            http("GET", &readyz, None, None).await.0 == 0 && stack.redis_cli(&["ping"]).is_empty()
        })
        .await;
    })
    .await;
}

/// "Stop Redis with `redis-cli shutdown`": `/readyz` turns 503 within about three seconds, a line
/// typed in a client gets an error with code `redis_unavailable`, and the clients stay
/// connected; started again with the documented `redis-server ... --daemonize yes`, everything
/// recovers by itself, without restarting the gateway, the backend or the clients.
#[tokio::test]
async fn a_redis_restart_recovers_by_itself() {
    deadline(TEST_DEADLINE, async {
        let (mut stack, _backend, mut alice, bob) = two_clients().await;
        alice.type_line("before the outage");
        bob.until("the first line", |l| {
            texts(l).contains(&"before the outage".into())
        })
        .await;

        stack.redis_cli(&["shutdown"]);
        let stopped = Instant::now();
        for n in [1, 2] {
            let readyz = format!("{}/readyz", stack.api(n));
            eventually(&format!("replica {n}'s /readyz to turn 503"), || async {
                http("GET", &readyz, None, None).await.0 == 503
            })
            .await;
        }
        // config/wsbridge.toml: unhealthy after 3 s without a good check, checked every second.
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "{:?}",
            stopped.elapsed()
        );

        alice.type_line("while Redis is down");
        alice
            .until("an error with code redis_unavailable", |l| {
                events(l)
                    .iter()
                    .any(|e| e["error"]["code"] == "redis_unavailable")
            })
            .await;

        let dir = stack.redis_dir.to_str().unwrap();
        let port = stack.redis_port.to_string();
        let started = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--dir", dir])
            .args(["--appendonly", "yes", "--daemonize", "yes"])
            .status()
            .unwrap();
        assert!(started.success());
        for n in [1, 2] {
            let readyz = format!("{}/readyz", stack.api(n));
            eventually(&format!("replica {n} ready again"), || async {
                http("GET", &readyz, None, None).await.0 == 200
            })
            .await;
        }
        alice.type_line("after the restart");
        for client in [&alice, &bob] {
            client
                .until("the line typed after the restart", |l| {
                    texts(l).contains(&"after the restart".into())
                })
                .await;
        }
        // The clients stayed connected throughout: one welcome each, no close, no reconnect.
        for client in [&alice, &bob] {
            let out = client.out();
            assert_eq!(count(&out, "welcome"), 1, "{}", client.transcript());
            assert_eq!(count(&out, "close"), 0, "{}", client.transcript());
            assert_eq!(count(&out, "reconnecting"), 0, "{}", client.transcript());
        }
        // Redis stopping did not end the stack.
        assert!(stack.script.running(), "{}", stack.script.transcript());
    })
    .await;
}
