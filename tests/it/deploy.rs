//! `examples/deploy/`: the nginx config in front of three real replicas (the compose file's
//! topology, with loopback addresses for the container names), as a client would use it.

use std::process::{Child, Command, Stdio};

use serde_json::json;

use crate::common::*;

/// nginx running `examples/deploy/nginx.conf`, its upstreams pointed at `replicas`.
struct Nginx {
    child: Child,
    port: u16,
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
        }
        let port = free_port();
        conf = conf.replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
        let dir = scratch_dir();
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-e", "stderr", "-g", "daemon off; pid nginx.pid;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx must be installed (the README's test command installs it)");
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
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
    let redis = Redis::start();
    let prefix = unique_prefix("deploy-nginx");
    let a = Gateway::start(&redis, &prefix).await;
    let b = Gateway::start(&redis, &prefix).await;
    let c = Gateway::start(&redis, &prefix).await;
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
    a.send(json!({"to": {"channel": "room:nginx"}, "data": "through nginx"}))
        .await;
    for client in &mut clients {
        assert_eq!(client.recv().await["data"], "through nginx");
    }
    clients[0]
        .send(json!({"type": "send", "stream": "chat", "data": 1, "id": "n1"}))
        .await;
    assert_eq!(clients[0].recv().await["type"], "ack");
}
