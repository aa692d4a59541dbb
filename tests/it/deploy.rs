//! `examples/deploy/`: the nginx config in front of three real replicas (the compose file's
//! topology, with loopback addresses for the container names), as clients and backends use it.

use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::common::*;

/// nginx running `examples/deploy/nginx.conf`, its upstreams pointed at `replicas`.
struct Nginx {
    child: Child,
    port: u16,
    api_port: u16,
    _dir: std::path::PathBuf,
}

impl Nginx {
    fn start(replicas: &[&Gateway]) -> Self {
        let mut conf = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/deploy/nginx.conf"),
        )
        .unwrap();
        for (i, gw) in replicas.iter().enumerate() {
            let addr = gw
                .ws_url
                .trim_start_matches("ws://")
                .trim_end_matches("/ws");
            conf = conf.replace(&format!("wsbridge-{}:8080", i + 1), addr);
            let api = gw.api_url.trim_start_matches("http://");
            conf = conf.replace(&format!("wsbridge-{}:8081", i + 1), api);
        }
        let port = free_port();
        conf = conf.replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
        let api_port = free_port();
        conf = conf.replace("listen 8001;", &format!("listen 127.0.0.1:{api_port};"));
        let dir = scratch_dir();
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            // One process (no master and workers), so that killing it on drop leaves no worker
            // behind.
            .args([
                "-e",
                "stderr",
                "-g",
                "daemon off; master_process off; pid nginx.pid;",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx must be installed (the README's test command installs it)");
        Nginx {
            child,
            port,
            api_port,
            _dir: dir,
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// `POST /send` through nginx's backend-API listener; the status.
    async fn send(&self, body: Value) -> u16 {
        let url = format!("http://127.0.0.1:{}/send", self.api_port);
        http("POST", &url, Some(&body.to_string()), None).await.0
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn clients_through_the_example_nginx_spread_over_the_replicas_and_talk() {
    deadline(TEST_DEADLINE, async {
        let redis = Redis::start();
        let prefix = unique_prefix("deploy-nginx");
        let a = Gateway::start(&redis, &prefix).await;
        let b = Gateway::start(&redis, &prefix).await;
        let mut c = Gateway::start_with(
            &redis,
            &prefix,
            &[("WSBRIDGE__SERVER__REPLICA_ID", "deploy-c")],
        )
        .await;
        let nginx = Nginx::start(&[&a, &b, &c]);
        // The upgrade goes through (headers passed on); nginx may take a moment to listen.
        let mut first = None;
        for _ in 0..100 {
            if let Ok(client) = Client::connect_url(&nginx.ws_url(), false).await {
                first = Some(client);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut clients = vec![first.expect("a WebSocket through nginx")];
        for _ in 0..2 {
            clients.push(Client::connect_url(&nginx.ws_url(), false).await.unwrap());
        }
        // Three connections from one address land on three replicas (the id names the replica):
        // ip_hash would have put them all on one.
        let mut replicas: Vec<String> = clients
            .iter()
            .map(|c| c.connection.split('.').next().unwrap().to_owned())
            .collect();
        replicas.sort();
        replicas.dedup();
        assert_eq!(
            replicas.len(),
            3,
            "least_conn spreads connections: {replicas:?}"
        );

        for client in &mut clients {
            client.subscribe("room:nginx").await;
        }
        // Backends reach the API through nginx too: every replica's API in turn.
        for i in 0..3 {
            let body =
                json!({"to": {"channel": "room:nginx"}, "data": format!("through nginx {i}")});
            assert_eq!(nginx.send(body).await, 202);
            for client in &mut clients {
                assert_eq!(client.recv().await["data"], format!("through nginx {i}"));
            }
        }
        clients[0]
            .send(json!({"type": "send", "stream": "chat", "data": 1, "id": "n1"}))
            .await;
        assert_eq!(clients[0].recv().await["type"], "ack");

        // One replica dies: backends' sends through nginx still land (a refused connection goes to
        // the next replica), and reach the clients on the live replicas.
        c.signal("-KILL");
        // Dead, not dying: a connection the dying process's listener still took would carry a
        // POST to it, which nginx does not send again (not idempotent): a 502, not the case here.
        c.wait_exit();
        let mut live: Vec<&mut Client> = clients
            .iter_mut()
            .filter(|client| !client.connection.starts_with("deploy-c."))
            .collect();
        assert_eq!(live.len(), 2);
        for i in 0..3 {
            let body = json!({"to": {"channel": "room:nginx"}, "data": format!("after {i}")});
            assert_eq!(nginx.send(body).await, 202, "send {i} with a replica dead");
            for client in &mut live {
                assert_eq!(client.recv().await["data"], format!("after {i}"));
            }
        }
    })
    .await;
}
