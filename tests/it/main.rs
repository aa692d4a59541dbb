//! Integration tests: real redis-server, real gateway replicas, real WebSocket clients.

mod api;
mod auth;
mod catch_up;
mod cluster;
mod common;
mod coverage_inbound;
mod coverage_ops;
mod dashboard;
mod delivery;
mod deploy;
mod examples;
mod failover;
mod faults;
mod history;
mod hostile;
mod inbound;
mod lifecycle;
mod limits;
mod loadgen;
mod presence;
mod publish;
mod queue;
mod reach;
mod refresh;
mod routing;
mod walkthrough;
