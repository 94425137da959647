//! What a benchmark run produces: raw samples per variant and metric, their medians and
//! ranges, ratios against the ceiling and the baseline, and the JSON and markdown forms.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use super::leases::LeaseRun;
use super::variant::{Variant, BASELINE, CEILING};

/// One measured quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// Key in the JSON.
    pub key: &'static str,
    /// Column title.
    pub title: &'static str,
    /// Unit shown with it.
    pub unit: &'static str,
    /// Decimals shown.
    pub decimals: usize,
}

/// Every metric, in table order. Every available variant has samples of each after a run.
pub const METRICS: [Metric; 8] = [
    Metric {
        key: "tcp_gbps",
        title: "TCP 1 stream",
        unit: "Gbit/s",
        decimals: 2,
    },
    Metric {
        key: "rr_avg_us",
        title: "TCP ping-pong 64 B, avg",
        unit: "µs",
        decimals: 1,
    },
    Metric {
        key: "rr_p99_us",
        title: "ping-pong p99",
        unit: "µs",
        decimals: 1,
    },
    Metric {
        key: "udp_rx_kpps",
        title: "UDP 64 B received",
        unit: "kpps",
        decimals: 0,
    },
    Metric {
        key: "udp_tx_kpps",
        title: "UDP 64 B sent",
        unit: "kpps",
        decimals: 0,
    },
    Metric {
        key: "tcp_sender_cpu",
        title: "TCP sender CPU",
        unit: "%",
        decimals: 0,
    },
    Metric {
        key: "tcp_receiver_cpu",
        title: "TCP receiver CPU",
        unit: "%",
        decimals: 0,
    },
    Metric {
        key: "tcp_machine_cpu",
        title: "TCP machine CPU",
        unit: "% of a core",
        decimals: 0,
    },
];

/// Metrics whose ratios the markdown shows (the rest are in the JSON).
const RATIO_METRICS: [&str; 3] = ["tcp_gbps", "rr_avg_us", "udp_rx_kpps"];

/// Median, minimum and maximum of a sample set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// The median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub n: usize,
}

impl Stats {
    /// The stats of `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: s[0],
            max: s[n - 1],
            n,
        })
    }

    fn show(&self, decimals: usize) -> String {
        if self.n == 1 {
            return format!("{:.decimals$}", self.median);
        }
        format!("{:.d$} ({:.d$}–{:.d$})", self.median, self.min, self.max, d = decimals)
    }
}

/// Whether and as what a variant ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Measured; the label names the datapath seen on the node.
    Measured {
        /// E.g. `eBPF VXLAN (encap + decap)` or `kernel VXLAN (Datapath "ebpf" not in effect)`.
        label: String,
        /// BPF programs attached or link-pinned (see `variant::Observed`).
        attachments: Vec<String>,
    },
    /// Not measured, and why.
    NotAvailable(String),
}

/// A variant's results.
#[derive(Debug, Clone)]
pub struct VariantResult {
    /// What was asked for.
    pub variant: Variant,
    /// Whether it ran.
    pub availability: Availability,
    /// Samples by metric key, in round order.
    pub samples: BTreeMap<&'static str, Vec<f64>>,
    /// Measurements that failed (the run goes on without their samples).
    pub errors: Vec<String>,
    /// The eBPF datapath's counters at the end, summed over both nodes (empty without it):
    /// how much traffic the programs handled and why they passed the rest to the kernel.
    pub counters: BTreeMap<String, u64>,
}

impl VariantResult {
    /// A variant with no samples yet.
    pub fn new(variant: Variant, availability: Availability) -> Self {
        Self {
            variant,
            availability,
            samples: BTreeMap::new(),
            errors: Vec::new(),
            counters: BTreeMap::new(),
        }
    }

    /// Adds one sample of `metric`.
    pub fn push(&mut self, metric: &'static str, value: f64) {
        self.samples.entry(metric).or_default().push(value);
    }

    /// The stats of `metric`.
    pub fn stats(&self, metric: &str) -> Option<Stats> {
        self.samples.get(metric).and_then(|s| Stats::of(s))
    }

    /// Whether it was measured.
    pub fn measured(&self) -> bool {
        matches!(self.availability, Availability::Measured { .. })
    }
}

/// Where and how the run was made.
#[derive(Debug, Clone)]
pub struct Machine {
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub date: String,
    /// `uname -r`.
    pub kernel: String,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: usize,
    /// `/proc/loadavg` when the run started: anything else busy on the machine is noise.
    pub loadavg_start: String,
}

/// The first three fields of `/proc/loadavg`.
pub fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

