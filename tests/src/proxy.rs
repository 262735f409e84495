//! A fault-injecting TCP proxy for link tests (no netem here): sits between
//! two agents' peer listeners and can cut, stall, delay, reset mid-stream or
//! flip bits, on command, while tests run. Std threads only: two pumps per
//! connection, one per direction, reading the shared fault settings per chunk.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Default)]
struct Faults {
    /// Added to every forwarded chunk, each direction.
    delay: Duration,
    /// Forward nothing (connections stay open) while set.
    stalled: bool,
    /// Accept-and-close new connections while set.
    cut: bool,
    /// Bytes still to corrupt (one bit flipped per chunk while > 0).
    flips_left: u64,
    /// Close a connection after this many more forwarded bytes (mid-frame reset).
    reset_after: Option<u64>,
    /// Bandwidth per connection and direction, bytes per second (0: none):
    /// a slow WAN link without tc.
    rate: u64,
}

/// A running proxy. Dropping it stops accepting; live pumps end with their sockets.
#[derive(Debug)]
pub struct FaultProxy {
    /// Address clients should dial instead of the target.
    pub addr: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    /// Bumped by `cut`: pumps of older connections close.
    epoch: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Bytes forwarded, both directions.
    pub forwarded: Arc<AtomicU64>,
    /// Bits flipped so far.
    pub flipped: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 forwarding to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let proxy = Self {
            addr,
            faults: Arc::new(Mutex::new(Faults::default())),
            epoch: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            forwarded: Arc::new(AtomicU64::new(0)),
            flipped: Arc::new(AtomicU64::new(0)),
        };
        let (faults, epoch, stop, fwd, flipped) = (
            proxy.faults.clone(),
            proxy.epoch.clone(),
            proxy.stop.clone(),
            proxy.forwarded.clone(),
            proxy.flipped.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                if faults.lock().expect("faults").cut {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let my_epoch = epoch.load(Ordering::Relaxed);
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let (faults, epoch, fwd, flipped) =
                        (faults.clone(), epoch.clone(), fwd.clone(), flipped.clone());
                    std::thread::spawn(move || {
                        pump(from, to, &faults, &epoch, my_epoch, &fwd, &flipped)
                    });
                }
            }
        });
        proxy
    }

    /// Drops every connection and refuses new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.faults.lock().expect("faults").cut = true;
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Clears every fault.
    pub fn restore(&self) {
        *self.faults.lock().expect("faults") = Faults::default();
    }

    /// Adds `delay` to every chunk in each direction (one-way latency).
    pub fn set_delay(&self, delay: Duration) {
        self.faults.lock().expect("faults").delay = delay;
    }

    /// Holds traffic (connections stay open) while `stalled`.
    pub fn stall(&self, stalled: bool) {
        self.faults.lock().expect("faults").stalled = stalled;
    }

    /// Limits each connection, each direction, to `bytes_per_sec` (0 lifts it).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.faults.lock().expect("faults").rate = bytes_per_sec;
    }

    /// Flips one bit in each of the next `chunks` forwarded chunks.
    pub fn flip_bits(&self, chunks: u64) {
        self.faults.lock().expect("faults").flips_left = chunks;
    }

    /// Resets connections once `bytes` more bytes have been forwarded.
    pub fn reset_after(&self, bytes: u64) {
        self.faults.lock().expect("faults").reset_after = Some(bytes);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
        // Unblock the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    faults: &Mutex<Faults>,
    epoch: &AtomicU64,
    my_epoch: u64,
    forwarded: &AtomicU64,
    flipped: &AtomicU64,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    // 16 KiB reads: fine-grained pacing when a rate is set.
    let mut buf = vec![0u8; 16 * 1024];
    let close = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    loop {
        if epoch.load(Ordering::Relaxed) != my_epoch {
            return close(&from, &to);
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return close(&from, &to),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return close(&from, &to),
        };
        let (delay, reset) = loop {
            let mut f = faults.lock().expect("faults");
            if f.stalled && epoch.load(Ordering::Relaxed) == my_epoch {
                drop(f);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            if f.flips_left > 0 {
                f.flips_left -= 1;
                buf[n / 2] ^= 0x10;
                flipped.fetch_add(1, Ordering::Relaxed);
            }
            let reset = match f.reset_after {
                Some(left) if left <= n as u64 => {
                    f.reset_after = None;
                    true
                }
                Some(left) => {
                    f.reset_after = Some(left - n as u64);
                    false
                }
                None => false,
            };
            let pace = if f.rate > 0 {
                Duration::from_secs_f64(n as f64 / f.rate as f64)
            } else {
                Duration::ZERO
            };
            break (f.delay + pace, reset);
        };
        if reset {
            // Forward part of the chunk, then drop the connection mid-frame.
            let _ = to.write_all(&buf[..n / 2]);
            return close(&from, &to);
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if to.write_all(&buf[..n]).is_err() {
            return close(&from, &to);
        }
        forwarded.fetch_add(n as u64, Ordering::Relaxed);
    }
}
