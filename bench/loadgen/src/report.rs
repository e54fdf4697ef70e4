//! Latency histograms, per-connection tallies and the one-line JSON result.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// A latency histogram in nanoseconds, 1 ns to 100 s, 3 significant figures.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// The measured window: only messages sent at or after `start` and answered by `end` count.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub t0: Instant,
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn new(warmup: Duration, duration: Duration) -> Self {
        Self::after(Instant::now(), warmup, duration)
    }

    /// A window that opens `warmup` from now, with timestamps counted from an earlier `t0`.
    pub fn after(t0: Instant, warmup: Duration, duration: Duration) -> Self {
        let start = Instant::now() + warmup;
        Self { t0, start, end: start + duration }
    }

    /// Nanoseconds since `t0`, the timestamp carried in each message.
    pub fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.t0).as_nanos() as u64
    }

    pub fn instant(&self, stamp: u64) -> Instant {
        self.t0 + Duration::from_nanos(stamp)
    }

    pub fn counts(&self, sent: Instant, done: Instant) -> bool {
        sent >= self.start && done <= self.end
    }

    pub fn seconds(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

/// One latency histogram shared by every connection of a run (a histogram is hundreds of KiB,
/// too much to give each of thousands of connections its own). The runtime has one thread, so
/// the lock is never contended.
#[derive(Clone)]
pub struct Latencies(Arc<Mutex<Histogram<u64>>>);

impl Latencies {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(new_hist())))
    }

    /// Record `done - sent` if the message falls in the window; say whether it did.
    pub fn record_in(&self, w: &Window, sent: Instant, done: Instant) -> bool {
        if !w.counts(sent, done) {
            return false;
        }
        if let Ok(mut h) = self.0.lock() {
            h.saturating_record((done - sent).as_nanos().max(1) as u64);
        }
        true
    }

    pub fn snapshot(&self) -> Histogram<u64> {
        self.0.lock().map(|h| h.clone()).unwrap_or_else(|_| new_hist())
    }
}

/// What one connection (or worker) saw: its latencies go to the run's shared histogram.
pub struct Tally {
    pub lat: Latencies,
    pub messages: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Tally {
    pub fn new(lat: &Latencies) -> Self {
        Self { lat: lat.clone(), messages: 0, errors: 0, first_error: None }
    }

    pub fn record(&mut self, w: &Window, sent: Instant, done: Instant) {
        if self.lat.record_in(w, sent, done) {
            self.messages += 1;
        }
    }

    pub fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    /// Add another tally's counts (both record into the same histogram).
    pub fn merge(&mut self, other: Tally) {
        self.messages += other.messages;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// One flat JSON object, written as one line.
#[derive(Default)]
pub struct Json {
    body: String,
}

impl Json {
    fn key(&mut self, k: &str) {
        if !self.body.is_empty() {
            self.body.push(',');
        }
        let _ = write!(self.body, "\"{k}\":");
    }

    pub fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        self.body.push('"');
        for c in v.chars() {
            match c {
                '"' => self.body.push_str("\\\""),
                '\\' => self.body.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(self.body, "\\u{:04x}", c as u32);
                }
                c => self.body.push(c),
            }
        }
        self.body.push('"');
        self
    }

    pub fn int(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k);
        let _ = write!(self.body, "{v}");
        self
    }

    pub fn num(&mut self, k: &str, v: f64) -> &mut Self {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.body, "{}", (v * 1000.0).round() / 1000.0);
        } else {
            self.body.push_str("null");
        }
        self
    }

    pub fn opt_num(&mut self, k: &str, v: Option<f64>) -> &mut Self {
        match v {
            Some(v) => self.num(k, v),
            None => {
                self.key(k);
                self.body.push_str("null");
                self
            }
        }
    }

    /// Latency percentiles in microseconds.
    pub fn latency(&mut self, prefix: &str, h: &Histogram<u64>) -> &mut Self {
        let us = |q: f64| if h.is_empty() { f64::NAN } else { h.value_at_quantile(q) as f64 / 1000.0 };
        self.num(&format!("{prefix}p50_us"), us(0.5))
            .num(&format!("{prefix}p99_us"), us(0.99))
            .num(&format!("{prefix}p999_us"), us(0.999))
            .num(&format!("{prefix}max_us"), if h.is_empty() { f64::NAN } else { h.max() as f64 / 1000.0 })
    }

    /// Append the fields of another object.
    pub fn raw(&mut self, other: &Json) -> &mut Self {
        if !other.body.is_empty() {
            if !self.body.is_empty() {
                self.body.push(',');
            }
            self.body.push_str(&other.body);
        }
        self
    }

    pub fn line(&self) -> String {
        format!("{{{}}}", self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_one_flat_object() {
        let mut j = Json::default();
        j.str("a", "x\"y\n").int("b", 3).num("c", 1.23456).num("d", f64::NAN);
        assert_eq!(j.line(), r#"{"a":"x\"y\u000a","b":3,"c":1.235,"d":null}"#);
    }

    #[test]
    fn window_counts_only_inside() {
        let w = Window::new(Duration::from_millis(10), Duration::from_millis(10));
        assert!(!w.counts(w.t0, w.start));
        assert!(w.counts(w.start, w.end));
        assert!(!w.counts(w.start, w.end + Duration::from_nanos(1)));
        assert_eq!(w.instant(w.stamp(w.start)), w.start);
        let lat = Latencies::new();
        let mut t = Tally::new(&lat);
        t.record(&w, w.start, w.start + Duration::from_micros(5));
        t.record(&w, w.t0, w.start);
        let mut u = Tally::new(&lat);
        u.record(&w, w.start, w.start + Duration::from_micros(7));
        t.merge(u);
        assert_eq!(t.messages, 2);
        let h = lat.snapshot();
        assert_eq!(h.len(), 2);
        assert_eq!(h.value_at_quantile(0.25) / 1000, 5);
    }
}
