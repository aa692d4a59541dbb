//! Integration tests: real redis-server, real gateway replicas, real WebSocket clients.

mod api;
mod common;
mod dashboard;
mod delivery;
mod examples;
mod faults;
mod history;
mod inbound;
mod lifecycle;
mod limits;
mod queue;
