//! A journal of usage between two saves of the state file, so that a crash
//! loses at most [`GROUP_COMMIT`] of admissions.
//!
//! # How it works
//!
//! The state file (`--state`) is a snapshot, written every
//! `persist_interval_secs`: on its own, a crash (`kill -9`, an OOM kill)
//! would lose everything admitted since the last one, and hand that budget
//! out again. So every admission and every settle is also appended to a
//! journal beside it (`STATE.journal.N`), one line each:
//!
//! ```text
//! <agent uuid> <tokens> <calls> <unix ms>
//! ```
//!
//! `tokens` and `calls` are what the event did to the agent's usage (an
//! admission adds its reservation; a settle adds what was used beyond it,
//! or takes back its refund, signed), and the time is that of the window
//! it applies to (the admission's, for a settle booked in the
//! reservation's window; the settle's, for overuse carried over).
//!
//! Lines are gathered in memory and written by one thread every
//! [`GROUP_COMMIT`] (a group commit), with `fdatasync` at most once a
//! second. The guarantee: a process crash (`kill -9`: the OS keeps what was
//! written) loses at most the last [`GROUP_COMMIT`] of events; a crash of
//! the machine, at most the last second and a bit.
//!
//! At each save the journal moves to the next file first, then the
//! snapshot is written, then the older files are deleted. A crash between
//! two of these steps makes a start replay events the snapshot already
//! holds: usage restored too high, never too low.
//!
//! At start, after the snapshot is restored and the configuration's
//! budgets installed, every journal file is replayed, oldest first: each
//! agent's events of the last `window_secs` are summed, and a positive sum
//! is charged (the calls as far as the window still takes them, the
//! tokens in full: they were spent). A negative sum (refunds of requests
//! the snapshot held in flight) is not given back: the restored usage is
//! then that of the snapshot, above the truth. For a fixed window, events
//! older than its length are of an ended window and skipped; events of a
//! window that ended after the snapshot but less than a window ago are
//! counted (the journal does not record when a window rolled over), above
//! the truth again. For buckets every event is charged (as of now, which
//! is above the truth by what refilled since).
//! The result is saved at once and the replayed files deleted, so a second
//! crash does not replay them again.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_budget::{AgentId, BudgetManager, PersistError, Settlement};
use agent_budget_tower::UsageLog;

/// How often the gathered events are written.
pub const GROUP_COMMIT: Duration = Duration::from_millis(50);

/// How often what was written is also synced to the disk.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// The journal beside a state file.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("state", &self.shared.state)
            .finish_non_exhaustive()
    }
}

struct Shared {
    state: PathBuf,
    /// Lines not written yet.
    pending: Mutex<String>,
    writer: Mutex<Writer>,
}

struct Writer {
    file: File,
    generation: u64,
    synced: Instant,
    dirty: bool,
}

fn io_error(path: &Path, e: std::io::Error) -> PersistError {
    PersistError::Write {
        path: path.to_owned(),
        source: e,
    }
}

fn read_error(path: &Path, e: std::io::Error) -> PersistError {
    PersistError::Read {
        path: path.to_owned(),
        source: e,
    }
}

