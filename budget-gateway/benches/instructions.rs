//! Instructions per request, counted by callgrind: the gateway with the
//! budget layer, with nothing in its place (`--limiter none`) and with
//! `tower_governor` (`--limiter governor`), each serving the same chat
//! completion from this process over one keep-alive connection.
//!
//! ```text
//! budget-gateway/benches/instructions.sh                      # builds, runs, prints the tables
//! budget-gateway/benches/instructions.sh --runs 5 --requests 1000 --top 40
//! ```
//!
//! Run it through the script, which builds the binary with line tables
//! (for the functions' names) and checks that valgrind is there. Each
//! gateway runs under `valgrind --tool=callgrind --separate-threads=yes`;
//! after a warm-up the counters are zeroed (`callgrind_control --zero`), then
//! each batch of requests ends with a dump (`callgrind_control --dump`), so
//! start-up, warm-up and shutdown cancel out. quanta's upkeep thread
//! (the core's coarse clock, refreshed every millisecond whatever the
//! load) is time-driven, not request-driven, and slower under valgrind:
//! its thread is left out, and its count printed apart.
//!
//! Counts are steady within a process (its batches agree within a few
//! hundred instructions) but move by up to 1% between processes of the same
//! binary, so each variant runs in several processes (`--runs`, 3), in
//! rotated order. The tables: instructions per request of each variant
//! (the median over its processes of each one's median batch, and the
//! spread of the processes), then the difference the layer makes, by
//! crate (self cost: these rows add up to the difference) and by function
//! (inclusive cost: each row holds its callees), averaged over the
//! processes.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{
    chat_completion, connect, free_addr, gateway_args, start_listening, start_mock, variant_name,
    write_config, write_limits_config, LOAD_KEY, VARIANTS,
};

struct Options {
    requests: u64,
    batches: usize,
    runs: usize,
    warmup: u64,
    top: usize,
    variants: Vec<String>,
    /// The two variants whose difference the by-crate and by-function
    /// tables break down: what the second adds to the first (by default
    /// the budget layer to the plain proxy).
    compare: (String, String),
    keep: Option<PathBuf>,
}

fn options() -> Options {
    let mut o = Options {
        requests: 500,
        batches: 3,
        runs: 3,
        warmup: 200,
        top: 30,
        variants: VARIANTS.map(str::to_owned).to_vec(),
        compare: ("none".to_owned(), "budget".to_owned()),
        keep: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--requests" => o.requests = value().parse().expect("--requests N"),
            "--batches" => o.batches = value().parse().expect("--batches N"),
            "--runs" => o.runs = value().parse().expect("--runs N"),
            "--warmup" => o.warmup = value().parse().expect("--warmup N"),
            "--top" => o.top = value().parse().expect("--top N"),
            "--variants" => o.variants = value().split(',').map(str::to_owned).collect(),
            // `--compare budget,limits`: what the limits add to one window.
            "--compare" => {
                let pair = value();
                let (base, other) = pair.split_once(',').expect("--compare BASE,OTHER");
                o.compare = (base.to_owned(), other.to_owned());
            }
            // Keeps the callgrind files there, for callgrind_annotate or
            // kcachegrind.
            "--keep" => o.keep = Some(value().into()),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        o.requests > 0 && o.batches > 0 && o.runs > 0,
        "nothing to count"
    );
    assert!(
        o.variants
            .iter()
            .all(|v| VARIANTS.contains(&v.as_str()) || v == "limits" || v == "limits30d"),
        "--variants takes some of none,budget,governor,limits,limits30d"
    );
    assert!(
        o.variants.contains(&o.compare.0) && o.variants.contains(&o.compare.1)
            || o.compare == ("none".to_owned(), "budget".to_owned()),
        "--compare takes two of the variants counted"
    );
    o
}

/// Runs a callgrind tool, which must succeed.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is valgrind installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One thread's dump: its total, and each function's self cost and calls.
struct ThreadDump {
    total: u64,
    upkeep: bool,
    costs: Costs,
}

/// Functions' self costs, and the inclusive costs of the calls between
/// them (caller, callee), by name.
#[derive(Default)]
struct Costs {
    exclusive: HashMap<String, f64>,
    calls: HashMap<(String, String), f64>,
}

impl Costs {
    fn add(&mut self, other: Costs, scale: f64) {
        for (function, cost) in other.exclusive {
            *self.exclusive.entry(function).or_default() += cost * scale;
        }
        for (arc, cost) in other.calls {
            *self.calls.entry(arc).or_default() += cost * scale;
        }
    }

