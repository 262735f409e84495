//! `emberctl top`: a status view of one agent that redraws in place, like
//! `watch` or `drbdtop`. One header per paired peer (state, RTT, measured
//! link throughput), under it one row per volume replicated there (state,
//! lag against the RPO target, shipping rate, resync left and its ETA,
//! mode), peers and rows sorted worst first. On a terminal it takes the
//! alternate screen in raw mode and `q` (or Esc, Ctrl-C) quits; when stdout
//! is not a terminal it prints the same lines as plain text once per
//! refresh, and with `--json` one JSON object per refresh.
//!
//! The lab's foreground view (`emberctl lab up`) is this view with the lab's
//! banner on top. Ordering and rendering are pure functions over the
//! agent's answers ([`rows`], [`render`]) so they are table-tested; only
//! [`Terminal`] touches the tty.

use std::collections::HashMap;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use crossterm::event::{Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, queue, style, terminal};
use ember_common::format_size;
use ember_proto::control::v1 as pb;
use ember_proto::control::v1::ember_control_client::EmberControlClient;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::output::Out;

/// How often the key reader looks at its stop flag between key polls.
const KEY_POLL: Duration = Duration::from_millis(100);

// `emberctl top` arguments. A plain comment on purpose: `Command` defers
// building its subcommands, so a doc comment here would be applied after the
// `Top` variant's and replace its about text in `emberctl top --help`.
#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    /// Time between refreshes, e.g. 1s or 500ms.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Stop after this many refreshes (default: until `q` or interrupted).
    #[arg(long)]
    count: Option<u64>,
}

/// One replicated volume as shown: the agent's status plus the shipping
/// rate measured between two refreshes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    /// Volume name.
    pub(crate) volume: String,
    /// The site it replicates to (or from, on a secondary).
    pub(crate) peer: String,
    /// `primary` / `secondary`.
    pub(crate) role: String,
    /// `sync` / `async`, `+esc` while escalated.
    pub(crate) mode: String,
    /// Replication state as the agent names it.
    pub(crate) state: String,
    /// Current lag, seconds.
    pub(crate) lag_seconds: f64,
    /// Bytes behind.
    pub(crate) lag_bytes: u64,
    /// RPO target, seconds (0: none).
    pub(crate) rpo_seconds: u64,
    /// Lag above the target now.
    pub(crate) rpo_breached: bool,
    /// Shipped bytes per second since the previous refresh (`None` on the
    /// first one).
    pub(crate) shipping_bytes_per_sec: Option<f64>,
    /// Resync bytes left.
    pub(crate) resync_remaining_bytes: u64,
    /// Resync ETA, seconds (0: none or unknown).
    pub(crate) resync_eta_seconds: f64,
}

/// How bad a replica's state is: lower is worse. Anything that needs an
/// admin comes first, then unprotected data, then lag, then the quiet ones.
pub(crate) fn badness(state: &str, rpo_breached: bool) -> u8 {
    match state {
        "split-brain" => 0,
        "fenced" => 1,
        "degraded" => 2,
        "disconnected" | "inconsistent" => 3,
        _ if rpo_breached => 4,
        "lagging" => 5,
        "syncing" => 6,
        "paused" | "detached" => 7,
        "in-sync" | "consistent" => 9,
        // An unknown (newer) state is shown above the healthy ones.
        _ => 8,
    }
}

/// Sort key of a row: state first, then how much of its RPO the lag uses
/// (plain lag when there is no target), then name for a stable order.
fn worse_first(a: &Row, b: &Row) -> std::cmp::Ordering {
    let used = |r: &Row| {
        if r.rpo_seconds > 0 {
            r.lag_seconds / r.rpo_seconds as f64
        } else {
            r.lag_seconds
        }
    };
    badness(&a.state, a.rpo_breached)
        .cmp(&badness(&b.state, b.rpo_breached))
        .then(used(b).total_cmp(&used(a)))
        .then_with(|| a.volume.cmp(&b.volume))
}

