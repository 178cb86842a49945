//! The testnet's library: everything but the command line (src/main.rs).
//! The integration tests of the meshpeer crate (tests/common) build on its
//! namespace and process plumbing too, so there is one copy of it.
//!
//! Modules: `topology` (namespaces, links, routers, NAT rules), `nodes`
//! (process supervision), `pinger` (the one-process ICMP checker), `poller`
//! (status/WireGuard views), `scenario` (file format), `runner` (scenario
//! engine), `report` (JSON, summary, SVG), `probe` (NAT behaviour check),
//! `cleanup` (names, registry, leftovers), `sys` (namespaces, commands,
//! processes).

pub mod cleanup;
pub mod nodes;
pub mod pairs;
pub mod pinger;
pub mod poller;
pub mod probe;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod sys;
pub mod topology;