    /// Each function's inclusive cost: its own, and its calls' to other
    /// functions (a call to itself is in its cost already).
    fn inclusive(&self) -> HashMap<&str, f64> {
        let mut inclusive: HashMap<&str, f64> = self
            .exclusive
            .iter()
            .map(|(f, cost)| (f.as_str(), *cost))
            .collect();
        for ((caller, callee), cost) in &self.calls {
            if caller != callee {
                *inclusive.entry(caller.as_str()).or_default() += cost;
            }
        }
        inclusive
    }
}

/// Reads a callgrind output file (format version 1, one event: `Ir`):
/// `fn=` starts a function's costs, `cfn=` and `calls=` announce a call,
/// whose inclusive cost is on the next line; other cost lines are the
/// function's own. Names are compressed: `(id) name` the first time,
/// `(id)` after.
fn read_thread(file: &Path) -> ThreadDump {
    let text = std::fs::read_to_string(file).unwrap();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut name = |spec: &str| -> String {
        let spec = spec.trim();
        match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, rest)) if !rest.trim().is_empty() => {
                names.insert(id.to_owned(), rest.trim().to_owned());
                rest.trim().to_owned()
            }
            Some((id, _)) => names.get(id).cloned().unwrap_or_else(|| format!("({id})")),
            None => spec.to_owned(),
        }
    };
    let mut costs = Costs::default();
    let (mut function, mut callee) = (String::new(), String::new());
    let mut call_follows = false;
    let mut total = 0;
    for line in text.lines() {
        if let Some(spec) = line.strip_prefix("fn=") {
            function = name(spec);
        } else if let Some(spec) = line.strip_prefix("cfn=") {
            callee = name(spec);
        } else if line.starts_with("calls=") {
            call_follows = true;
        } else if let Some(v) = line
            .strip_prefix("totals:")
            .or(line.strip_prefix("summary:"))
        {
            total = v.trim().parse().unwrap_or(total);
        } else if line.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '*')) {
            let cost: f64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0.0);
            if std::mem::take(&mut call_follows) {
                *costs
                    .calls
                    .entry((function.clone(), callee.clone()))
                    .or_default() += cost;
            } else {
                *costs.exclusive.entry(function.clone()).or_default() += cost;
            }
        }
    }
    // quanta's upkeep thread runs its loop from quanta's `upkeep.rs` and
    // sleeps between reads of the clock; the runtime's threads wait in
    // `epoll_wait` (or on a futex) and never run that file.
    let upkeep = text.contains("/src/upkeep.rs") && !text.contains("epoll_wait");
    ThreadDump {
        total,
        upkeep,
        costs,
    }
}

/// What one process of a variant executed per request.
struct Counted {
    /// Instructions per request in each batch.
    per_batch: Vec<f64>,
    /// The upkeep thread's, per request (left out of the rest).
    upkeep: f64,
    /// Per request, over all batches.
    costs: Costs,
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What a variant executed per request in each of its processes. Counts
/// are steady within a process (its batches agree to a few hundred
/// instructions) but move by up to 1% from one process to the next (hash
/// seeds, where the threads happen to park), so each variant runs in
/// several.
#[derive(Default)]
struct Runs(Vec<Counted>);

impl Runs {
    /// The median over the processes of each one's median batch.
    fn median(&self) -> f64 {
        median(
            self.0
                .iter()
                .map(|run| median(run.per_batch.iter().copied())),
        )
    }

    /// The lowest and highest of the processes' medians.
    fn range(&self) -> (f64, f64) {
        self.0
            .iter()
            .map(|run| median(run.per_batch.iter().copied()))
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)))
    }

    fn upkeep(&self) -> f64 {
        self.0.iter().map(|run| run.upkeep).sum::<f64>() / self.0.len() as f64
    }

    /// The costs per request, averaged over the processes.
    fn costs(&mut self) -> Costs {
        let mut costs = Costs::default();
        let share = 1.0 / self.0.len() as f64;
        for run in &mut self.0 {
            costs.add(std::mem::take(&mut run.costs), share);
        }
        costs
    }
}

