//! `emberctl lab`: a two- or three-site lab on this machine. Starts one
//! `emberd` per site (found next to `emberctl`), each with its own data dir
//! and a certificate from a lab CA (`DIR/pki`, made with `emberctl pki`),
//! pairs every two sites both ways over mutual TLS on loopback, creates a
//! demo volume on site-a replicated asynchronously to site-b (two sites) or
//! synchronously to site-b and asynchronously to site-c (`--sites 3`: the
//! metro + far layout of issue 14), and prints where to point
//! NBD clients plus a live view of lag and throughput (on a terminal,
//! `emberctl top`'s view of site-a under the banner; piped, one line a
//! second). With `--detach` it
//! writes `DIR/lab.json` and returns; `lab down --dir DIR` stops exactly the
//! processes recorded there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use ember_proto::control::v1 as pb;
use serde_json::json;

use crate::client;
use crate::output::{Out, outln};

const DEMO_VOLUME: &str = "demo";
const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
/// The demo volume's RPO at its async target.
const DEMO_RPO_SECONDS: u64 = 30;

/// The demo volume's targets for a lab of `sites` sites: `(site, sync)`.
/// Two sites keep the original lab (async to site-b); three are the metro +
/// far layout: sync to the near site-b, async to the far site-c.
fn demo_targets(sites: usize) -> &'static [(&'static str, bool)] {
    if sites >= 3 {
        &[("site-b", true), ("site-c", false)]
    } else {
        &[("site-b", false)]
    }
}

#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub(crate) enum LabCmd {
    /// Start the lab (foreground with a live view, or --detach).
    Up {
        /// Lab directory (data dirs, certificates, sockets, logs, lab.json).
        #[arg(long, default_value = "lab")]
        dir: PathBuf,
        /// Return once the lab is up; stop it with `lab down`.
        #[arg(long)]
        detach: bool,
        /// Demo volume size.
        #[arg(long, default_value = "1G")]
        size: String,
        /// Number of sites: 2 (site-a async to site-b) or 3 (site-a sync to
        /// site-b and async to site-c).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=3))]
        sites: u8,
    },
    /// Stop a detached lab.
    Down {
        #[arg(long, default_value = "lab")]
        dir: PathBuf,
    },
}

/// A free loopback port for an agent to bind a moment later, picked below
/// the kernel's ephemeral range: a `bind(0)` port comes from that range,
/// and any outgoing connection on the host may take it before the agent
/// binds it (the lab then dies at start-up). `taken` holds the ports this
/// lab already handed out.
fn free_port(taken: &mut Vec<u16>) -> anyhow::Result<u16> {
    const LOWEST: u16 = 10_000;
    let below = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&lo| lo > LOWEST + 1_000)
        .unwrap_or(32_768);
    let span = u32::from(below - LOWEST);
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for i in 0..span {
        let port = LOWEST + u16::try_from(seed.wrapping_add(i) % span)?;
        if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return Ok(port);
        }
    }
    bail!("no free TCP port between {LOWEST} and {below}")
}

fn emberd_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating emberctl")?;
    let path = exe.with_file_name("emberd");
    if !path.exists() {
        bail!(
            "emberd not found next to emberctl at {} (build both: cargo build --release)",
            path.display()
        );
    }
    Ok(path)
}

struct Site {
    name: &'static str,
    child: Child,
    api: String,
    nbd: String,
    peer: String,
    log: PathBuf,
}

fn start_site(dir: &Path, name: &'static str, ports: &mut Vec<u16>) -> anyhow::Result<Site> {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let api = format!(
        "unix:{}",
        std::fs::canonicalize(&data)?.join("api.sock").display()
    );
    let nbd = format!("127.0.0.1:{}", free_port(ports)?);
    let peer = format!("127.0.0.1:{}", free_port(ports)?);
    let pki = dir.join("pki");
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "site = \"{name}\"\n[peer]\nlisten = \"{peer}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            pki.join(format!("{name}.crt")).display(),
            pki.join(format!("{name}.key")).display(),
            pki.join("ca.crt").display()
        ),
    )?;
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(emberd_path()?)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .args(["--api", &api, "--nbd", &nbd, "--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting emberd")?;
    Ok(Site {
        name,
        child,
        api,
        nbd,
        peer,
        log: log_path,
    })
}