/// Rows from the agent's statuses, with shipping rates from the previous
/// refresh's `(when, bytes_shipped)` per volume (updated in place), sorted
/// worst first.
pub(crate) fn rows(
    statuses: &[pb::ReplicationStatus],
    last: &mut HashMap<String, (Instant, u64)>,
    now: Instant,
) -> Vec<Row> {
    let mut out: Vec<Row> = statuses
        .iter()
        .map(|s| {
            let rate = last.get(&s.volume).and_then(|&(t, b)| {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                (dt > 0.0).then(|| s.bytes_shipped.saturating_sub(b) as f64 / dt)
            });
            last.insert(s.volume.clone(), (now, s.bytes_shipped));
            Row {
                volume: s.volume.clone(),
                peer: s.peer_site.clone(),
                role: s.role.clone(),
                mode: if s.rpo_escalated {
                    format!("{}+esc", s.mode)
                } else {
                    s.mode.clone()
                },
                state: s.state.clone(),
                lag_seconds: s.lag_seconds,
                lag_bytes: s.lag_bytes,
                rpo_seconds: s.rpo_seconds,
                rpo_breached: s.rpo_breached,
                shipping_bytes_per_sec: rate,
                resync_remaining_bytes: s.resync_remaining_bytes,
                resync_eta_seconds: s.resync_eta_seconds,
            }
        })
        .collect();
    // Volumes that went away no longer need a rate baseline.
    last.retain(|v, _| statuses.iter().any(|s| &s.volume == v));
    out.sort_by(worse_first);
    out
}

fn duration(secs: f64) -> String {
    if secs >= 3600.0 {
        format!("{:.1}h", secs / 3600.0)
    } else if secs >= 60.0 {
        format!("{:.1}m", secs / 60.0)
    } else {
        format!("{secs:.2}s")
    }
}

fn cells(r: &Row) -> Vec<String> {
    let rpo = if r.rpo_seconds > 0 {
        format!("{}s", r.rpo_seconds)
    } else {
        "-".into()
    };
    vec![
        r.volume.clone(),
        r.state.clone(),
        format!(
            "{} / {rpo}{}",
            duration(r.lag_seconds),
            if r.rpo_breached { " BREACHED" } else { "" }
        ),
        format_size(r.lag_bytes),
        r.shipping_bytes_per_sec
            .map_or("-".into(), |b| format!("{}/s", format_size(b as u64))),
        if r.resync_remaining_bytes > 0 {
            format_size(r.resync_remaining_bytes)
        } else {
            "-".into()
        },
        if r.resync_eta_seconds > 0.0 {
            duration(r.resync_eta_seconds)
        } else {
            "-".into()
        },
        format!("{} {}", r.role, r.mode),
    ]
}

const HEADERS: [&str; 8] = [
    "VOLUME",
    "STATE",
    "LAG / RPO",
    "LAG BYTES",
    "SHIPPING",
    "RESYNC LEFT",
    "ETA",
    "TARGET",
];

fn peer_header(p: Option<&pb::Peer>, site: &str, volumes: usize) -> String {
    match p {
        Some(p) => format!(
            "PEER {site}  {}  RTT {} µs  link {}/s  {volumes} volume(s){}",
            p.state,
            p.rtt_us,
            format_size(p.throughput_bytes_per_sec),
            if p.last_error.is_empty() {
                String::new()
            } else {
                format!("  ({})", p.last_error)
            }
        ),
        None => format!("PEER {site}  not paired here  {volumes} volume(s)"),
    }
}

/// The view's lines (no terminal codes): one header per peer, worst peer
/// first (the peer of the worst row; then peers without volumes), and
/// under it that peer's rows, all columns aligned across peers.
pub(crate) fn render(peers: &[pb::Peer], rows: &[Row]) -> Vec<String> {
    let mut order: Vec<&str> = Vec::new();
    for r in rows {
        if !order.contains(&r.peer.as_str()) {
            order.push(&r.peer);
        }
    }
    let mut idle: Vec<&str> = peers
        .iter()
        .map(|p| p.site.as_str())
        .filter(|s| !order.contains(s))
        .collect();
    idle.sort_unstable();
    order.extend(idle);

    let table: Vec<Vec<String>> = rows.iter().map(cells).collect();
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
    for r in &table {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        format!("  {}", s.trim_end())
    };
    let mut out = Vec::new();
    if order.is_empty() {
        out.push("no peers paired and no replicated volumes".to_owned());
        return out;
    }
    for site in order {
        let mine: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].peer == site).collect();
        out.push(peer_header(
            peers.iter().find(|p| p.site == site),
            site,
            mine.len(),
        ));
        if !mine.is_empty() {
            out.push(line(&HEADERS.map(String::from)));
            for i in mine {
                out.push(line(&table[i]));
            }
        }
    }
    out
}