/// Starts `variant` under callgrind, warms it up, and counts `batches`
/// batches of `requests` requests.
fn count(
    variant: &str,
    o: &Options,
    config: &Path,
    upstream: std::net::SocketAddr,
    dir: &Path,
) -> Counted {
    let listen = free_addr();
    let out_prefix = dir.join(format!("callgrind.{variant}"));
    let mut args = vec![
        "--tool=callgrind".to_owned(),
        "--separate-threads=yes".to_owned(),
        format!("--callgrind-out-file={}.%p", out_prefix.display()),
        support::BIN.to_owned(),
    ];
    let limiter = if variant.starts_with("limits") {
        "budget"
    } else {
        variant
    };
    args.extend(gateway_args(config, listen, upstream, limiter));
    // The gateway starts slowly under valgrind (its binary's debug
    // information is read first).
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = start_listening("valgrind", &args, listen, Duration::from_secs(300));
    let pid = gateway.id().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut sender = connect(listen).await;
        let mut send = async |n: u64| {
            for _ in 0..n {
                let status = chat_completion(&mut sender, listen, LOAD_KEY).await;
                assert_eq!(
                    status, 200,
                    "{variant}: every request is admitted and served"
                );
            }
        };
        send(o.warmup).await;
        tool("callgrind_control", &["--zero", &pid]);
        for batch in 0..o.batches {
            send(o.requests).await;
            tool(
                "callgrind_control",
                &[&format!("--dump=batch{batch}"), &pid],
            );
        }
    });
    drop(gateway);
    // Files: `<prefix>.<pid>.<dump>-<thread>`; dump 0 is the exit's, if any.
    let mut batches: Vec<Vec<PathBuf>> = vec![Vec::new(); o.batches];
    let stem = format!("callgrind.{variant}.{pid}.");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&stem) else {
            continue;
        };
        let dump: usize = rest
            .split('-')
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        if (1..=o.batches).contains(&dump) {
            batches[dump - 1].push(path);
        }
    }
    let mut counted = Counted {
        per_batch: Vec::new(),
        upkeep: 0.0,
        costs: Costs::default(),
    };
    let all = (o.requests * o.batches as u64) as f64;
    for (batch, files) in batches.iter().enumerate() {
        assert!(!files.is_empty(), "{variant}: no dump for batch {batch}");
        let mut total = 0;
        for file in files {
            let thread = read_thread(file);
            if thread.upkeep {
                counted.upkeep += thread.total as f64 / all;
                continue;
            }
            total += thread.total;
            counted.costs.add(thread.costs, 1.0 / all);
        }
        counted.per_batch.push(total as f64 / o.requests as f64);
    }
    counted
}

/// The crate (or library) a function's cost belongs to.
fn group(function: &str) -> String {
    const ALLOCATOR: [&str; 12] = [
        "malloc",
        "free",
        "realloc",
        "calloc",
        "_int_malloc",
        "_int_free",
        "_int_realloc",
        "malloc_consolidate",
        "unlink_chunk",
        "tcache_get",
        "__rust_alloc",
        "__rust_dealloc",
    ];
    let bare = function.split(" in ").next().unwrap_or(function);
    if ALLOCATOR
        .iter()
        .any(|a| bare == *a || bare.starts_with(&format!("{a}.")))
        || bare.starts_with("__rdl_")
        || bare.starts_with("__rust_")
    {
        return "malloc/free".to_owned();
    }
    let name = bare.trim_start_matches(['<', '&', '*', '(']);
    let name = name
        .strip_prefix("dyn ")
        .or(name.strip_prefix("mut "))
        .or(name.strip_prefix("const "))
        .unwrap_or(name);
    match name.split_once("::") {
        Some((krate, _)) if !krate.contains(' ') => match krate {
            "core" | "alloc" | "std" => "std (core, alloc)".to_owned(),
            other => other.to_owned(),
        },
        _ => "libc and other C (memcpy, syscalls' wrappers, ...)".to_owned(),
    }
}

/// Whether `function` is a frame of the server around the layer (the
/// runtime's, hyper's, the router's, or a generic future's `poll` whose
/// name many futures share): those hold the layer's cost and the proxy's
/// alike, and say nothing about where it goes.
fn is_server_frame(function: &str) -> bool {
    const AROUND: [&str; 7] = [
        "tokio",
        "hyper",
        "hyper_util",
        "axum",
        "axum_core",
        "tower",
        "futures_util",
    ];
    let krate = group(function);
    AROUND.contains(&krate.as_str())
        || krate.starts_with("std") && function.contains("as core::future::future::Future>::poll")
}

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("−{out}")
    } else {
        out
    }
}

fn signed(x: f64) -> String {
    if x.round() >= 0.0 {
        format!("+{}", thousands(x))
    } else {
        thousands(x)
    }
}

/// A function's name, shortened for a table: closures and generic
/// arguments kept, but no longer than a line.
fn short(name: &str) -> String {
    let name = name.replace('|', "\\|");
    if name.chars().count() > 110 {
        let cut: String = name.chars().take(107).collect();
        format!("{cut}...")
    } else {
        name
    }
}