async fn wait_ready(site: &mut Site) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = site.child.try_wait()? {
            // The agent's last log line says why (a port taken, a bad
            // config): show it rather than send the user hunting.
            let last = std::fs::read_to_string(&site.log)
                .ok()
                .and_then(|l| l.lines().last().map(str::to_owned))
                .unwrap_or_default();
            bail!(
                "emberd for {} exited during start-up ({status}): {last}\n(full log: {})",
                site.name,
                site.log.display()
            );
        }
        if client::connect(&site.api).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "emberd for {} did not answer on {} within 20 s",
        site.name,
        site.api
    )
}

fn stop_all(sites: &mut [Site]) {
    for s in sites.iter_mut() {
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
}

pub(crate) async fn run(cmd: LabCmd, out: Out) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            dir,
            detach,
            size,
            sites,
        } => up(&dir, detach, &size, usize::from(sites), out).await,
        LabCmd::Down { dir } => down(&dir).await,
    }
}

async fn up(
    dir: &Path,
    detach: bool,
    size: &str,
    site_count: usize,
    out: Out,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let dir = std::fs::canonicalize(dir)?;
    if dir.join("lab.json").exists() {
        bail!(
            "{} already holds a lab; run `emberctl lab down --dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    let size_bytes = ember_common::parse_size(size).map_err(anyhow::Error::msg)?;
    let names = &SITES[..site_count];
    let pki = dir.join("pki");
    if !pki.join("ca.key").exists() {
        crate::pki::init(&pki)?;
    }
    for name in names {
        // A lab directory reused with more sites needs their certificates.
        if !pki.join(format!("{name}.crt")).exists() {
            crate::pki::issue(&pki, name, Vec::new())?;
        }
    }
    let mut sites = Vec::new();
    let mut ports = Vec::new();
    for &name in names {
        match start_site(&dir, name, &mut ports) {
            Ok(site) => sites.push(site),
            Err(e) => {
                stop_all(&mut sites);
                return Err(e);
            }
        }
    }
    if let Err(e) = pair_and_create(&mut sites, size_bytes).await {
        stop_all(&mut sites);
        return Err(e);
    }
    let mut api = client::connect(&sites[0].api).await?;
    let volume = api
        .get_volume(pb::GetVolumeRequest {
            name: DEMO_VOLUME.into(),
        })
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    let mut nbd_uris = serde_json::Map::new();
    nbd_uris.insert("site-a".into(), volume.nbd_uri.clone().into());
    for site in &sites[1..] {
        let uri = client::connect(&site.api)
            .await?
            .get_volume(pb::GetVolumeRequest {
                name: DEMO_VOLUME.into(),
            })
            .await?
            .into_inner()
            .volume
            .with_context(|| format!("no secondary volume on {}", site.name))?
            .nbd_uri;
        nbd_uris.insert(site.name.into(), uri.into());
    }
    let targets = demo_targets(sites.len());
    let mode = |sync: bool| if sync { "sync" } else { "async" };
    let rpo = |sync: bool| if sync { 0 } else { DEMO_RPO_SECONDS };
    // `secondary`/`mode`/`rpo_seconds` name the first target, as in the
    // two-site lab; `targets` lists them all.
    let (first, first_sync) = targets[0];
    let site_json: serde_json::Map<String, serde_json::Value> = sites
        .iter()
        .map(|s| {
            (
                s.name.to_owned(),
                json!({ "api": s.api, "nbd": s.nbd, "peer": s.peer, "pid": s.child.id() }),
            )
        })
        .collect();
    let lab = json!({
        "sites": site_json,
        "pki": pki.display().to_string(),
        "volume": {
            "name": volume.name,
            "nbd_uri": nbd_uris,
            "replication": {
                "primary": "site-a",
                "secondary": first,
                "mode": mode(first_sync),
                "rpo_seconds": rpo(first_sync),
                "targets": targets.iter().map(|&(peer, sync)| json!({
                    "peer": peer, "mode": mode(sync), "rpo_seconds": rpo(sync),
                })).collect::<Vec<_>>(),
            },
        },
    });
    std::fs::write(dir.join("lab.json"), serde_json::to_vec_pretty(&lab)?)?;
    if out.json || detach {
        outln!("{}", serde_json::to_string_pretty(&lab)?);
    }
    if detach {
        return Ok(());
    }
    let mut banner = vec![format!("Ember lab up in {}", dir.display())];
    for site in &sites {
        banner.push(format!(
            "  {}: API {}   NBD {}   peer listener {}",
            site.name, site.api, site.nbd, site.peer
        ));
    }
    banner.push(format!(
        "  {} are paired over mutual TLS (certificates in {})",
        names.join(", "),
        pki.display()
    ));
    banner.push(format!(
        "  demo volume (primary, write here): {}",
        volume.nbd_uri
    ));
    for &(peer, sync) in targets {
        let how = if sync {
            "sync: no acknowledged write lost".to_owned()
        } else {
            format!("async, RPO {DEMO_RPO_SECONDS} s")
        };
        banner.push(format!(
            "  its secondary on {peer} (read-only, {how}): {}",
            nbd_uris[peer].as_str().unwrap_or_default()
        ));
    }
    banner.push(format!(
        "Try:  qemu-io -f raw -c 'write -P 0x5a 0 64M' {}    then    qemu-img compare -f raw -F raw {} {}",
        volume.nbd_uri,
        volume.nbd_uri,
        nbd_uris[first].as_str().unwrap_or_default()
    ));
    // Printed in both modes: on a terminal the view below takes the
    // alternate screen, and this stays in the scrollback once it is gone.
    for line in &banner {
        outln!("{line}");
    }
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let viewed = if crate::top::interactive() {
        // On a terminal: `emberctl top` of site-a (the primary), redrawn in
        // place under the banner.
        banner.push("q or Ctrl-C stops the lab.".into());
        banner.push(String::new());
        let view = crate::top::View {
            preamble: banner,
            interval: Duration::from_secs(1),
            count: None,
        };
        crate::top::run_view(&mut api, Out { json: false }, view, stop).await
    } else {
        // Piped (scripts, tests): one plain line a second, as before.
        outln!("Ctrl-C stops the lab.\n");
        tokio::pin!(stop);
        let mut last_shipped = None;
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(Duration::from_secs(1)) => live_line(&mut api, &mut last_shipped).await,
            }
        }
        Ok(())
    };
    // Close our own API connection first (the runtime keeps running while
    // `down` waits, so the close reaches the agent), then stop the sites,
    // also when the view failed.
    drop(api);
    down(&dir).await?;
    viewed
}

