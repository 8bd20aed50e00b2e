//! The binary's metrics recorder: the Prometheus exporter, with the metrics
//! the proxy updates on every request kept apart from it.
//!
//! The exporter keeps one atomic value per counter and gauge, and a
//! histogram's samples in a shared lock-free list until they are drained
//! into its buckets. With a runtime per core, every request on every core
//! then writes the same few cache lines (the request counter, the in-flight
//! gauge twice, the head of the duration list), so the cores pass those
//! lines back and forth, and the samples wait in memory for the next drain
//! (at 80,000 requests a second, some 400,000 of them between two drains).
//!
//! [`HotRecorder`] sits in front of the exporter and hands out its own
//! handles for the names in [`HOT`]:
//! - counters and gauges are split into [`SHARDS`] cache-line-sized shards,
//!   one per thread (up to [`SHARDS`] threads; later threads share), and
//!   summed into the exporter's own handle when `/metrics` is rendered;
//! - histograms count each sample into its bucket (and its shard's sum) as
//!   it is recorded, and are rendered here, after the exporter's text, in
//!   the exporter's format, with the same bucket bounds
//!   ([`DURATION_BUCKETS`]).
//!
//! Every other metric goes to the exporter as before. Only the binary
//! installs this recorder: an application that runs [`crate::proxy::Proxy`]
//! with a recorder of its own gets every metric through the `metrics`
//! facade, as the crate documents.

use std::{
    cell::Cell,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
    formatting::{sanitize_label_key, sanitize_label_value, write_help_line, write_type_line},
};

use crate::metric_names;

/// The bucket bounds of every `…_duration_seconds` histogram, in seconds.
const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The metrics written on every request or connection, by name.
const HOT: [&str; 4] = [
    metric_names::REQUESTS_TOTAL.name,
    metric_names::REQUESTS_IN_FLIGHT.name,
    metric_names::CLIENT_CONNECTIONS.name,
    metric_names::REQUEST_DURATION_SECONDS.name,
];

/// Shards per hot metric.
const SHARDS: usize = 16;

/// A value on cache lines of its own (two 64-byte lines: the adjacent-line
/// prefetcher fetches lines in pairs).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// This thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            s.set(i);
        }
        i
    })
}

/// Adds `delta` to the `f64` stored as bits in `cell`.
fn add_f64(cell: &AtomicU64, delta: f64) {
    let mut current = cell.load(Ordering::Relaxed);
    loop {
        let next = (f64::from_bits(current) + delta).to_bits();
        match cell.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => current = actual,
        }
    }
}

struct ShardedCounter {
    shards: [Padded<AtomicU64>; SHARDS],
    /// The exporter's counter of the same key, set when rendering.
    exported: Counter,
}

