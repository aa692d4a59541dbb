//! The publisher: `POST /send` (wsbridge, socket.io's benchmark server) or `POST /pub/<channel>`
//! (nchan; the floor, examples/floor.rs) over one keep-alive HTTP/1.1 connection.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;

use crate::proto::Kind;

/// Where a message goes.
#[derive(Clone)]
pub enum To<'a> {
    Channel(&'a str),
    Connection(&'a str),
    User(&'a str),
}

pub struct Publisher {
    kind: Kind,
    host: String,
    addr: String,
    api_key: Option<String>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Publisher {
    pub fn new(kind: Kind, api: &str, api_key: Option<String>) -> Result<Self, String> {
        let uri: hyper::Uri = api.parse().map_err(|e| format!("--api {api}: {e}"))?;
        let host = uri.host().ok_or("--api needs a host")?.to_string();
        let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
        Ok(Self {
            kind,
            host,
            addr,
            api_key,
            sender: None,
        })
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if !self.sender.as_ref().is_some_and(|s| !s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            stream.set_nodelay(true).ok();
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("just set"))
    }

    /// One `POST path` with a JSON body: the status and the response body.
    pub async fn request(&mut self, path: &str, body: String) -> Result<(u16, Bytes), String> {
        let host = self.host.clone();
        let mut req = hyper::Request::post(path)
            .header("host", host)
            .header("content-type", "application/json");
        if let Some(key) = &self.api_key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let sender = self.sender().await?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("POST {path}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    async fn post(&mut self, path: String, body: String) -> Result<(), String> {
        let (status, body) = self.request(&path, body).await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!(
                "POST {path}: {status} {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }

    /// Publishes `items` (target, data JSON): one call for wsbridge and socket.io, one per item
    /// for nchan (it has no batch publish), one for the floor (one data value per line, all to
    /// one channel).
    pub async fn publish(&mut self, items: &[(To<'_>, String)]) -> Result<(), String> {
        match self.kind {
            Kind::Wsbridge | Kind::Socketio => {
                let mut body = String::with_capacity(items.len() * 96 + 2);
                body.push('[');
                for (i, (to, data)) in items.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    let to = match to {
                        To::Channel(c) => format!(r#"{{"channel":"{c}"}}"#),
                        To::Connection(c) => format!(r#"{{"connection":"{c}"}}"#),
                        To::User(u) => format!(r#"{{"user":"{u}"}}"#),
                    };
                    body.push_str(&format!(r#"{{"to":{to},"data":{data}}}"#));
                }
                body.push(']');
                self.post("/send".into(), body).await
            }
            Kind::Nchan => {
                for (to, data) in items {
                    let To::Channel(channel) = to else {
                        return Err("nchan publishes to channels only".into());
                    };
                    self.post(format!("/pub/{channel}"), data.clone()).await?;
                }
                Ok(())
            }
            Kind::Floor => {
                let Some((To::Channel(channel), _)) = items.first() else {
                    return Err("the floor publishes to channels only".into());
                };
                if items
                    .iter()
                    .any(|(to, _)| !matches!(to, To::Channel(c) if c == channel))
                {
                    return Err("the floor publishes to one channel per call".into());
                }
                let body: Vec<&str> = items.iter().map(|(_, data)| data.as_str()).collect();
                self.post(format!("/pub/{channel}"), body.join("\n")).await
            }
        }
    }
}