impl Journal {
    /// Replays the journal files beside `state` onto `budgets` (whose
    /// snapshot was restored and whose budgets are installed), saves the
    /// result to `state`, deletes the replayed files, and starts a new
    /// journal, written every [`GROUP_COMMIT`] by a thread of its own.
    /// `windowed` tells which agents have fixed windows (their events from
    /// an ended window are skipped).
    pub fn open(
        state: &Path,
        budgets: &BudgetManager,
        windowed: &dyn Fn(&AgentId) -> bool,
    ) -> Result<Self, PersistError> {
        let files = journal_files(state)?;
        let mut events = Vec::new();
        for (_, path) in &files {
            let text = std::fs::read(path).map_err(|e| read_error(path, e))?;
            events.extend(parse(&text));
        }
        if !events.is_empty() {
            replay(budgets, &events, windowed);
        }
        // Saved at once: the replay, and the windows as they are now (a
        // crash before the first periodic save restores them as they were).
        budgets.persist(state)?;
        for (_, path) in &files {
            let _ = std::fs::remove_file(path);
        }
        let generation = files.last().map_or(0, |(g, _)| g + 1);
        let path = file_of(state, generation);
        let file = create(&path)?;
        let shared = Arc::new(Shared {
            state: state.to_owned(),
            pending: Mutex::new(String::new()),
            writer: Mutex::new(Writer {
                file,
                generation,
                synced: Instant::now(),
                dirty: false,
            }),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("budget-journal".to_owned())
            .spawn(move || commit_loop(weak))
            .map_err(|e| io_error(&path, e))?;
        Ok(Journal { shared })
    }

    /// The log the budget layer writes to.
    pub fn log(&self) -> Arc<dyn UsageLog> {
        self.shared.clone()
    }

    /// Saves `budgets` to the state file, moving the journal to a new file
    /// first and deleting the old ones after.
    pub fn snapshot(&self, budgets: &BudgetManager) -> Result<(), PersistError> {
        let generation = {
            let mut writer = self.shared.lock_writer();
            self.shared.write_pending(&mut writer);
            let next = writer.generation + 1;
            let path = file_of(&self.shared.state, next);
            writer.file = create(&path)?;
            writer.generation = next;
            writer.dirty = false;
            next
        };
        budgets.persist(&self.shared.state)?;
        for (g, path) in journal_files(&self.shared.state)? {
            if g < generation {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(())
    }
}

impl Shared {
    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, agent: &AgentId, tokens: i128, calls: i128, at: SystemTime) {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut line = String::with_capacity(72);
        let _ = writeln!(line, "{agent} {tokens} {calls} {ms}");
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_str(&line);
    }

    /// Writes the gathered lines to the current file (the writer's lock
    /// held, so a move to the next file waits for it).
    fn write_pending(&self, writer: &mut Writer) {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return;
        }
        if let Err(e) = writer.file.write_all(batch.as_bytes()) {
            eprintln!("budget-gateway: the journal: {e}");
        }
        writer.dirty = true;
    }

    fn commit(&self) {
        let mut writer = self.lock_writer();
        self.write_pending(&mut writer);
        if writer.dirty && writer.synced.elapsed() >= SYNC_EVERY {
            let _ = writer.file.sync_data();
            writer.synced = Instant::now();
            writer.dirty = false;
        }
    }
}

fn commit_loop(shared: Weak<Shared>) {
    loop {
        std::thread::sleep(GROUP_COMMIT);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.commit();
    }
}

impl UsageLog for Shared {
    fn admitted(&self, agent: &AgentId, tokens: u64, calls: u64, at: SystemTime) {
        self.push(agent, tokens.into(), calls.into(), at);
    }

    fn settled(&self, agent: &AgentId, admitted_at: SystemTime, settlement: Settlement) {
        match settlement {
            Settlement::Applied {
                refunded_tokens,
                charged_tokens,
                refunded_calls,
            } => {
                if refunded_tokens > 0 || charged_tokens > 0 || refunded_calls > 0 {
                    let tokens = i128::from(charged_tokens) - i128::from(refunded_tokens);
                    self.push(agent, tokens, -i128::from(refunded_calls), admitted_at);
                }
            }
            Settlement::CarriedOver { charged_tokens } => {
                self.push(agent, charged_tokens.into(), 0, SystemTime::now());
            }
            Settlement::WindowEnded | Settlement::AgentRemoved => {}
        }
    }
}

fn file_of(state: &Path, generation: u64) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(format!(".journal.{generation}"));
    PathBuf::from(name)
}

fn create(path: &Path) -> Result<File, PersistError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_error(path, e))
}

/// The journal files beside `state`, oldest first.
fn journal_files(state: &Path) -> Result<Vec<(u64, PathBuf)>, PersistError> {
    let dir = match state.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let Some(name) = state.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.journal.");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_error(&dir, e)),
    };
    let mut files: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let file = entry.file_name();
            let generation = file.to_str()?.strip_prefix(&prefix)?.parse().ok()?;
            Some((generation, entry.path()))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// One journal line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Event {
    agent: AgentId,
    tokens: i128,
    calls: i128,
    at_ms: u64,
}

/// The events of a journal; a line cut short by the crash, or garbled, is
/// skipped.
fn parse(text: &[u8]) -> Vec<Event> {
    let text = String::from_utf8_lossy(text);
    // A line is whole only with its end: the last one may have been cut.
    text.split_inclusive('\n')
        .filter_map(|line| {
            let mut fields = line.strip_suffix('\n')?.split(' ');
            let event = Event {
                agent: AgentId::try_parse(fields.next()?).ok()?,
                tokens: fields.next()?.parse().ok()?,
                calls: fields.next()?.parse().ok()?,
                at_ms: fields.next()?.parse().ok()?,
            };
            fields.next().is_none().then_some(event)
        })
        .collect()
}

/// Charges each agent the sum of its events in its current window.
fn replay(budgets: &BudgetManager, events: &[Event], windowed: &dyn Fn(&AgentId) -> bool) {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut sums: HashMap<AgentId, (i128, i128)> = HashMap::new();
    let mut starts: HashMap<AgentId, u64> = HashMap::new();
    for event in events {
        let start = *starts.entry(event.agent).or_insert_with(|| {
            match budgets.full_info(&event.agent) {
                // The window current when the process died began at most
                // `window_secs` ago (a second more for the rounding): an
                // event older than that is of an ended window. One newer
                // may be too (when the window rolled over after the
                // snapshot, at a moment the journal does not record): it
                // is counted, which errs on the side of the budget.
                Some(info) if windowed(&event.agent) => {
                    now_ms.saturating_sub(info.window_secs.saturating_add(1).saturating_mul(1_000))
                }
                _ => 0,
            }
        });
        if event.at_ms >= start {
            let sum = sums.entry(event.agent).or_default();
            sum.0 += event.tokens;
            sum.1 += event.calls;
        }
    }
    for (agent, (tokens, calls)) in sums {
        let tokens = u64::try_from(tokens.max(0)).unwrap_or(u64::MAX);
        let calls = u64::try_from(calls.max(0)).unwrap_or(u64::MAX);
        charge(budgets, &agent, tokens, calls);
    }
}