/// The rows as one JSON object (`--json`), for scripts that poll.
fn render_json(peers: &[pb::Peer], rows: &[Row]) -> Value {
    json!({
        "peers": peers.iter().map(|p| json!({
            "site": p.site, "state": p.state, "rtt_us": p.rtt_us,
            "throughput_bytes_per_sec": p.throughput_bytes_per_sec, "last_error": p.last_error,
        })).collect::<Vec<_>>(),
        "replicas": rows.iter().map(|r| json!({
            "volume": r.volume, "peer": r.peer, "role": r.role, "mode": r.mode,
            "state": r.state, "lag_seconds": r.lag_seconds, "lag_bytes": r.lag_bytes,
            "rpo_seconds": r.rpo_seconds, "rpo_breached": r.rpo_breached,
            "shipping_bytes_per_sec": r.shipping_bytes_per_sec,
            "resync_remaining_bytes": r.resync_remaining_bytes,
            "resync_eta_seconds": r.resync_eta_seconds,
        })).collect::<Vec<_>>(),
    })
}

/// One refresh: asks the agent, returns the lines to show (or an error
/// line, so that a restarting agent does not end the view).
async fn snapshot(
    api: &mut EmberControlClient<Channel>,
    last: &mut HashMap<String, (Instant, u64)>,
    json: bool,
) -> Vec<String> {
    let peers = api.list_peers(pb::ListPeersRequest {}).await;
    let reps = api.list_replications(pb::ListReplicationsRequest {}).await;
    match (peers, reps) {
        (Ok(p), Ok(r)) => {
            let peers = p.into_inner().peers;
            let rows = rows(&r.into_inner().replications, last, Instant::now());
            if json {
                vec![render_json(&peers, &rows).to_string()]
            } else {
                render(&peers, &rows)
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            let e = anyhow::Error::from(e);
            vec![crate::errors::render(&e, json)]
        }
    }
}

/// What the view shows around the table and how long it runs.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// Lines drawn above the table on every refresh (the lab's banner).
    pub(crate) preamble: Vec<String>,
    /// Between refreshes.
    pub(crate) interval: Duration,
    /// Stop after this many refreshes.
    pub(crate) count: Option<u64>,
}

/// Raw mode on the alternate screen while it lives; restores the terminal
/// when dropped (also on panic and on error returns).
#[derive(Debug)]
struct Terminal {
    stop_keys: Arc<AtomicBool>,
}

impl Terminal {
    /// Takes over the terminal and starts a thread that turns `q`, Esc and
    /// Ctrl-C (raw mode delivers it as a key, not SIGINT) into a quit
    /// message, and a resize into a redraw.
    fn enter(keys: mpsc::Sender<Key>) -> anyhow::Result<Self> {
        terminal::enable_raw_mode()?;
        let mut out = std::io::stdout();
        if let Err(e) =
            queue!(out, terminal::EnterAlternateScreen, cursor::Hide).and_then(|()| out.flush())
        {
            let _ = terminal::disable_raw_mode();
            return Err(e.into());
        }
        let stop_keys = Arc::new(AtomicBool::new(false));
        let stop = stop_keys.clone();
        // Detached: it polls with a timeout and exits once `stop` is set,
        // i.e. within KEY_POLL of the terminal being restored.
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok(true) = crossterm::event::poll(KEY_POLL) else {
                    continue;
                };
                let key = match crossterm::event::read() {
                    Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => match k.code {
                        KeyCode::Char('q' | 'Q') | KeyCode::Esc => Key::Quit,
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                            Key::Quit
                        }
                        _ => continue,
                    },
                    Ok(Event::Resize(..)) => Key::Redraw,
                    Ok(_) => continue,
                    Err(_) => Key::Quit,
                };
                if keys.blocking_send(key).is_err() {
                    return;
                }
            }
        });
        Ok(Self { stop_keys })
    }

    /// Redraws the screen from the top: each line cut to the width and
    /// cleared to its end, then everything below the last one cleared.
    fn draw(&self, lines: &[String]) -> std::io::Result<()> {
        let (width, height) = terminal::size().unwrap_or((80, 24));
        let mut out = std::io::stdout();
        queue!(out, cursor::MoveTo(0, 0))?;
        for (i, l) in lines.iter().take(height as usize).enumerate() {
            if i > 0 {
                queue!(out, cursor::MoveToNextLine(1))?;
            }
            let cut: String = l.chars().take(width as usize).collect();
            queue!(
                out,
                style::Print(cut),
                terminal::Clear(terminal::ClearType::UntilNewLine)
            )?;
        }
        queue!(out, terminal::Clear(terminal::ClearType::FromCursorDown))?;
        out.flush()
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.stop_keys.store(true, Ordering::Relaxed);
        let mut out = std::io::stdout();
        let _ = queue!(out, cursor::Show, terminal::LeaveAlternateScreen);
        let _ = out.flush();
        let _ = terminal::disable_raw_mode();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Quit,
    Redraw,
}

