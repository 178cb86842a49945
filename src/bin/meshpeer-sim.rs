//! `meshpeer-sim`: a deterministic simulation of a meshpeer mesh (see
//! `meshpeer::sim`). Same seed, same output; the last line starts with
//! `converged` and holds only simulated figures.

use std::time::Duration;

use clap::Parser;
use meshpeer::sim::{Sim, SimConfig};

#[derive(Parser, Debug)]
#[command(
    name = "meshpeer-sim",
    about = "Deterministic simulation of a meshpeer mesh"
)]
struct Args {
    /// Members.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Seed of everything random (keys, NAT classes, latency, loss, cores).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Datagram loss (0 to 0.5).
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Regions (latency classes, 1 to 5).
    #[arg(long, default_value_t = 4)]
    regions: u8,
    /// Percent of public members, of members behind endpoint-independent
    /// NATs, behind symmetric NATs (the rest are behind CGNATs).
    #[arg(long, default_value_t = 30)]
    public_pct: u32,
    #[arg(long, default_value_t = 40)]
    ei_pct: u32,
    #[arg(long, default_value_t = 15)]
    symmetric_pct: u32,
    /// Members joining per wave (default: a tenth of the mesh, 10 to 1000).
    #[arg(long)]
    wave: Option<usize>,
    /// Seconds between join waves.
    #[arg(long, default_value_t = 2.0)]
    wave_every: f64,
    /// Seconds at rest measured.
    #[arg(long, default_value_t = 120)]
    rest_secs: u64,
    /// Members killed after the rest (default: 1 %, at least 1).
    #[arg(long)]
    kill: Option<usize>,
    /// Seconds of partition (half the regions from the other half); 0: none.
    #[arg(long, default_value_t = 20)]
    partition_secs: u64,
    /// Stop with an error above this resident size (MiB).
    #[arg(long, default_value_t = 20 * 1024)]
    max_rss_mib: u64,
    /// Liveness: consecutive unanswered monitor probes before accusing
    /// (default: the core's MISSES_TO_ACCUSE).
    #[arg(long)]
    misses_to_accuse: Option<u8>,
    /// The share of a CPU core each member gets (0: unlimited); e.g. 0.02
    /// for 100 daemons on 2 cores: events cost CPU time, busy members'
    /// timers and answers run late.
    #[arg(long, default_value_t = 0.0)]
    cpu_share: f64,
    /// Liveness without local health (timeouts never stretch, late answers
    /// do not count), to compare.
    #[arg(long)]
    no_local_health: bool,
    /// Seconds a relayed pair's session takes to come up beyond its round
    /// trips (allocations at the relay, exchanged through gossip); its
    /// path is chosen meanwhile.
    #[arg(long, default_value_t = 3.0)]
    relay_setup_secs: f64,
    /// Progress on stderr.
    #[arg(long)]
    progress: bool,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let mut cfg = SimConfig::new(a.nodes, a.seed);
    cfg.loss = a.loss;
    cfg.regions = a.regions;
    cfg.public_pct = a.public_pct;
    cfg.ei_pct = a.ei_pct;
    cfg.symmetric_pct = a.symmetric_pct;
    if let Some(w) = a.wave {
        cfg.wave = w.max(1);
    }
    cfg.wave_every = Duration::from_secs_f64(a.wave_every.max(0.0));
    cfg.rest = Duration::from_secs(a.rest_secs);
    if let Some(k) = a.kill {
        cfg.kill = k;
    }
    cfg.partition = Duration::from_secs(a.partition_secs);
    cfg.max_rss_mib = a.max_rss_mib;
    cfg.progress = a.progress;
    if !(0.0..=600.0).contains(&a.relay_setup_secs) || a.relay_setup_secs.is_nan() {
        eprintln!(
            "meshpeer-sim: --relay-setup-secs {} is not between 0 and 600",
            a.relay_setup_secs
        );
        return std::process::ExitCode::FAILURE;
    }
    cfg.relay_setup = Duration::from_secs_f64(a.relay_setup_secs);
    if !(0.0..=1.0).contains(&a.cpu_share) || a.cpu_share.is_nan() {
        eprintln!(
            "meshpeer-sim: --cpu-share {} is not a share of a core (0 to 1)",
            a.cpu_share
        );
        return std::process::ExitCode::FAILURE;
    }
    cfg.cpu_share = a.cpu_share;
    cfg.local_health = !a.no_local_health;
    if let Some(m) = a.misses_to_accuse {
        cfg.misses_to_accuse = m;
    }
    let report = match Sim::new(cfg).and_then(|s| s.run()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshpeer-sim: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    for l in &report.lines {
        println!("{l}");
    }
    if report
        .lines
        .last()
        .is_some_and(|l| l.starts_with("converged"))
    {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