impl ShardedCounter {
    fn total(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

impl CounterFn for ShardedCounter {
    fn increment(&self, value: u64) {
        self.shards[shard()].0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        let total = self.total();
        if value > total {
            self.increment(value - total);
        }
    }
}

struct ShardedGauge {
    /// `f64` bits.
    shards: [Padded<AtomicU64>; SHARDS],
    exported: Gauge,
}

impl ShardedGauge {
    fn total(&self) -> f64 {
        self.shards
            .iter()
            .map(|s| f64::from_bits(s.0.load(Ordering::Relaxed)))
            .sum()
    }
}

impl GaugeFn for ShardedGauge {
    fn increment(&self, value: f64) {
        add_f64(&self.shards[shard()].0, value);
    }

    fn decrement(&self, value: f64) {
        add_f64(&self.shards[shard()].0, -value);
    }

    /// Not atomic with increments on other threads; the hot gauges are
    /// only incremented and decremented.
    fn set(&self, value: f64) {
        let mine = shard();
        for (i, s) in self.shards.iter().enumerate() {
            let v = if i == mine { value } else { 0.0 };
            s.0.store(v.to_bits(), Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct HistogramShard {
    /// Samples at or below each bound, then above the last.
    counts: [AtomicU64; DURATION_BUCKETS.len() + 1],
    /// `f64` bits.
    sum: AtomicU64,
}

struct BucketedHistogram {
    shards: [Padded<HistogramShard>; SHARDS],
}

impl HistogramFn for BucketedHistogram {
    fn record(&self, value: f64) {
        self.record_many(value, 1);
    }

    fn record_many(&self, value: f64, count: usize) {
        // The first bound at or above the value (Prometheus's `le`).
        let bucket = DURATION_BUCKETS.partition_point(|bound| *bound < value);
        let shard = &self.shards[shard()].0;
        shard.counts[bucket].fetch_add(count as u64, Ordering::Relaxed);
        add_f64(&shard.sum, value * count as f64);
    }
}

impl BucketedHistogram {
    /// Per bucket (the last one above every bound), the count over all
    /// shards; and the sum.
    fn totals(&self) -> ([u64; DURATION_BUCKETS.len() + 1], f64) {
        let mut counts = [0u64; DURATION_BUCKETS.len() + 1];
        let mut sum = 0.0;
        for s in &self.shards {
            for (total, c) in counts.iter_mut().zip(&s.0.counts) {
                *total += c.load(Ordering::Relaxed);
            }
            sum += f64::from_bits(s.0.sum.load(Ordering::Relaxed));
        }
        (counts, sum)
    }
}

#[derive(Clone)]
enum Hot {
    Counter(Arc<ShardedCounter>),
    Gauge(Arc<ShardedGauge>),
    Histogram(Arc<BucketedHistogram>),
}

/// The hot metrics registered so far, in registration order.
#[derive(Default)]
struct HotRegistry {
    entries: Mutex<Vec<(Key, Hot)>>,
}

/// See the module's documentation.
pub(crate) struct HotRecorder {
    inner: PrometheusRecorder,
    hot: Arc<HotRegistry>,
}

impl HotRecorder {
    /// The exporter, its `…_duration_seconds` histograms bucketed by
    /// [`DURATION_BUCKETS`], behind the hot metrics.
    pub(crate) fn new() -> Result<Self, String> {
        let inner = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("duration_seconds".to_owned()),
                &DURATION_BUCKETS,
            )
            .map_err(|e| e.to_string())?
            .build_recorder();
        Ok(Self {
            inner,
            hot: Arc::default(),
        })
    }

    /// What renders `/metrics`.
    pub(crate) fn handle(&self) -> MetricsHandle {
        MetricsHandle {
            prometheus: self.inner.handle(),
            hot: Arc::clone(&self.hot),
        }
    }

    fn is_hot(key: &Key) -> bool {
        HOT.contains(&key.name())
    }

    /// The hot handle registered for `key`, made by `make` the first time.
    fn hot(&self, key: &Key, make: impl FnOnce() -> Hot) -> Hot {
        let mut entries = self.hot.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, hot)) = entries.iter().find(|(k, _)| k == key) {
            return hot.clone();
        }
        let made = make();
        entries.push((key.clone(), made.clone()));
        made
    }
}

impl Recorder for HotRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if !Self::is_hot(key) {
            return self.inner.register_counter(key, metadata);
        }
        match self.hot(key, || {
            Hot::Counter(Arc::new(ShardedCounter {
                shards: Default::default(),
                exported: self.inner.register_counter(key, metadata),
            }))
        }) {
            Hot::Counter(c) => Counter::from_arc(c),
            // One name, one kind: `metric_names` fixes it.
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if !Self::is_hot(key) {
            return self.inner.register_gauge(key, metadata);
        }
        match self.hot(key, || {
            Hot::Gauge(Arc::new(ShardedGauge {
                shards: Default::default(),
                exported: self.inner.register_gauge(key, metadata),
            }))
        }) {
            Hot::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if !Self::is_hot(key) {
            return self.inner.register_histogram(key, metadata);
        }
        match self.hot(key, || {
            Hot::Histogram(Arc::new(BucketedHistogram {
                shards: Default::default(),
            }))
        }) {
            Hot::Histogram(h) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

/// Renders the exporter's metrics and the hot ones.
#[derive(Clone)]
pub(crate) struct MetricsHandle {
    prometheus: PrometheusHandle,
    hot: Arc<HotRegistry>,
}

impl std::fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsHandle").finish_non_exhaustive()
    }
}

impl MetricsHandle {
    /// Drains the exporter's histogram samples into their buckets.
    pub(crate) fn run_upkeep(&self) {
        self.prometheus.run_upkeep();
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        // A copy of the handles, so that no registration waits on a render.
        let entries = self
            .hot
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut histograms: Vec<(&Key, &BucketedHistogram)> = Vec::new();
        for (key, hot) in &entries {
            match hot {
                Hot::Counter(c) => c.exported.absolute(c.total()),
                Hot::Gauge(g) => g.exported.set(g.total()),
                Hot::Histogram(h) => histograms.push((key, h)),
            }
        }
        let mut text = self.prometheus.render();
        // One family after the other, each one's label sets together.
        histograms.sort_by(|a, b| a.0.name().cmp(b.0.name()));
        let mut family = "";
        for (key, histogram) in histograms {
            if key.name() != family {
                if !family.is_empty() {
                    text.push('\n');
                }
                family = key.name();
                let help = metric_names::ALL
                    .iter()
                    .find(|m| m.name == family)
                    .map_or("", |m| m.help);
                write_help_line(&mut text, family, None, None, help);
                write_type_line(&mut text, family, None, None, "histogram");
            }
            render_histogram(&mut text, key, histogram);
        }
        if !family.is_empty() {
            text.push('\n');
        }
        text
    }
}

fn render_histogram(text: &mut String, key: &Key, histogram: &BucketedHistogram) {
    let mut labels = String::new();
    for label in key.labels() {
        let _ = write!(
            labels,
            "{}=\"{}\",",
            sanitize_label_key(label.key()),
            sanitize_label_value(label.value())
        );
    }
    let name = key.name();
    let (counts, sum) = histogram.totals();
    let mut cumulative = 0u64;
    for (bound, count) in DURATION_BUCKETS.iter().zip(counts) {
        cumulative += count;
        let _ = writeln!(text, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
    }
    cumulative += counts[DURATION_BUCKETS.len()];
    let _ = writeln!(text, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
    let labels = labels.trim_end_matches(',');
    let braces = |l: &str| {
        if l.is_empty() {
            String::new()
        } else {
            format!("{{{l}}}")
        }
    };
    let _ = writeln!(text, "{name}_sum{} {sum}", braces(labels));
    let _ = writeln!(text, "{name}_count{} {cumulative}", braces(labels));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> HotRecorder {
        HotRecorder::new().unwrap()
    }

    /// `text` as Prometheus parses it; fails the test if it does not parse.
    fn parse(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn a_counter_sums_what_every_thread_added() {
        let recorder = recorder();
        let counter = metrics::with_local_recorder(
            &recorder,
            || metrics::counter!(metric_names::REQUESTS_TOTAL.name, "route" => "r", "status_class" => "2xx"),
        );
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        counter.increment(1);
                    }
                });
            }
        });
        let text = recorder.handle().render();
        assert!(
            text.contains(&format!(
                "{}{{route=\"r\",status_class=\"2xx\"}} 4000\n",
                metric_names::REQUESTS_TOTAL.name
            )),
            "{text}"
        );
        // The same key registered again is the same counter.
        let again = metrics::with_local_recorder(
            &recorder,
            || metrics::counter!(metric_names::REQUESTS_TOTAL.name, "route" => "r", "status_class" => "2xx"),
        );
        again.increment(5);
        let text = recorder.handle().render();
        assert!(text.contains("status_class=\"2xx\"} 4005\n"), "{text}");
    }

    #[test]
    fn a_gauge_raised_on_one_thread_and_lowered_on_another_sums_right() {
        let recorder = recorder();
        let gauge = metrics::with_local_recorder(&recorder, || {
            metrics::gauge!(metric_names::REQUESTS_IN_FLIGHT.name)
        });
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..3 {
                    gauge.increment(1.0);
                }
            });
        });
        std::thread::scope(|s| {
            s.spawn(|| {
                gauge.decrement(1.0);
                gauge.decrement(1.0);
            });
        });
        let text = recorder.handle().render();
        assert!(
            text.contains(&format!("\n{} 1\n", metric_names::REQUESTS_IN_FLIGHT.name)),
            "{text}"
        );
    }

    #[test]
    fn a_histogram_counts_each_sample_into_its_bucket() {
        let recorder = recorder();
        let (a, b) = metrics::with_local_recorder(&recorder, || {
            (
                metrics::histogram!(metric_names::REQUEST_DURATION_SECONDS.name, "route" => "a"),
                metrics::histogram!(metric_names::REQUEST_DURATION_SECONDS.name, "route" => "b\"q"),
            )
        });
        std::thread::scope(|s| {
            // At a bound counts in that bound's bucket (`le`); above the
            // last only in `+Inf`.
            s.spawn(|| a.record(0.0005));
            s.spawn(|| a.record(0.0006));
            s.spawn(|| a.record(31.0));
        });
        b.record(2.0);
        let text = recorder.handle().render();
        let scrape = parse(&text);
        assert_eq!(
            scrape
                .docs
                .get(metric_names::REQUEST_DURATION_SECONDS.name)
                .map(String::as_str),
            Some(metric_names::REQUEST_DURATION_SECONDS.help)
        );
        let family = |route: &str| {
            let mut found = scrape.samples.iter().filter(|s| {
                s.metric == metric_names::REQUEST_DURATION_SECONDS.name
                    && s.labels.get("route") == Some(route)
            });
            let histogram = found.next().unwrap_or_else(|| panic!("{route}: {text}"));
            match &histogram.value {
                prometheus_parse::Value::Histogram(buckets) => buckets
                    .iter()
                    .map(|b| (b.less_than, b.count))
                    .collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            }
        };
        let a_buckets = family("a");
        let at = |buckets: &[(f64, f64)], le: f64| {
            buckets
                .iter()
                .find(|(bound, _)| *bound == le)
                .map(|(_, count)| *count)
                .unwrap_or_else(|| panic!("no bucket {le}: {buckets:?}"))
        };
        assert_eq!(at(&a_buckets, 0.0005), 1.0);
        assert_eq!(at(&a_buckets, 0.001), 2.0);
        assert_eq!(at(&a_buckets, 30.0), 2.0);
        assert_eq!(at(&a_buckets, f64::INFINITY), 3.0);
        assert_eq!(a_buckets.len(), DURATION_BUCKETS.len() + 1);
        let sum: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "{}_sum{{route=\"a\"}} ",
                    metric_names::REQUEST_DURATION_SECONDS.name
                ))
            })
            .unwrap_or_else(|| panic!("{text}"))
            .parse()
            .unwrap();
        assert!((sum - 31.0011).abs() < 1e-9, "{sum}");
        assert!(
            text.contains(&format!(
                "{}_count{{route=\"a\"}} 3\n",
                metric_names::REQUEST_DURATION_SECONDS.name
            )),
            "{text}"
        );
        let b_buckets = family("b\\\"q");
        assert_eq!(at(&b_buckets, 1.0), 0.0);
        assert_eq!(at(&b_buckets, 2.5), 1.0);
        // One HELP and TYPE for the family, its label sets together.
        assert_eq!(
            text.matches(&format!(
                "# TYPE {} ",
                metric_names::REQUEST_DURATION_SECONDS.name
            ))
            .count(),
            1
        );
    }

    #[test]
    fn other_metrics_go_to_the_exporter() {
        let recorder = recorder();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!(metric_names::TOKEN_FETCH_DURATION_SECONDS.name, "source" => "s")
                .record(0.2);
            metrics::counter!(metric_names::CLIENT_ERRORS_TOTAL.name, "kind" => "no_route")
                .increment(2);
        });
        assert!(recorder.hot.entries.lock().unwrap().is_empty());
        let text = recorder.handle().render();
        parse(&text);
        assert!(
            text.contains(&format!(
                "{}_bucket{{source=\"s\",le=\"0.25\"}} 1\n",
                metric_names::TOKEN_FETCH_DURATION_SECONDS.name
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{}{{kind=\"no_route\"}} 2\n",
                metric_names::CLIENT_ERRORS_TOTAL.name
            )),
            "{text}"
        );
    }
}