/// Whether [`run_view`] can redraw in place (stdout is a terminal).
pub(crate) fn interactive() -> bool {
    std::io::stdout().is_terminal()
}

/// Runs the view against `api` until `q` (terminal), `count` refreshes,
/// or `stop` resolves (the lab's Ctrl-C).
///
/// # Errors
/// The terminal could not be set up or written.
pub(crate) async fn run_view(
    api: &mut EmberControlClient<Channel>,
    out: Out,
    view: View,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let (tx, mut keys) = mpsc::channel(8);
    let term = if interactive() && !out.json {
        Some(Terminal::enter(tx)?)
    } else {
        drop(tx);
        None
    };
    let mut last = HashMap::new();
    let mut refreshes = 0u64;
    loop {
        let mut lines = view.preamble.clone();
        lines.extend(snapshot(api, &mut last, out.json).await);
        match &term {
            Some(t) => t.draw(&lines)?,
            None => {
                let mut stdout = std::io::stdout().lock();
                for l in &lines {
                    writeln!(stdout, "{l}")?;
                }
                if !out.json {
                    writeln!(stdout)?;
                }
                stdout.flush()?;
            }
        }
        refreshes += 1;
        if view.count.is_some_and(|n| refreshes >= n) {
            break;
        }
        let next = tokio::time::sleep(view.interval);
        tokio::pin!(next);
        let quit = loop {
            tokio::select! {
                () = &mut next => break false,
                () = &mut stop => break true,
                k = keys.recv(), if term.is_some() => match k {
                    Some(Key::Redraw) => {
                        if let Some(t) = &term {
                            t.draw(&lines)?;
                        }
                    }
                    Some(Key::Quit) | None => break true,
                },
            }
        };
        if quit {
            break;
        }
    }
    drop(term);
    Ok(())
}

