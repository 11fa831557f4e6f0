//! The tiny real guest of `cargo xtask guest`, as the real-VM tests (qemu
//! and libvirt backends) see it: the lab's guest helpers, plus what only
//! these tests need (a runtime for the async backends, a spread of
//! timings).

pub(crate) use score_testbed::guests::{
    GUEST_DIR, Status, skip, skip_reason, status_of, wait_status_of, wait_until,
};

/// A runtime for calling the async backends from a plain test.
pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Median, minimum and maximum.
pub(crate) fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (median, s[0], s[n - 1])
}
