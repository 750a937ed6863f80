//! Ctrl-C (SIGINT) and SIGTERM during `lorahost train`: the first one lets the current optimizer
//! step finish, saves a checkpoint (and the adapters) and stops, so `--resume` continues where
//! the run was; a second one (a second later or more: a signal delivered to the process and to
//! its group at once counts once) quits at once. Checkpoints are written to a hidden directory and
//! renamed, so quitting mid-save never leaves a half-written checkpoint behind.
//!
//! Only the command line installs the handlers ([`install`]); the library's `train` just polls
//! [`requested`], so tests and embedders keep their own signal handling.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// When the first signal arrived (CLOCK_MONOTONIC, ms).
static FIRST_MS: AtomicI64 = AtomicI64::new(0);

/// A second signal this soon after the first is the same request delivered twice (GNU
/// `timeout`, `docker stop` and job schedulers signal both the process and its group), not a
/// second Ctrl-C: it is ignored.
const SAME_REQUEST_MS: i64 = 1000;

/// CLOCK_MONOTONIC in milliseconds (`clock_gettime` is async-signal-safe).
#[cfg(unix)]
fn monotonic_ms() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; async-signal-safe per POSIX.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // time_t and c_long are 32 bits on some targets.
    #[allow(clippy::unnecessary_cast)]
    let ms = ts.tv_sec as i64 * 1000 + ts.tv_nsec as i64 / 1_000_000;
    ms
}

/// Exit status for a run stopped by a signal (128 + SIGINT, as shells report Ctrl-C).
pub const EXIT_CODE: i32 = 130;

#[cfg(unix)]
extern "C" fn on_signal(_signal: libc::c_int) {
    let now = monotonic_ms();
    if !REQUESTED.swap(true, Ordering::SeqCst) {
        FIRST_MS.store(now, Ordering::SeqCst);
        return;
    }
    if now - FIRST_MS.load(Ordering::SeqCst) >= SAME_REQUEST_MS {
        // The second signal: quit now. `write` and `_exit` are async-signal-safe.
        const MSG: &[u8] = b"\nsecond interrupt: quitting now (the last complete checkpoint is intact)\n";
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(EXIT_CODE)
        };
    }
}

/// Restores the previous handlers when dropped.
pub struct Guard {
    #[cfg(unix)]
    previous: Vec<(libc::c_int, libc::sighandler_t)>,
}

/// Install the SIGINT/SIGTERM handlers for the lifetime of the returned guard.
pub fn install() -> Guard {
    REQUESTED.store(false, Ordering::SeqCst);
    #[cfg(unix)]
    {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        let previous = [libc::SIGINT, libc::SIGTERM]
            .into_iter()
            // SAFETY: the handler only touches an atomic and calls `_exit`, both
            // async-signal-safe.
            .map(|s| (s, unsafe { libc::signal(s, handler) }))
            .collect();
        Guard { previous }
    }
    #[cfg(not(unix))]
    Guard {}
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(unix)]
        for &(s, h) in &self.previous {
            // SAFETY: restoring the handler that was installed before.
            unsafe { libc::signal(s, h) };
        }
    }
}

/// Whether a stop was requested (a first Ctrl-C or SIGTERM since [`install`]).
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Ask for a stop as a first Ctrl-C would (tests: `LORAHOST_TEST_INTERRUPT_AT_VALIDATION_BATCH`).
pub(crate) fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// A run stopped by Ctrl-C / SIGTERM before its first step: nothing was trained or saved.
#[derive(Debug, thiserror::Error)]
#[error("interrupted {0}: nothing was trained (checkpoints from earlier runs are untouched)")]
pub struct StoppedBeforeFirstStep(pub &'static str);

/// The exit status for `e`: [`EXIT_CODE`] for a run stopped by a signal, else 1.
pub fn exit_code_of(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<StoppedBeforeFirstStep>().is_some() {
        EXIT_CODE as u8
    } else {
        1
    }
}