/// `emberctl top`.
///
/// # Errors
/// As [`run_view`].
pub(crate) async fn run(
    api: &mut EmberControlClient<Channel>,
    out: Out,
    args: TopArgs,
    endpoint: &str,
) -> anyhow::Result<()> {
    let preamble = if interactive() && !out.json {
        vec![
            format!(
                "emberctl top  {endpoint}  every {}  (q quits)",
                humantime::format_duration(args.interval)
            ),
            String::new(),
        ]
    } else {
        Vec::new()
    };
    let view = View {
        preamble,
        interval: args.interval,
        count: args.count,
    };
    run_view(api, out, view, std::future::pending()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(volume: &str, peer: &str, state: &str, lag: f64, rpo: u64) -> pb::ReplicationStatus {
        pb::ReplicationStatus {
            volume: volume.into(),
            peer_site: peer.into(),
            role: "primary".into(),
            mode: "async".into(),
            state: state.into(),
            lag_seconds: lag,
            rpo_seconds: rpo,
            rpo_breached: rpo > 0 && lag > rpo as f64,
            ..Default::default()
        }
    }

    #[test]
    fn states_rank_admin_problems_first_and_healthy_last() {
        let ranked = [
            ("split-brain", false),
            ("fenced", false),
            ("degraded", false),
            ("disconnected", false),
            ("lagging", true),
            ("lagging", false),
            ("syncing", false),
            ("paused", false),
            ("some-new-state", false),
            ("in-sync", false),
        ];
        for pair in ranked.windows(2) {
            assert!(
                badness(pair[0].0, pair[0].1) < badness(pair[1].0, pair[1].1),
                "{pair:?}"
            );
        }
    }

    #[test]
    fn rows_are_sorted_worst_first_then_by_share_of_the_rpo() {
        let mut last = HashMap::new();
        let list = [
            status("ok", "site-b", "in-sync", 0.0, 30),
            status("half", "site-b", "lagging", 15.0, 30),
            status("tenth", "site-c", "lagging", 10.0, 100),
            status("late", "site-c", "lagging", 40.0, 30),
            status("cut", "site-b", "disconnected", 2.0, 30),
            status("brain", "site-c", "split-brain", 0.0, 30),
        ];
        let order: Vec<String> = rows(&list, &mut last, Instant::now())
            .into_iter()
            .map(|r| r.volume)
            .collect();
        assert_eq!(order, ["brain", "cut", "late", "half", "tenth", "ok"]);
    }

    #[test]
    fn shipping_rate_comes_from_two_refreshes() {
        let mut last = HashMap::new();
        let t0 = Instant::now();
        let mut s = status("v", "site-b", "in-sync", 0.0, 30);
        s.bytes_shipped = 1000;
        assert_eq!(
            rows(&[s.clone()], &mut last, t0)[0].shipping_bytes_per_sec,
            None
        );
        s.bytes_shipped = 5000;
        let r = rows(&[s], &mut last, t0 + Duration::from_secs(2));
        assert_eq!(r[0].shipping_bytes_per_sec, Some(2000.0));
        // A volume that disappears drops its baseline.
        rows(&[], &mut last, t0 + Duration::from_secs(3));
        assert!(last.is_empty());
    }

    #[test]
    fn view_has_a_header_per_peer_worst_peer_first_with_aligned_rows() {
        let mut last = HashMap::new();
        let peers = vec![
            pb::Peer {
                site: "site-b".into(),
                state: "connected".into(),
                rtt_us: 74,
                ..Default::default()
            },
            pb::Peer {
                site: "site-c".into(),
                state: "unreachable".into(),
                last_error: "connection refused".into(),
                ..Default::default()
            },
            pb::Peer {
                site: "site-d".into(),
                state: "connected".into(),
                ..Default::default()
            },
        ];
        let list = [
            status("db", "site-b", "in-sync", 0.0, 30),
            status("logs", "site-c", "disconnected", 42.0, 30),
        ];
        let lines = render(&peers, &rows(&list, &mut last, Instant::now()));
        assert!(
            lines[0].starts_with("PEER site-c  unreachable"),
            "{lines:#?}"
        );
        assert!(lines[0].ends_with("(connection refused)"), "{lines:#?}");
        assert!(lines[1].trim_start().starts_with("VOLUME"), "{lines:#?}");
        assert!(lines[2].contains("logs") && lines[2].contains("42.00s / 30s BREACHED"));
        assert!(lines[3].starts_with("PEER site-b  connected  RTT 74 µs"));
        assert!(lines[5].contains("db") && lines[5].contains("in-sync"));
        // Peers with nothing replicated to them still get their header, last.
        assert_eq!(
            lines[6],
            "PEER site-d  connected  RTT 0 µs  link 0 B/s  0 volume(s)"
        );
        assert_eq!(lines.len(), 7);
        // Columns line up across peers: STATE starts at one offset.
        let col = |l: &str, w: &str| l.find(w).expect("cell");
        assert_eq!(col(&lines[2], "disconnected"), col(&lines[5], "in-sync"));
    }

    #[test]
    fn an_agent_with_nothing_replicated_says_so() {
        assert_eq!(
            render(&[], &[]),
            ["no peers paired and no replicated volumes"]
        );
    }
}