/// Charges `tokens` in full and as many of `calls` as the window takes.
fn charge(budgets: &BudgetManager, agent: &AgentId, tokens: u64, calls: u64) {
    let (mut tokens, mut left, mut step) = (tokens, calls, calls);
    // Calls a few at a time when they do not all fit: halving, so the
    // loop ends after about 2·log2(calls) tries.
    for _ in 0..200 {
        if left == 0 || step == 0 {
            break;
        }
        step = step.min(left);
        match budgets.acquire(agent, 0, step) {
            Ok(taken) => {
                // Tokens beyond a reservation are charged even past the
                // limit: they were spent.
                let _ = taken.settle(tokens);
                tokens = 0;
                left -= step;
            }
            Err(_) => step /= 2,
        }
    }
    if tokens > 0 {
        if let Ok(taken) = budgets.acquire(agent, 0, 0) {
            let _ = taken.settle(tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_budget::BudgetLimit;

    #[test]
    fn lines_cut_short_or_garbled_are_skipped() {
        let agent = uuid::Uuid::new_v4();
        let text = format!("{agent} 10 1 5\n{agent} -3 0 5\ngarbage\n{agent} 7 1 9\n{agent} 7 1");
        let events = parse(text.as_bytes());
        assert_eq!(events.len(), 3);
        assert_eq!(events[1].tokens, -3);
        assert_eq!(events[2].at_ms, 9);
        // Cut inside its time: a whole-looking line, but without its end.
        let torn = format!("{agent} 10 1 5\n{agent} 1 1 170000");
        assert_eq!(parse(torn.as_bytes()).len(), 1);
    }

    #[test]
    fn a_replay_charges_each_agents_sum_and_takes_only_the_calls_that_fit() {
        let budgets = BudgetManager::new();
        let agent = uuid::Uuid::new_v4();
        budgets.set_budget(BudgetLimit {
            agent_id: agent,
            token_budget: 1_000,
            calls_budget: 10,
            window_secs: 60,
        });
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let event = |tokens, calls, at_ms| Event {
            agent,
            tokens,
            calls,
            at_ms,
        };
        // An admission of 500 settled at 120; a window long gone.
        let events = [
            event(500, 1, now),
            event(-380, 0, now),
            event(900, 9, now - 3_600_000),
        ];
        replay(&budgets, &events, &|_| true);
        let info = budgets.full_info(&agent).unwrap();
        assert_eq!((info.tokens_used, info.calls_used), (120, 1));
        // More calls than the window has left: it is exhausted, no more.
        replay(&budgets, &[event(2_000, 25, now)], &|_| true);
        let info = budgets.full_info(&agent).unwrap();
        assert_eq!((info.tokens_used, info.calls_used), (2_120, 10));
    }

    #[test]
    fn a_journal_survives_a_crash_and_is_replayed_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let agent = uuid::Uuid::new_v4();
        let limit = BudgetLimit {
            agent_id: agent,
            token_budget: 10_000,
            calls_budget: 100,
            window_secs: 3_600,
        };
        let budgets = BudgetManager::new();
        budgets.set_budget(limit.clone());
        let journal = Journal::open(&state, &budgets, &|_| true).unwrap();
        let log = journal.log();
        log.admitted(&agent, 300, 1, SystemTime::now());
        log.settled(
            &agent,
            SystemTime::now(),
            Settlement::Applied {
                refunded_tokens: 100,
                charged_tokens: 0,
                refunded_calls: 0,
            },
        );
        // No snapshot was ever written: a crash now. What the thread wrote
        // is what the next start finds.
        journal.shared.commit();
        drop((journal, log));
        let restarted = BudgetManager::new();
        restarted.restore(&state).unwrap();
        restarted.set_budget(limit);
        let journal = Journal::open(&state, &restarted, &|_| true).unwrap();
        let info = restarted.full_info(&agent).unwrap();
        assert_eq!((info.tokens_used, info.calls_used), (200, 1));
        drop(journal);
        // The replay was saved, and its file deleted: a second start does
        // not charge it again.
        let again = BudgetManager::new();
        again.restore(&state).unwrap();
        let _journal = Journal::open(&state, &again, &|_| true).unwrap();
        let info = again.full_info(&agent).unwrap();
        assert_eq!((info.tokens_used, info.calls_used), (200, 1));
    }
}
