//! The fuzz targets' bodies live in `harness.rs`, which the main crate's
//! `tests/fuzz_corpus.rs` also includes to replay the committed corpora
//! under plain `cargo test` (no cargo-fuzz, no nightly).

#[path = "../harness.rs"]
pub mod harness;
