//! A coarse timer for timeouts that almost never fire (a client's header-read and keep-alive
//! timeout, hyper's HTTP/2 pings), one per proxy worker. Every request arms and disarms such a
//! timeout, and tokio's timer made that cost ~3% of a request's CPU (a boxed entry of ~100 bytes,
//! a clock read, a lock and a wheel insertion to arm, another lock to disarm). Here arming is a
//! slot in a slab, disarming frees it, and the clock is read once per [`TICK`] by the worker's
//! sweep, which wakes what has expired. A deadline is met to within a tick, either way.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often the sweep reads the clock and wakes expired timeouts: their resolution.
pub const TICK: Duration = Duration::from_millis(50);

/// A worker's timer; cheap to clone (all clones are the same timer).
#[derive(Clone)]
pub struct Wheel(Arc<Inner>);

struct Inner {
    base: Instant,
    /// Milliseconds since `base` at the last sweep: the timer's clock.
    now_ms: AtomicU64,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    entries: Vec<Entry>,
    free: Vec<usize>,
    /// No armed entry has an earlier deadline (a lower bound: disarming does not raise it).
    earliest: u64,
}

/// Free, armed (`waker` set) or fired (its sleep has not seen it yet: `waker` taken).
struct Entry {
    deadline: u64,
    waker: Option<Waker>,
}

impl Default for Wheel {
    fn default() -> Self {
        Wheel::new()
    }
}

impl Wheel {
    pub fn new() -> Wheel {
        Wheel(Arc::new(Inner {
            base: Instant::now(),
            now_ms: AtomicU64::new(0),
            slots: Mutex::new(Slots { earliest: u64::MAX, ..Default::default() }),
        }))
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // A panic while the lock was held left the slab consistent (no step of it can panic
        // half-way): carry on with it.
        self.0.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.0.now_ms.load(Ordering::Relaxed)
    }

    /// The timer's idea of now (as of the last sweep, at most a tick ago).
    pub fn now(&self) -> Instant {
        self.0.base + Duration::from_millis(self.now_ms())
    }

    /// `deadline` in the timer's milliseconds, rounded up (never early by rounding).
    fn ms_of(&self, deadline: Instant) -> u64 {
        let d = deadline.saturating_duration_since(self.0.base);
        let ms = d.as_millis().min(u128::from(u64::MAX - 1)) as u64;
        if d.subsec_nanos() % 1_000_000 != 0 {
            ms.saturating_add(1)
        } else {
            ms
        }
    }

    pub fn sleep_until(&self, deadline: Instant) -> CoarseSleep {
        CoarseSleep { wheel: self.clone(), deadline: self.ms_of(deadline), key: None }
    }

    pub fn sleep(&self, duration: Duration) -> CoarseSleep {
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        CoarseSleep { wheel: self.clone(), deadline: self.now_ms().saturating_add(ms), key: None }
    }

    /// Advances the clock and wakes every timeout that has expired; the worker calls it every
    /// [`TICK`] (see [`Wheel::run`]).
    pub fn sweep(&self) {
        let now = Instant::now().saturating_duration_since(self.0.base).as_millis() as u64;
        self.0.now_ms.store(now, Ordering::Relaxed);
        let mut due = Vec::new();
        {
            let mut slots = self.slots();
            if slots.earliest > now {
                return;
            }
            let mut earliest = u64::MAX;
            for e in slots.entries.iter_mut() {
                if e.waker.is_none() {
                    continue;
                }
                if e.deadline <= now {
                    due.extend(e.waker.take());
                } else {
                    earliest = earliest.min(e.deadline);
                }
            }
            slots.earliest = earliest;
        }
        // Outside the lock: a woken task may arm or disarm a timeout of this wheel.
        for w in due {
            w.wake();
        }
    }

    /// Sweeps every [`TICK`], for as long as the worker runs.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep();
        }
    }

    /// Armed and fired timeouts not yet disarmed (for tests).
    #[cfg(test)]
    fn in_use(&self) -> usize {
        let slots = self.slots();
        slots.entries.len() - slots.free.len()
    }
}

/// A timeout on a [`Wheel`]: ready once the wheel's clock has reached its deadline.
pub struct CoarseSleep {
    wheel: Wheel,
    /// Milliseconds since the wheel's base.
    deadline: u64,
    /// Its entry while armed.
    key: Option<usize>,
}

impl CoarseSleep {
    /// Moves the deadline, keeping the entry.
    pub fn reset(&mut self, deadline: Instant) {
        self.deadline = self.wheel.ms_of(deadline);
        if let Some(key) = self.key {
            let mut slots = self.wheel.slots();
            slots.entries[key].deadline = self.deadline;
            slots.earliest = slots.earliest.min(self.deadline);
        }
    }

