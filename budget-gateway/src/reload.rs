//! SIGHUP re-reads the configuration file.
//!
//! # How it works
//!
//! On SIGHUP the file is read and checked as at start; a file that does
//! not parse, or that the running gateway cannot apply (an agent the
//! database manages, an agent a fleet cannot share), is refused with the
//! same error as at start, printed to stderr, and the running
//! configuration stays. A good file is applied by
//! [`Catalog::reload`](crate::catalog::Catalog::reload): agents added and
//! removed, limits changed without losing usage, parents relinked; keys,
//! the admin key and the `[[models]]` prices replaced (a request admitted
//! before is settled at the price it was admitted with). Settings built
//! into the proxy and the layer (the upstream key, the tokenizer, waiting,
//! headers, `other_endpoints`, metrics labels, alerts) apply at the next
//! start, and the reload says which changed.

use std::path::{Path, PathBuf};

use crate::catalog::{Catalog, Reloaded};
use crate::config;

/// Reads `path` and applies it; the error is the message to print.
pub fn reload<'a>(
    catalog: &'a Catalog,
    path: &'a Path,
) -> impl std::future::Future<Output = Result<Reloaded, String>> + 'a {
    let loaded = config::load(path).map_err(|e| e.to_string());
    async move {
        let config = loaded?;
        catalog
            .reload(&config)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Reloads `path` on every SIGHUP, forever, reporting on stderr.
#[cfg(unix)]
pub async fn reload_on_hangup(catalog: Catalog, path: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        eprintln!("budget-gateway: cannot listen for SIGHUP: the file is read at start only");
        return;
    };
    while hangups.recv().await.is_some() {
        match reload(&catalog, &path).await {
            Ok(done) => {
                eprintln!(
                    "budget-gateway: reloaded {}: {} agents added, {} removed, {} changed",
                    path.display(),
                    done.added,
                    done.removed,
                    done.changed
                );
                if !done.at_restart.is_empty() {
                    eprintln!(
                        "budget-gateway: changed, applied at the next start: {}",
                        done.at_restart.join(", ")
                    );
                }
            }
            Err(e) => eprintln!(
                "budget-gateway: {e}\nbudget-gateway: the reload is refused; the running configuration stays"
            ),
        }
    }
}

/// Without Unix signals there is no SIGHUP: the file is read at start.
#[cfg(not(unix))]
pub async fn reload_on_hangup(_catalog: Catalog, _path: PathBuf) {}