impl Machine {
    /// Reads this machine's description.
    pub fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Self {
            date,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            loadavg_start: loadavg(),
        }
    }
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// Rounds asked for.
    pub rounds: u32,
    /// Seconds per measurement.
    pub seconds: u32,
    /// Whether this was `--smoke`.
    pub smoke: bool,
    /// The flanneld binary used.
    pub flanneld: String,
    /// Per variant, in table order.
    pub variants: Vec<VariantResult>,
    /// Lease programming runs.
    pub leases: Vec<LeaseRun>,
    /// Wall-clock seconds of the whole run.
    pub elapsed_s: f64,
    /// `/proc/loadavg` at the end.
    pub loadavg_end: String,
}

fn ratio(a: Option<Stats>, b: Option<Stats>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.median != 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

fn show_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "–".to_owned(), |r| format!("{r:.2}×"))
}

fn show_secs(s: Option<f64>) -> String {
    s.map_or_else(|| "–".to_owned(), |s| format!("{s:.2} s"))
}

impl Report {
    fn find(&self, key: &str) -> Option<&VariantResult> {
        self.variants.iter().find(|v| v.variant.key == key && v.measured())
    }

    /// The report as JSON (`target/bench/datapath.json`).
    pub fn to_json(&self) -> Value {
        let ceiling = self.find(CEILING);
        let baseline = self.find(BASELINE);
        let variants: Vec<Value> = self
            .variants
            .iter()
            .map(|v| {
                let (available, label, attachments, reason) = match &v.availability {
                    Availability::Measured { label, attachments } => (true, Some(label), attachments.clone(), None),
                    Availability::NotAvailable(why) => (false, None, Vec::new(), Some(why)),
                };
                let metrics: serde_json::Map<String, Value> = METRICS
                    .iter()
                    .filter_map(|m| {
                        let s = v.stats(m.key)?;
                        let vs = |other: Option<&VariantResult>| ratio(Some(s), other.and_then(|o| o.stats(m.key)));
                        Some((
                            m.key.to_owned(),
                            json!({
                                "unit": m.unit,
                                "median": s.median,
                                "min": s.min,
                                "max": s.max,
                                "samples": v.samples.get(m.key),
                                "ratio_vs_host_gw": vs(ceiling),
                                "ratio_vs_kernel_vxlan": vs(baseline),
                            }),
                        ))
                    })
                    .collect();
                json!({
                    "key": v.variant.key,
                    "title": v.variant.title,
                    "backend": serde_json::from_str::<Value>(v.variant.backend).unwrap_or(Value::Null),
                    "available": available,
                    "datapath_seen": label,
                    "bpf_attachments": attachments,
                    "not_available_because": reason,
                    "metrics": metrics,
                    "ebpf_counters_at_end": v.counters,
                    "errors": v.errors,
                })
            })
            .collect();
        json!({
            "date": self.machine.date,
            "kernel": self.machine.kernel,
            "cpu_model": self.machine.cpu_model,
            "cpus": self.machine.cpus,
            "loadavg_start": self.machine.loadavg_start,
            "loadavg_end": self.loadavg_end,
            "rounds": self.rounds,
            "seconds": self.seconds,
            "smoke": self.smoke,
            "flanneld": self.flanneld,
            "elapsed_s": self.elapsed_s,
            "method": {
                "topology": "2 nodes (netns) on a veth+bridge underlay, MTU 1500; one pod per node (bridge CNI); client pod on node 1, servers in the pod on node 2",
                "tcp": "iperf3 -c <pod> -t <seconds> -J (1 stream); receiver goodput; cpu_utilization_percent host_total/remote_total; machine CPU from /proc/stat deltas",
                "latency": "sockperf ping-pong --tcp -m 64 -t <seconds>; one-way avg and p99 (µs)",
                "udp": "iperf3 -u -l 64 -b 0 -t <seconds> -J; received datagrams/s at the server",
                "order": "rounds interleave variants (rotated start), one variant's traffic at a time",
            },
            "variants": variants,
            "lease_programming": self.leases.iter().map(LeaseRun::to_json).collect::<Vec<_>>(),
        })
    }

