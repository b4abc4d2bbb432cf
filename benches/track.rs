//! Dirty-tracking overhead on the writer (issue 4, benchmark 1), each figure next to a
//! baseline measured in the same run:
//!
//! 1. ns per first write to a page under each tracker (uffd-wp async, uffd-wp sync with
//!    its fault thread in this process, mprotect at page granule and at its default
//!    granule), next to the same loop with no tracker on the same, already populated,
//!    shared memfd mapping, and next to first-touch population of fresh pages (what any
//!    write to a new page costs);
//! 2. the cost of one `collect`: PAGEMAP_SCAN with WP_MATCHING over 1 GiB with no page,
//!    1% and every page written; the mprotect tracker's collect; and an xxh3 hash of
//!    the same 1 GiB (what the hash-scan file tracker pays per collection);
//! 3. the cost of a migration's freeze by write-protection of a populated region (1% of
//!    its pages written since the last collect) and of its release: uffd-wp sync (the
//!    agent's UFFDIO_WRITEPROTECT of the pages written since the last collect), and the
//!    client library's hold (`fault::hold`, mprotect) used for uffd-wp async and the
//!    mprotect tracker, next to the same xxh3 pass.
//!
//! `cargo bench --bench track` (PAGEWIRE_BENCH_MB sets the size, default 1024). Prints a
//! table and one `BENCH_JSON {...}` line. Published figures for context: mprotect
//! ~1.9 µs and uffd-wp sync ~4.7 µs per fault.

use std::time::{Duration, Instant};

use pagewire::track::mprotect::MprotectTracker;
use pagewire::track::uffd_wp::{async_supported, sync_supported, UffdWpAsync, UffdWpSync};
use pagewire::track::DirtyTracker;

const ROUNDS: usize = 3;

struct Region {
    _file: std::fs::File,
    map: memmap2::MmapRaw,
    page: usize,
}

impl Region {
    /// A shared memfd mapping of `len` bytes with every page populated.
    fn new(len: usize) -> Region {
        let file = pagewire::fault::memfd("pagewire-bench", len as u64).expect("memfd");
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .expect("mmap");
        let page = pagewire::fault::uffd::page_size() as usize;
        let r = Region {
            _file: file,
            map,
            page,
        };
        r.touch_all(1);
        r
    }

    fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn pages(&self) -> usize {
        self.len() / self.page
    }

    /// Writes one byte to every page; returns the time taken.
    fn touch_all(&self, v: u8) -> Duration {
        let p = self.ptr();
        let t = Instant::now();
        for i in 0..self.pages() {
            // SAFETY: inside the mapping; volatile so the store happens.
            unsafe { std::ptr::write_volatile(p.add(i * self.page), v) };
        }
        t.elapsed()
    }

