//! Cost of change tracking on the write path: admission of a write to a hot
//! extent (the common case, no I/O), scanning a large bitmap for dirty
//! extents, and decoding NBD request headers.

use criterion::{Criterion, criterion_group, criterion_main};
use ember_tracking::{Tracker, TrackingConfig};

fn hot_write_admission(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Tracker::open(dir.path(), 1 << 30, TrackingConfig::default()).expect("open");
    // Warm every extent so the loop measures the no-I/O path.
    for e in 0..256u64 {
        let a = t.begin_write(e << 22, 4096).expect("admit");
        if let Some(seq) = a.commit_seq {
            t.commit(seq).expect("commit");
        }
        t.end_write(a);
    }
    let mut off = 0u64;
    c.bench_function("tracking/begin_end_write_hot_4k", |b| {
        b.iter(|| {
            off = (off + 7 * 4096) % (1 << 30);
            let a = t.begin_write(off, 4096).expect("admit");
            assert!(a.commit_seq.is_none());
            t.end_write(a);
        })
    });
}

fn dirty_scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Tracker::open(dir.path(), 64 << 30, TrackingConfig::default()).expect("open");
    for i in 0..1000u64 {
        let a = t.begin_write(i * (64 << 20), 4096).expect("admit");
        if let Some(seq) = a.commit_seq {
            t.commit(seq).expect("commit");
        }
        t.end_write(a);
    }
    c.bench_function("tracking/dirty_extents_64GiB_1000_runs", |b| {
        b.iter(|| t.dirty_extents())
    });
}

fn request_decode(c: &mut Criterion) {
    let mut raw = [0u8; 28];
    raw[0..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
    raw[24..28].copy_from_slice(&4096u32.to_be_bytes());
    c.bench_function("nbd/decode_request_header", |b| {
        b.iter(|| ember_nbd::decode_request_header(std::hint::black_box(&raw)).expect("valid"))
    });
}

criterion_group!(benches, hot_write_admission, dirty_scan, request_decode);
criterion_main!(benches);