    /// The report as markdown (`target/bench/datapath.md`).
    pub fn to_markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(out, "### Datapath benchmark, {}\n", m.date);
        let _ = writeln!(
            out,
            "Machine: {}, {} CPUs, kernel {}. {} round(s) × {} s per metric, variants interleaved; \
             median (min–max) over rounds. Load average {} at the start, {} at the end.{}\n",
            m.cpu_model,
            m.cpus,
            m.kernel,
            self.rounds,
            self.seconds,
            m.loadavg_start,
            self.loadavg_end,
            if self.smoke {
                " **Smoke run: not a measurement.**"
            } else {
                ""
            }
        );
        let shown = ["tcp_gbps", "rr_avg_us", "rr_p99_us", "udp_rx_kpps"];
        let col = |key: &str| METRICS.iter().find(|x| x.key == key).copied();
        let _ = write!(out, "| variant | datapath seen |");
        for key in shown {
            if let Some(x) = col(key) {
                let _ = write!(out, " {} ({}) |", x.title, x.unit);
            }
        }
        let _ = writeln!(out, " CPU sender / receiver / machine (%) |");
        let _ = writeln!(out, "|---|---|{}---|", "---|".repeat(shown.len()));
        for v in &self.variants {
            match &v.availability {
                Availability::NotAvailable(why) => {
                    let _ = writeln!(
                        out,
                        "| {} | not available: {why} |{} – |",
                        v.variant.title,
                        " – |".repeat(shown.len())
                    );
                }
                Availability::Measured { label, .. } => {
                    let _ = write!(out, "| {} | {label} |", v.variant.title);
                    for key in shown {
                        let decimals = col(key).map_or(1, |x| x.decimals);
                        let cell = v.stats(key).map_or_else(|| "–".to_owned(), |s| s.show(decimals));
                        let _ = write!(out, " {cell} |");
                    }
                    let cpu: Vec<String> = ["tcp_sender_cpu", "tcp_receiver_cpu", "tcp_machine_cpu"]
                        .iter()
                        .map(|k| {
                            v.stats(k)
                                .map_or_else(|| "–".to_owned(), |s| format!("{:.0}", s.median))
                        })
                        .collect();
                    let _ = writeln!(out, " {} |", cpu.join(" / "));
                }
            }
        }

        let (ceiling, baseline) = (self.find(CEILING), self.find(BASELINE));
        let _ = writeln!(
            out,
            "\nRatios of medians (latency: lower is better, so < 1× is a win):\n\n\
             | variant | TCP vs host-gw | TCP vs kernel | latency vs host-gw | latency vs kernel | UDP vs host-gw | UDP vs kernel |\n\
             |---|---|---|---|---|---|---|"
        );
        for v in self.variants.iter().filter(|v| v.measured()) {
            let _ = write!(out, "| {} |", v.variant.key);
            for key in RATIO_METRICS {
                for base in [ceiling, baseline] {
                    let r = ratio(v.stats(key), base.and_then(|b| b.stats(key)));
                    let _ = write!(out, " {} |", show_ratio(r));
                }
            }
            let _ = writeln!(out);
        }

        if !self.leases.is_empty() {
            let (n, agent) = (self.leases[0].leases, &self.leases[0].flanneld);
            let _ = writeln!(
                out,
                "\nProgramming {n} remote leases with {agent} (pre-written to etcd; clock from agent start; polled every 0.1 s; \
                 the agent's reconcile runs from the complete peer set to everything programmed; steady: \
                 periodic reconciles afterwards, with the agent's CPU per reconcile and how many wrote anything):\n\n\
                 | Datapath asked | agent ready | all {n} routes (netlink) | all {n} FLANNEL_VTEPS entries | \
                 agent's programming reconcile | steady reconcile | steady CPU / reconcile | steady reconciles writing | outcome |\n\
                 |---|---|---|---|---|---|---|---|---|"
            );
            for l in &self.leases {
                let map = match (l.map_s, l.map_seen) {
                    (Some(s), _) => format!("{s:.2} s"),
                    (None, Some(seen)) => format!("– ({seen} seen)"),
                    (None, None) => "– (no map)".to_owned(),
                };
                let ms = |s: Option<f64>| s.map_or_else(|| "–".to_owned(), |s| format!("{:.1} ms", s * 1e3));
                let writing = l
                    .steady
                    .map_or_else(|| "–".to_owned(), |s| format!("{} of {}", s.writing, s.reconciles));
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {map} | {} | {} | {} | {writing} | {} |",
                    l.datapath,
                    show_secs(l.ready_s),
                    show_secs(l.routes_s),
                    show_secs(l.program_reconcile_s),
                    ms(l.steady.map(|s| s.last_s)),
                    ms(l.steady.map(|s| s.cpu_per_reconcile_s)),
                    l.outcome.replace('|', "/").replace('\n', " ")
                );
            }
            for l in self.leases.iter().filter(|l| l.phases.is_some()) {
                let _ = writeln!(
                    out,
                    "\n{}: the programming reconcile by phase, ms: {}",
                    l.datapath,
                    l.phases.as_deref().unwrap_or_default()
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_medians_with_ranges() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stats::of(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(s.show(1), "2.0 (1.0–3.0)");
    }
}
