//! `emberctl lab`: a local lab on this machine. Starts `emberd` (found next
//! to `emberctl`) with a data dir under `--dir`, creates a demo volume and
//! prints where to point NBD clients. With `--detach` it writes
//! `DIR/lab.json` and returns; `lab down --dir DIR` stops exactly the
//! processes recorded there.
//!
//! Today the lab has one site (site-a). Replication (issue 4) adds site-b.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use ember_proto::control::v1 as pb;
use serde_json::json;

use crate::client;
use crate::output::Out;

const DEMO_VOLUME: &str = "demo";

#[derive(Debug, Subcommand)]
pub(crate) enum LabCmd {
    /// Start the lab (foreground with a live view, or --detach).
    Up {
        /// Lab directory (data dirs, sockets, logs, lab.json).
        #[arg(long, default_value = "lab")]
        dir: PathBuf,
        /// Return once the lab is up; stop it with `lab down`.
        #[arg(long)]
        detach: bool,
        /// Demo volume size.
        #[arg(long, default_value = "1G")]
        size: String,
    },
    /// Stop a detached lab.
    Down {
        #[arg(long, default_value = "lab")]
        dir: PathBuf,
    },
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
    child: Child,
    api: String,
    nbd: String,
}

fn start_site(dir: &Path, name: &str) -> anyhow::Result<Site> {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let api_path = std::fs::canonicalize(&data)?.join("api.sock");
    let api = format!("unix:{}", api_path.display());
    let nbd = format!("127.0.0.1:{}", free_port()?);
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(emberd_path()?)
        .args([
            "--data-dir",
            &data.display().to_string(),
            "--api",
            &api,
            "--nbd",
            &nbd,
            "--log-format",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting emberd")?;
    Ok(Site { child, api, nbd })
}

async fn wait_ready(site: &mut Site) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = site.child.try_wait()? {
            bail!("emberd exited during start-up ({status}); see its log in the lab dir");
        }
        if client::connect(&site.api).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("emberd did not answer on {} within 20 s", site.api)
}

pub(crate) async fn run(cmd: LabCmd, out: Out) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up { dir, detach, size } => up(&dir, detach, &size, out).await,
        LabCmd::Down { dir } => down(&dir),
    }
}

async fn up(dir: &Path, detach: bool, size: &str, out: Out) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let dir = std::fs::canonicalize(dir)?;
    if dir.join("lab.json").exists() {
        bail!(
            "{} already holds a lab; run `emberctl lab down --dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    let mut site = start_site(&dir, "site-a")?;
    if let Err(e) = wait_ready(&mut site).await {
        let _ = site.child.kill();
        return Err(e);
    }
    let mut api = client::connect(&site.api).await?;
    let volume = api
        .create_volume(pb::CreateVolumeRequest {
            name: DEMO_VOLUME.into(),
            size_bytes: ember_common::parse_size(size).map_err(anyhow::Error::msg)?,
            tracking_granularity_bytes: 0,
            source: None,
        })
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    let lab = json!({
        "sites": { "site-a": { "api": site.api, "nbd": site.nbd, "pid": site.child.id() } },
        "volume": { "name": volume.name, "nbd_uri": { "site-a": volume.nbd_uri } },
    });
    std::fs::write(dir.join("lab.json"), serde_json::to_vec_pretty(&lab)?)?;
    if out.json || detach {
        println!("{}", serde_json::to_string_pretty(&lab)?);
    }
    if detach {
        return Ok(());
    }
    println!("Ember lab up in {}", dir.display());
    println!("  site-a API:  {}", site.api);
    println!("  demo volume: {}", volume.nbd_uri);
    println!(
        "Try:  nbdinfo {}    |    qemu-io -f raw -c 'write -P 0x5a 0 1M' {}",
        volume.nbd_uri, volume.nbd_uri
    );
    println!("Ctrl-C stops the lab.\n");
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            () = tokio::time::sleep(Duration::from_secs(2)) => {
                if let Ok(r) = api.get_volume(pb::GetVolumeRequest { name: DEMO_VOLUME.into() }).await {
                    let v = r.into_inner().volume.unwrap_or_default();
                    println!("demo: allocated {:>10}  dirty {:>10}  nbd connections {}",
                        ember_common::format_size(v.allocated_bytes), ember_common::format_size(v.dirty_bytes), v.nbd_connections);
                }
            }
        }
    }
    down(&dir)
}

fn down(dir: &Path) -> anyhow::Result<()> {
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
        if unsafe { libc::kill(pid as i32, libc::SIGTERM) } == 0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && unsafe { libc::kill(pid as i32, 0) } == 0 {
                reap(pid as i32);
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("stopped {name} (pid {pid})");
        }
    }
    std::fs::remove_file(&path)?;
    Ok(())
}

fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: non-blocking waitpid on our own child (no-op otherwise).
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}
