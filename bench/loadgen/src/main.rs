//! `loadgen`: the WebSocket load generator of sockworker's benchmarks.
//!
//! One run = one scenario against one server; the result is one JSON line on stdout, which
//! `bench/run.py` collects. Targets are restricted to 127.0.0.0/8.
//!
//! ```text
//! loadgen pingpong  --url ws://127.0.0.1:8787/ -c 1 -s 64 --server-pid PID
//! loadgen pipeline  --url ws://127.0.0.1:8787/ -c 1 -s 64 -w 16
//! loadgen large     --url ws://127.0.0.1:8787/ -s 1048576
//! loadgen handshake --url ws://127.0.0.1:8787/ -c 8
//! loadgen idle      --url ws://127.0.0.1:8787/ -c 10000 --hold 2
//! loadgen broadcast --url ws://127.0.0.1:8787/room -c 100
//! ```

// The rule against `tokio::spawn` (clippy.toml) exists so that every task of the server core goes
// through its accounting spawn function; the load generator is not the server core.
#![allow(clippy::disallowed_methods)]

mod conn;
mod procfs;
mod report;
mod scenarios;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::conn::Target;
use crate::report::Json;
use crate::scenarios::Params;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// C connections; send a message, await its echo, repeat.
    Pingpong,
    /// C connections, each with a window of W messages in flight.
    Pipeline,
    /// Ping-pong with large messages (give -s 65536 or -s 1048576).
    Large,
    /// C workers; each opens a connection, echoes one message, closes, repeats.
    Handshake,
    /// Open C connections and hold them; report server RSS and kernel socket memory per connection.
    Idle,
    /// C subscribers and one publisher on the URL's path; deliveries/s, publish to last delivery.
    Broadcast,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Pingpong => "pingpong",
            Scenario::Pipeline => "pipeline",
            Scenario::Large => "large",
            Scenario::Handshake => "handshake",
            Scenario::Idle => "idle",
            Scenario::Broadcast => "broadcast",
        }
    }
}

#[derive(Parser, Debug)]
#[command(name = "loadgen", about = "WebSocket load generator (loopback targets only)")]
struct Cli {
    #[arg(value_enum)]
    scenario: Scenario,
    /// Target, ws://127.x.y.z:PORT/PATH.
    #[arg(long, default_value = "ws://127.0.0.1:8787/")]
    url: String,
    /// Connections (pingpong, pipeline, large, idle), workers (handshake), subscribers (broadcast).
    #[arg(short = 'c', long, default_value_t = 1)]
    connections: usize,
    /// Message size in bytes (at least 16: the header carries a timestamp and a sequence number).
    #[arg(short = 's', long, default_value_t = 64)]
    size: usize,
    /// Messages in flight per connection (pipeline) or from the publisher (broadcast).
    #[arg(short = 'w', long)]
    window: Option<usize>,
    /// Measured seconds (after the warm-up).
    #[arg(short = 'd', long, default_value_t = 3.0)]
    duration: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Seconds the idle connections are held before the server's memory is read.
    #[arg(long, default_value_t = 2.0)]
    hold: f64,
    /// Server pid: its CPU time and memory (with its descendants') are read from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Label copied into the result (the server's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Handshakes in progress at once while opening connections.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Per-connection cap on messages (every loop is bounded in count as well as time).
    #[arg(long, default_value_t = 100_000_000)]
    max_messages: u64,
    /// Spread client source addresses over 127.0.1.1-200 (default: for idle, handshake and
    /// more than 1,000 connections).
    #[arg(long)]
    spread_sources: Option<bool>,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 3600.0))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let target = match Target::parse(&cli.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let window = cli.window.unwrap_or(match cli.scenario {
        Scenario::Pipeline => 16,
        _ => 1,
    });
    let spread = cli
        .spread_sources
        .unwrap_or(matches!(cli.scenario, Scenario::Idle | Scenario::Handshake) || cli.connections > 1000);
    let p = Params {
        target,
        connections: cli.connections.clamp(1, 1_000_000),
        size: cli.size,
        window: window.clamp(1, 1_000_000),
        warmup: secs(cli.warmup),
        duration: secs(cli.duration.max(0.1)),
        hold: secs(cli.hold),
        max_messages: cli.max_messages,
        connect_concurrency: cli.connect_concurrency,
        spread_sources: spread,
        server_pids: cli.server_pid.map(procfs::process_tree).unwrap_or_default(),
    };
    if matches!(cli.scenario, Scenario::Pingpong | Scenario::Pipeline | Scenario::Broadcast | Scenario::Large)
    {
        procfs::raise_nofile_limit(p.connections as u64 + 1024);
    }
    // The load generator is pinned to one core: one thread does all the work.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // An upper bound on the whole run, whatever the server does.
    let limit = p.warmup + p.duration + p.hold + Duration::from_secs(180);
    let scenario = cli.scenario;
    let result = rt.block_on(async {
        tokio::time::timeout(limit, async {
            match scenario {
                Scenario::Pingpong | Scenario::Large => scenarios::pingpong(&p).await,
                Scenario::Pipeline => scenarios::pipeline(&p).await,
                Scenario::Handshake => scenarios::handshake(&p).await,
                Scenario::Idle => scenarios::idle(&p).await,
                Scenario::Broadcast => scenarios::broadcast(&p).await,
            }
        })
        .await
    });
    // Tasks still running (a server that stopped answering) are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_secs(1));
    let mut head = Json::default();
    head.str("scenario", scenario.name()).str("server", &cli.label);
    match result {
        Ok(body) => {
            println!("{}", head.raw(&body).line());
            ExitCode::SUCCESS
        }
        Err(_) => {
            head.str("error", &format!("run did not finish within {limit:?}"));
            println!("{}", head.line());
            ExitCode::from(1)
        }
    }
}
