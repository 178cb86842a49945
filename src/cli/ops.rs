//! `meshpeer ping` and `meshpeer netcheck`: control requests answered by
//! the daemon (`daemon/ops.rs`).

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use meshpeer::config::Options;
use meshpeer::control::{self, PingReply, Reply, Request};
use meshpeer::state::StateDir;

use super::StateArgs;

#[derive(Args, Debug)]
pub struct PingArgs {
    /// The member: its name, overlay address or node id (which may start
    /// with `-`).
    #[arg(allow_hyphen_values = true)]
    pub member: String,
    /// How many probes (one a second).
    #[arg(long, short = 'c', default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub count: u32,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=30))]
    pub timeout: u64,
    /// Print one JSON object per probe instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Debug)]
pub struct NetcheckArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateArgs,
}

fn describe(p: &PingReply) -> String {
    let path = match (p.path.as_deref(), &p.relay) {
        (Some("relayed"), Some(r)) => format!("relayed via {r}"),
        (Some(path), _) => path.to_string(),
        (None, _) => p.state.as_str().to_string(),
    };
    let endpoint = p
        .endpoint
        .as_deref()
        .map(|e| format!(" at {e}"))
        .unwrap_or_default();
    let why = p
        .why_not_direct
        .as_deref()
        .map(|w| format!(" (not direct: {w})"))
        .unwrap_or_default();
    format!("{path}{endpoint}{why}")
}

pub async fn ping(a: PingArgs, file: &Options) -> anyhow::Result<()> {
    let dir = StateDir::open(&a.state.resolve(file))?;
    let sock = dir.control_socket();
    let mut answered = 0u32;
    let mut rtts = Vec::new();
    for i in 0..a.count {
        let started = Instant::now();
        let req = Request::Ping {
            member: a.member.clone(),
            timeout_ms: Some(a.timeout * 1000),
        };
        let p = match control::request(&sock, &req, Duration::from_secs(a.timeout + 5)).await? {
            Reply::Pong(p) => *p,
            Reply::Error { message } => bail!("{message}"),
            _ => bail!("unexpected reply from the daemon"),
        };
        if a.json {
            println!("{}", serde_json::to_string(&p)?);
        } else {
            match p.rtt_us {
                Some(us) => println!(
                    "pong from {} ({}) via {} in {:.2} ms",
                    p.name,
                    p.overlay_ip,
                    describe(&p),
                    us as f64 / 1000.0
                ),
                None => println!(
                    "no answer from {} ({}) within {} s; path: {}",
                    p.name,
                    p.overlay_ip,
                    a.timeout,
                    describe(&p)
                ),
            }
        }
        if let Some(us) = p.rtt_us {
            answered += 1;
            rtts.push(us);
        }
        if i + 1 < a.count {
            let wait = Duration::from_secs(1).saturating_sub(started.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tokio::signal::ctrl_c() => break,
            }
        }
    }
    if !a.json && a.count > 1 {
        let sent = a.count;
        if let (Some(min), Some(max)) = (rtts.iter().min(), rtts.iter().max()) {
            let avg = rtts.iter().sum::<u64>() as f64 / rtts.len() as f64;
            println!(
                "{answered}/{sent} answered, round trip min/avg/max {:.2}/{:.2}/{:.2} ms",
                *min as f64 / 1000.0,
                avg / 1000.0,
                *max as f64 / 1000.0
            );
        } else {
            println!("0/{sent} answered");
        }
    }
    if answered == 0 {
        bail!("{} did not answer", a.member);
    }
    Ok(())
}

pub async fn netcheck(a: NetcheckArgs, file: &Options) -> anyhow::Result<()> {
    let dir = StateDir::open(&a.state.resolve(file))?;
    let r = match control::request(
        &dir.control_socket(),
        &Request::Netcheck,
        Duration::from_secs(5),
    )
    .await?
    {
        Reply::Netcheck(r) => *r,
        Reply::Error { message } => bail!("the daemon says: {message}"),
        _ => bail!("unexpected reply from the daemon"),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("NAT: {}", r.nat);
    println!(
        "mapped endpoints: {}",
        if r.mapped_endpoints.is_empty() {
            "none measured".to_string()
        } else {
            r.mapped_endpoints.join(", ")
        }
    );
    println!(
        "advertised address {}, WireGuard {}/udp, gossip {}/udp{}",
        r.advertise_addr,
        r.wg_port,
        r.gossip_port,
        if r.relaying {
            ", relaying for others"
        } else {
            ""
        }
    );
    if !r.stun_servers.is_empty() {
        println!("outside STUN servers: {}", r.stun_servers.join(", "));
    }
    if r.answers.is_empty() {
        println!(
            "STUN answers: none in the last minute (members on this host's own networks are not asked)"
        );
    } else {
        println!("STUN answers (the last minute):");
        for s in &r.answers {
            println!(
                "  {:<22} {:<12} saw us at {:<22} {} s ago",
                s.server,
                s.member.as_deref().unwrap_or("(outside)"),
                s.mapped,
                s.age_secs
            );
        }
    }
    Ok(())
}
