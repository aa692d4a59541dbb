//! Integration tests: real redis-server, real gateway replicas, real WebSocket clients.

mod common;
mod delivery;