fn main() {
    let o = options();
    let dir = match &o.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).unwrap();
            dir.clone()
        }
        None => tempfile::tempdir().unwrap().keep(),
    };
    let config = write_config(&dir, "");
    let limits_config = write_limits_config(&dir, "1mo");
    let limits30d_config = write_limits_config(&dir, "30d");
    let (_mock, upstream) = start_mock();
    let mut counted: HashMap<String, Runs> = HashMap::new();
    for run in 0..o.runs {
        // Rotated, as a timing bench would: nothing here should depend on
        // the order, and this shows it does not.
        for k in 0..o.variants.len() {
            let variant = &o.variants[(run + k) % o.variants.len()];
            eprintln!(
                "run {}/{}: counting {variant} under callgrind...",
                run + 1,
                o.runs
            );
            let config = match variant.as_str() {
                "limits" => &limits_config,
                "limits30d" => &limits30d_config,
                _ => &config,
            };
            let one = count(variant, &o, config, upstream, &dir);
            counted.entry(variant.clone()).or_default().0.push(one);
        }
    }
    if o.keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }

    println!(
        "\nInstructions per request (callgrind; {} processes per variant, each {} batches of {} requests after {} of warm-up, on one keep-alive connection):\n",
        o.runs, o.batches, o.requests, o.warmup
    );
    println!("| variant | instructions per request | processes (min–max) | vs plain proxy |");
    println!("|---|---|---|---|");
    let base = counted.get("none").map(Runs::median);
    for variant in &o.variants {
        let c = &counted[variant];
        let (min, max) = c.range();
        let vs = match base {
            Some(base) if variant != "none" => signed(c.median() - base),
            _ => String::new(),
        };
        println!(
            "| {} | {} | {}–{} | {vs} |",
            variant_name(variant),
            thousands(c.median()),
            thousands(min),
            thousands(max)
        );
    }
    let upkeep: Vec<String> = o
        .variants
        .iter()
        .map(|v| format!("{v} {}", thousands(counted[v].upkeep())))
        .collect();
    println!(
        "\n(Left out: quanta's upkeep thread, time-driven, per request: {}.)",
        upkeep.join(", ")
    );

    let (base_name, other_name) = (&o.compare.0, &o.compare.1);
    let plain_total = counted.get(base_name).map(Runs::median).unwrap_or_default();
    let (Some(none), Some(budget)) = (
        counted.get_mut(base_name).map(Runs::costs),
        counted.get_mut(other_name).map(Runs::costs),
    ) else {
        return;
    };
    let (base_label, other_label) = (variant_name(base_name), variant_name(other_name));
    let mut groups: HashMap<String, (f64, f64)> = HashMap::new();
    for (function, cost) in &budget.exclusive {
        groups.entry(group(function)).or_default().1 += cost;
    }
    for (function, cost) in &none.exclusive {
        groups.entry(group(function)).or_default().0 += cost;
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by(|a, b| (b.1 .1 - b.1 .0).total_cmp(&(a.1 .1 - a.1 .0)));
    println!(
        "\nWhat {other_label} adds to {base_label}, by crate (self cost per request; the rows add \
         up to the difference):\n"
    );
    println!("| crate | {base_label} | {other_label} | difference |");
    println!("|---|---|---|---|");
    let total: f64 = groups.iter().map(|g| g.1 .1 - g.1 .0).sum();
    let mut rest = total;
    for (name, (plain, layer)) in groups.iter().filter(|g| (g.1 .1 - g.1 .0).abs() >= 100.0) {
        rest -= layer - plain;
        println!(
            "| {name} | {} | {} | {} |",
            thousands(*plain),
            thousands(*layer),
            signed(layer - plain)
        );
    }
    println!("| (the rest, under 100 each) | | | {} |", signed(rest));
    println!("| **all** | | | **{}** |", signed(total));

    let (plain, layer) = (none.inclusive(), budget.inclusive());
    let mut functions: Vec<(&str, f64, f64)> = layer
        .iter()
        .map(|(f, cost)| (*f, plain.get(f).copied().unwrap_or(0.0), *cost))
        .chain(
            plain
                .iter()
                .filter(|(f, _)| !layer.contains_key(*f))
                .map(|(f, cost)| (*f, *cost, 0.0)),
        )
        .filter(|(f, p, _)| !is_server_frame(f) && *p < 0.9 * plain_total)
        .collect();
    functions.sort_by(|a, b| (b.2 - b.1).abs().total_cmp(&(a.2 - a.1).abs()));
    println!(
        "\nWhat {other_label} adds to {base_label}, by function (inclusive cost per request: each \
         row holds its callees; the threads' and the server's frames around the layer left out), \
         the {} largest differences:\n",
        o.top
    );
    println!("| function | {base_label} | {other_label} | difference |");
    println!("|---|---|---|---|");
    for (function, plain, layer) in functions.iter().take(o.top) {
        println!(
            "| `{}` | {} | {} | {} |",
            short(function),
            thousands(*plain),
            thousands(*layer),
            signed(layer - plain)
        );
    }
}
