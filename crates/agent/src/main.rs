//! `emberd` entry point: flags and config file, logging, runtime, signals.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ember_agent::{Config, Listeners};

/// The Ember agent: serves volumes over NBD with crash-safe change tracking.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (volumes, tracking state).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Control API endpoint: unix:/path or http://host:port.
    #[arg(long)]
    api: Option<String>,
    /// NBD TCP listener, host:port.
    #[arg(long)]
    nbd: Option<String>,
    /// Also serve NBD on this Unix socket.
    #[arg(long)]
    nbd_unix: Option<PathBuf>,
    /// I/O engine: auto, io_uring or blocking.
    #[arg(long)]
    io_engine: Option<String>,
    /// This agent's site name.
    #[arg(long)]
    site: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port).
    #[arg(long)]
    metrics: Option<String>,
    /// Turn change tracking off (benchmarking only).
    #[arg(long)]
    no_tracking: bool,
    /// Log format: json or text (default: text on a terminal, json otherwise).
    #[arg(long)]
    log_format: Option<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_toml(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.api {
        config.api = Some(v);
    }
    if let Some(v) = args.nbd {
        config.nbd = v;
    }
    if let Some(v) = args.nbd_unix {
        config.nbd_unix = Some(v);
    }
    if let Some(v) = args.metrics {
        config.metrics = Some(v);
    }
    if let Some(v) = args.io_engine {
        config.io_engine = v;
    }
    if args.no_tracking {
        config.tracking.enabled = false;
    }
    if let Some(v) = args.site {
        config.site = v;
    }
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    if args.check_config {
        println!("{config:#?}");
        return Ok(());
    }
    init_logging(args.log_format.as_deref());
    raise_fd_limit();
    tracing::info!(config = ?config, "starting emberd");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("emberd")
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(ember_agent::run(
        config,
        Listeners::default(),
        shutdown_signal(),
    ))
}

fn init_logging(format: Option<&str>) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let json = match format {
        Some("json") => true,
        Some(_) => false,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for people: log files and journald get plain text.
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

/// Thousands of NBD clients need thousands of descriptors.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