async fn pair_and_create(sites: &mut [Site], size_bytes: u64) -> anyhow::Result<()> {
    for site in sites.iter_mut() {
        wait_ready(site).await?;
    }
    // Every two sites both ways: a target promoted later keeps the others
    // as its own targets (re-homing) only if it can reach them.
    let pairs: Vec<(usize, usize)> = (0..sites.len())
        .flat_map(|a| (0..sites.len()).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .collect();
    for (from, to) in pairs {
        let mut api = client::connect(&sites[from].api).await?;
        let request = pb::AddPeerRequest {
            site: sites[to].name.into(),
            address: sites[to].peer.clone(),
            measure_bytes: 4 << 20,
            max_rate_bytes_per_sec: 0,
            resync_rate_bytes_per_sec: 0,
        };
        let added = match api.add_peer(request.clone()).await {
            // A lab started again in the same directory: its agents kept
            // the pairing of the last run, at that run's (now other) port.
            // The lab owns both ends, so it re-pairs at the new address.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                api.remove_peer(pb::RemovePeerRequest {
                    site: request.site.clone(),
                })
                .await?;
                api.add_peer(request).await
            }
            other => other,
        };
        added.map_err(|s| {
            anyhow::anyhow!(
                "pairing {} with {} failed: {}",
                sites[from].name,
                sites[to].name,
                s.message()
            )
        })?;
    }
    let mut api = client::connect(&sites[0].api).await?;
    api.create_volume(pb::CreateVolumeRequest {
        name: DEMO_VOLUME.into(),
        size_bytes,
        tracking_granularity_bytes: 0,
        source: None,
    })
    .await
    .map_err(|s| anyhow::anyhow!("creating the demo volume failed: {}", s.message()))?;
    for &(peer, sync) in demo_targets(sites.len()) {
        api.enable_replication(pb::EnableReplicationRequest {
            volume: DEMO_VOLUME.into(),
            peer_site: peer.into(),
            mode: if sync {
                pb::ReplicationMode::Sync
            } else {
                pb::ReplicationMode::Async
            } as i32,
            rpo_seconds: if sync { 0 } else { DEMO_RPO_SECONDS },
            on_peer_loss: pb::PeerLossPolicy::Degrade as i32,
            rpo_policy: pb::RpoPolicy::Alert as i32,
            // Everything else (recovery point schedules…) at the agent's defaults.
            ..Default::default()
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "replicating the demo volume to {peer} failed: {}",
                s.message()
            )
        })?;
    }
    // The secondary exists once the first session opened; wait for it and
    // for the (empty) initial sync.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = api
            .get_replication_status(pb::GetReplicationStatusRequest {
                volume: DEMO_VOLUME.into(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().status)
            .map(|s| (s.state, s.last_error, s.targets.len()))
            .unwrap_or_default();
        // The top-level state is the worst target's: in-sync means all are.
        if state.0 == "in-sync" && state.2 == demo_targets(sites.len()).len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the demo volume did not reach in-sync within 30 s (state {:?}, last error {:?})",
                state.0,
                state.1
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn live_line(
    api: &mut ember_proto::control::v1::ember_control_client::EmberControlClient<
        tonic::transport::Channel,
    >,
    last_shipped: &mut Option<(Instant, u64)>,
) {
    let Ok(r) = api
        .get_volume(pb::GetVolumeRequest {
            name: DEMO_VOLUME.into(),
        })
        .await
    else {
        return;
    };
    let v = r.into_inner().volume.unwrap_or_default();
    let link = match api.list_peers(pb::ListPeersRequest {}).await {
        Ok(p) => {
            let peers: Vec<String> = p
                .into_inner()
                .peers
                .iter()
                .map(|p| format!("{} {} rtt {} µs", p.site, p.state, p.rtt_us))
                .collect();
            if peers.is_empty() {
                "no peer".to_owned()
            } else {
                peers.join(", ")
            }
        }
        Err(e) => e.message().to_owned(),
    };
    let repl = api
        .get_replication_status(pb::GetReplicationStatusRequest {
            volume: DEMO_VOLUME.into(),
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().status)
        .unwrap_or_default();
    let now = Instant::now();
    let rate = last_shipped.map_or(0.0, |(t, b): (Instant, u64)| {
        repl.bytes_shipped.saturating_sub(b) as f64 / now.duration_since(t).as_secs_f64()
    });
    *last_shipped = Some((now, repl.bytes_shipped));
    // One segment per target when there are several (the three-site lab):
    // the top-level fields are only the worst target's.
    let state = if repl.targets.len() > 1 {
        repl.targets
            .iter()
            .map(|t| {
                format!(
                    "{} {} {} lag {:.2}s",
                    t.peer_site, t.mode, t.state, t.lag_seconds
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        format!("{:<12} lag {:>6.2}s", repl.state, repl.lag_seconds)
    };
    outln!(
        "demo: {state} {:>9}  shipping {:>9}/s  resync left {:>9}  allocated {:>9}  clients {}  |  {}",
        ember_common::format_size(repl.lag_bytes),
        ember_common::format_size(rate as u64),
        ember_common::format_size(repl.resync_remaining_bytes),
        ember_common::format_size(v.allocated_bytes),
        v.nbd_connections,
        link
    );
}

async fn down(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("lab.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("no lab at {}", dir.display()))?;
    let lab: serde_json::Value = serde_json::from_str(&text)?;
    let sites = lab["sites"].as_object().context("lab.json has no sites")?;
    for (name, site) in sites {
        let Some(pid) = site["pid"].as_i64() else {
            continue;
        };
        // SAFETY: kill(2) with a pid we started; a stale pid gets ESRCH.
        if unsafe { libc::kill(pid as i32, libc::SIGTERM) } != 0 {
            outln!("{name} (pid {pid}) was not running");
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && alive(pid as i32) {
            // An async sleep: a blocking one would stall this runtime's
            // connection tasks, and agents would wait on our open sockets.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if alive(pid as i32) {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            outln!("killed {name} (pid {pid}): it did not stop within 30 s of SIGTERM");
        } else {
            outln!("stopped {name} (pid {pid})");
        }
    }
    std::fs::remove_file(&path)?;
    Ok(())
}

/// True while `pid` runs; reaps it when it is our exited child.
fn alive(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: non-blocking waitpid (reaps our own child; no-op otherwise) and
    // a signal-0 probe.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
        if libc::kill(pid, 0) != 0 {
            return false;
        }
    }
    // A zombie someone else must reap has stopped running all the same.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2) != Some("Z"))
}