    /// Writes one byte to every `step`-th page.
    fn touch_some(&self, step: usize, v: u8) {
        let p = self.ptr();
        for i in (0..self.pages()).step_by(step) {
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(p.add(i * self.page), v) };
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ns_per_page(d: Duration, pages: usize) -> f64 {
    d.as_nanos() as f64 / pages as f64
}

/// ns per page of a write loop armed by `collect` before each round.
fn first_writes(r: &Region, t: &mut dyn DirtyTracker) -> f64 {
    let mut v = Vec::new();
    t.collect().expect("collect");
    for round in 0..ROUNDS {
        let d = r.touch_all(round as u8 + 2);
        let got = t.collect().expect("collect");
        let bytes: u64 = got.iter().map(|x| x.end - x.start).sum();
        assert!(
            bytes >= r.len() as u64,
            "{}: reported {bytes} of {} written bytes",
            t.name(),
            r.len()
        );
        v.push(ns_per_page(d, r.pages()));
    }
    median(v)
}

fn time_collect(t: &mut dyn DirtyTracker) -> (f64, u64) {
    let s = Instant::now();
    let got = t.collect().expect("collect");
    let bytes = got.iter().map(|x| x.end - x.start).sum();
    (s.elapsed().as_secs_f64() * 1e3, bytes)
}

fn main() {
    let mb: usize = std::env::var("PAGEWIRE_BENCH_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let len = mb << 20;
    println!("tracking overhead, {mb} MiB shared memfd mapping, median of {ROUNDS} rounds");
    let mut json = serde_json::Map::new();
    let mut row = |name: &str, key: &str, ns: f64, base: f64, note: &str| {
        println!(
            "  {name:<34} {ns:>9.0} ns/page  {:>7.1}x untracked  {note}",
            ns / base
        );
        json.insert(key.into(), serde_json::json!(ns));
    };

    // Baselines.
    let fresh = {
        let m = memmap2::MmapOptions::new()
            .len(len)
            .map_anon()
            .expect("anon");
        let p = m.as_ptr() as *mut u8;
        let page = pagewire::fault::uffd::page_size() as usize;
        let t = Instant::now();
        for i in 0..len / page {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::write_volatile(p.add(i * page), 1) };
        }
        ns_per_page(t.elapsed(), len / page)
    };
    let r = Region::new(len);
    let untracked = median(
        (0..ROUNDS)
            .map(|i| ns_per_page(r.touch_all(i as u8), r.pages()))
            .collect(),
    );
    println!("first write to a page (every page of the region, one byte each):");
    row(
        "untracked, populated (baseline)",
        "untracked_ns",
        untracked,
        untracked,
        "",
    );
    row(
        "untracked, fresh anon page",
        "first_touch_anon_ns",
        fresh,
        untracked,
        "(page allocation + zeroing, any new page pays it)",
    );

    if async_supported() {
        let mut t = UffdWpAsync::new(r.ptr(), r.len()).expect("uffd-wp async");
        let ns = first_writes(&r, &mut t);
        row(
            "uffd-wp async",
            "uffd_wp_async_ns",
            ns,
            untracked,
            "(kernel resolves it: no signal, no message)",
        );
    } else {
        println!("  uffd-wp async: not supported by this kernel");
    }
    if sync_supported() {
        let mut t = UffdWpSync::new(r.ptr(), r.len()).expect("uffd-wp sync");
        let ns = first_writes(&r, &mut t);
        row(
            "uffd-wp sync",
            "uffd_wp_sync_ns",
            ns,
            untracked,
            "(published: ~4.7 us per fault)",
        );
    } else {
        println!("  uffd-wp sync: not supported by this kernel");
    }
    {
        let mut t = MprotectTracker::new(r.ptr(), r.len(), Some(r.page)).expect("mprotect");
        // Page granule on a large region would pass vm.max_map_count when written
        // sparsely; written in order, neighbours merge, so it is measurable here.
        let ns = first_writes(&r, &mut t);
        row(
            "mprotect, page granule",
            "mprotect_page_ns",
            ns,
            untracked,
            "(published: ~1.9 us per fault)",
        );
    }
    {
        let mut t = MprotectTracker::new(r.ptr(), r.len(), None).expect("mprotect");
        let g = t.granule();
        let ns = first_writes(&r, &mut t);
        row(
            &format!("mprotect, default {} KiB granule", g >> 10),
            "mprotect_default_ns",
            ns,
            untracked,
            &format!("(one fault per {} pages)", g / r.page),
        );
    }

    println!("collect (find written pages and re-arm):");
    let hash_ms = {
        let s = Instant::now();
        // SAFETY: reading our own mapping; nobody writes it now.
        let bytes = unsafe { std::slice::from_raw_parts(r.ptr(), r.len()) };
        std::hint::black_box(xxhash_rust::xxh3::xxh3_64(bytes));
        s.elapsed().as_secs_f64() * 1e3
    };
    println!(
        "  {:<34} {hash_ms:>9.2} ms  (baseline: what hash-scan pays)",
        "xxh3 of the whole region"
    );
    json.insert("xxh3_ms".into(), serde_json::json!(hash_ms));
    let mut crow = |name: &str, key: &str, ms: f64, bytes: u64| {
        println!(
            "  {name:<34} {ms:>9.2} ms  {:>6.1}% of an xxh3 pass  reported {} MiB",
            ms * 100.0 / hash_ms,
            bytes >> 20
        );
        json.insert(key.into(), serde_json::json!(ms));
    };
    if async_supported() {
        let mut t = UffdWpAsync::new(r.ptr(), r.len()).expect("uffd-wp async");
        t.collect().expect("collect");
        let (ms, b) = time_collect(&mut t);
        crow("PAGEMAP_SCAN, nothing written", "scan_none_ms", ms, b);
        r.touch_some(100, 7);
        let (ms, b) = time_collect(&mut t);
        crow("PAGEMAP_SCAN, 1% of pages written", "scan_1pct_ms", ms, b);
        r.touch_all(8);
        let (ms, b) = time_collect(&mut t);
        crow("PAGEMAP_SCAN, every page written", "scan_all_ms", ms, b);
    }
    {
        let mut t = MprotectTracker::new(r.ptr(), r.len(), None).expect("mprotect");
        let (ms, b) = time_collect(&mut t);
        crow(
            "mprotect collect, nothing written",
            "mprotect_collect_none_ms",
            ms,
            b,
        );
        r.touch_some(100, 9);
        let (ms, b) = time_collect(&mut t);
        crow(
            "mprotect collect, 1% of pages",
            "mprotect_collect_1pct_ms",
            ms,
            b,
        );
    }
    println!(
        "freeze (hold every writer of the region; a migration's --freeze-writes), every page\n  populated, 1% written since the last collect:"
    );
    let mut frow = |name: &str, key: &str, (hold, release): (f64, f64)| {
        println!(
            "  {name:<34} {hold:>9.2} ms hold, {release:.2} ms release  {:>6.1}% of an xxh3 pass",
            hold * 100.0 / hash_ms
        );
        json.insert(key.into(), serde_json::json!(hold));
    };
    if sync_supported() {
        let mut t = UffdWpSync::new(r.ptr(), r.len()).expect("uffd-wp sync");
        let times = time_freezes(
            &r,
            &mut t,
            10,
            |t| t.freeze().expect("freeze"),
            |t, ()| t.thaw().expect("thaw"),
        );
        frow("uffd-wp sync (agent: UFFDIO_WP)", "freeze_sync_ms", times);
    }
    if async_supported() {
        let mut t = UffdWpAsync::new(r.ptr(), r.len()).expect("uffd-wp async");
        let times = time_freezes(
            &r,
            &mut t,
            20,
            |_| pagewire::fault::hold::Hold::new(r.ptr(), r.len()).expect("hold"),
            |_, h| h.release(true),
        );
        frow(
            "uffd-wp async (library: mprotect)",
            "freeze_async_ms",
            times,
        );
    }
    {
        let mut t = MprotectTracker::new(r.ptr(), r.len(), None).expect("mprotect");
        let times = time_freezes(
            &r,
            &mut t,
            30,
            |t| t.freeze().expect("freeze"),
            |t, ()| t.thaw().expect("thaw"),
        );
        frow("mprotect tracker (library)", "freeze_mprotect_ms", times);
    }
    println!("BENCH_JSON {}", serde_json::Value::Object(json));
}

/// Median times (ms) of `hold` and `release` over [`ROUNDS`] rounds, each after every
/// page was written, collected, and 1% of the pages written again (`seed` varies the
/// bytes).
fn time_freezes<T: DirtyTracker, H>(
    r: &Region,
    t: &mut T,
    seed: u8,
    hold: impl Fn(&mut T) -> H,
    release: impl Fn(&mut T, H),
) -> (f64, f64) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (mut holds, mut releases) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS as u8 {
        r.touch_all(seed + i);
        t.collect().expect("collect");
        r.touch_some(100, seed + 30 + i);
        let s = Instant::now();
        let h = hold(t);
        holds.push(ms(s.elapsed()));
        let s = Instant::now();
        release(t, h);
        releases.push(ms(s.elapsed()));
    }
    (median(holds), median(releases))
}