    fn disarm(&mut self) {
        if let Some(key) = self.key.take() {
            let waker = {
                let mut slots = self.wheel.slots();
                slots.free.push(key);
                slots.entries[key].waker.take()
            };
            drop(waker);
        }
    }
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.wheel.now_ms() >= this.deadline {
            this.disarm();
            return Poll::Ready(());
        }
        let deadline = this.deadline;
        let old = {
            let mut slots = this.wheel.slots();
            slots.earliest = slots.earliest.min(deadline);
            match this.key {
                Some(key) => {
                    let e = &mut slots.entries[key];
                    e.deadline = deadline;
                    match &e.waker {
                        Some(w) if w.will_wake(cx.waker()) => None,
                        _ => e.waker.replace(cx.waker().clone()),
                    }
                }
                None => {
                    let entry = Entry { deadline, waker: Some(cx.waker().clone()) };
                    let key = match slots.free.pop() {
                        Some(key) => {
                            slots.entries[key] = entry;
                            key
                        }
                        None => {
                            slots.entries.push(entry);
                            slots.entries.len() - 1
                        }
                    };
                    this.key = Some(key);
                    None
                }
            }
        };
        drop(old);
        Poll::Pending
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        self.disarm();
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

/// `fut`'s output, or `None` if `sleep` ends first.
pub async fn timeout<F: Future>(sleep: CoarseSleep, fut: F) -> Option<F::Output> {
    let mut sleep = sleep;
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        Pin::new(&mut sleep).poll(cx).map(|()| None)
    })
    .await
}

impl hyper::rt::Timer for Wheel {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Wheel::sleep(self, duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Wheel::sleep_until(self, deadline))
    }

    fn now(&self) -> Instant {
        Wheel::now(self)
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<CoarseSleep>() {
            Some(s) => s.get_mut().reset(new_deadline),
            None => *sleep = Box::pin(Wheel::sleep_until(self, new_deadline)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    #[test]
    fn sleeps_end_within_a_tick_of_their_deadline() {
        rt().block_on(async {
            let wheel = Wheel::new();
            tokio::spawn(wheel.clone().run());
            for ms in [0u64, 30, 120, 300] {
                let start = Instant::now();
                wheel.sleep(Duration::from_millis(ms)).await;
                let took = start.elapsed();
                assert!(took + TICK >= Duration::from_millis(ms), "{ms} ms sleep ended after {took:?}");
                assert!(took <= Duration::from_millis(ms) + 4 * TICK, "{ms} ms sleep took {took:?}");
            }
            assert_eq!(wheel.in_use(), 0);
        });
    }

    #[test]
    fn dropped_and_reset_sleeps_free_their_entries() {
        rt().block_on(async {
            let wheel = Wheel::new();
            tokio::spawn(wheel.clone().run());
            // Armed (polled once) then dropped: the entry is reused by the next one.
            for _ in 0..1000 {
                let mut s = wheel.sleep(Duration::from_secs(30));
                assert!(futures_poll(&mut s).is_pending());
            }
            assert_eq!(wheel.in_use(), 0);
            assert!(wheel.slots().entries.len() <= 1);
            // Reset earlier: fires at the new deadline; later: does not fire at the old one.
            let mut s = wheel.sleep(Duration::from_secs(30));
            assert!(futures_poll(&mut s).is_pending());
            s.reset(Instant::now() + Duration::from_millis(100));
            let start = Instant::now();
            (&mut s).await;
            assert!(start.elapsed() < Duration::from_secs(5));
            let mut late = wheel.sleep(Duration::from_millis(50));
            late.reset(Instant::now() + Duration::from_millis(600));
            let r = tokio::time::timeout(Duration::from_millis(300), &mut late).await;
            assert!(r.is_err(), "a sleep moved to 600 ms ended before 300 ms");
            drop(late);
            drop(s);
            assert_eq!(wheel.in_use(), 0);
        });
    }

    #[test]
    fn hyper_resets_keep_the_same_sleep() {
        let wheel = Wheel::new();
        let mut sleep = hyper::rt::Timer::sleep(&wheel, Duration::from_secs(1));
        let before: *const dyn hyper::rt::Sleep = &*sleep;
        hyper::rt::Timer::reset(&wheel, &mut sleep, Instant::now() + Duration::from_secs(2));
        let after: *const dyn hyper::rt::Sleep = &*sleep;
        assert!(std::ptr::addr_eq(before, after), "reset allocated a new sleep");
    }

    fn futures_poll(s: &mut CoarseSleep) -> Poll<()> {
        let waker = Waker::noop();
        Pin::new(s).poll(&mut Context::from_waker(waker))
    }
}
