//! Integration tests: real redis-server, real gateway replicas, real WebSocket clients.

mod api;
mod common;
mod dashboard;
mod delivery;
mod examples;
mod faults;
mod inbound;
mod lifecycle;
mod queue;
