//! Whether the coordinator can serve: not while it is starting (resuming the runs it found
//! in its store), draining (shutting down), or unable to write its store. `/healthz` and
//! `grpc.health.v1` answer from this; `lib.rs` probes the store and publishes the changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Debug)]
pub struct Readiness(Arc<Flags>);

#[derive(Debug)]
struct Flags {
    starting: AtomicBool,
    draining: AtomicBool,
    store_ok: AtomicBool,
}

/// Why the coordinator is not ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReady {
    Starting,
    Draining,
    StoreUnwritable,
}

impl NotReady {
    pub fn as_str(self) -> &'static str {
        match self {
            NotReady::Starting => "starting: resuming the runs in its store",
            NotReady::Draining => "draining: shutting down",
            NotReady::StoreUnwritable => "its store cannot be written",
        }
    }
}

impl Readiness {
    /// A coordinator that is starting.
    pub fn starting() -> Self {
        Self(Arc::new(Flags {
            starting: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            store_ok: AtomicBool::new(true),
        }))
    }

    /// Ready, as far as this is concerned: for tests and tools that build a coordinator's
    /// parts by hand.
    pub fn ready() -> Self {
        let r = Self::starting();
        r.started();
        r
    }

    pub fn started(&self) {
        self.0.starting.store(false, Ordering::Release);
    }

    pub fn draining(&self) {
        self.0.draining.store(true, Ordering::Release);
    }

    pub fn store_writable(&self, ok: bool) {
        self.0.store_ok.store(ok, Ordering::Release);
    }

    /// Ready, or the first reason it is not (draining before starting before the store).
    pub fn check(&self) -> Result<(), NotReady> {
        if self.0.draining.load(Ordering::Acquire) {
            Err(NotReady::Draining)
        } else if self.0.starting.load(Ordering::Acquire) {
            Err(NotReady::Starting)
        } else if !self.0.store_ok.load(Ordering::Acquire) {
            Err(NotReady::StoreUnwritable)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_started_with_a_writable_store_and_not_draining() {
        let r = Readiness::starting();
        assert_eq!(r.check(), Err(NotReady::Starting));
        r.started();
        assert_eq!(r.check(), Ok(()));
        r.store_writable(false);
        assert_eq!(r.check(), Err(NotReady::StoreUnwritable));
        r.store_writable(true);
        assert_eq!(r.check(), Ok(()));
        r.draining();
        r.store_writable(false);
        assert_eq!(r.check(), Err(NotReady::Draining), "draining says the most");
    }
}
