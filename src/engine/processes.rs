//! A record, on local disk, of the process groups that `command` steps have
//! running, so that a server restarted after a crash can kill the groups the
//! dead server left behind before it runs those steps again.
//!
//! Each running group is one file in the directory, named after the group id
//! and holding the leader's start time (from `/proc/<pid>/stat`), so that a
//! recycled pid is never mistaken for a leftover. The directory belongs to
//! one server: do not share a data directory between servers.

use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

pub struct ProcessRegistry {
    dir: PathBuf,
}

impl ProcessRegistry {
    /// Uses (and creates) `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Records a running group; the record is removed with the returned guard.
    pub fn record(&self, pgid: u32) -> Recorded {
        let path = self.dir.join(pgid.to_string());
        if let Some(start) = start_time(pgid)
            && let Err(error) = std::fs::write(&path, start)
        {
            tracing::warn!(%error, pgid, "cannot record a command's process group");
        }
        Recorded { path }
    }

    /// Kills every recorded group whose leader is still the process that was
    /// recorded, and forgets all records. Returns how many were killed.
    pub fn kill_leftovers(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut killed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let recorded = std::fs::read_to_string(&path).unwrap_or_default();
            let pgid = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok());
            // A live leader must be the recorded process (not a recycled
            // pid). A gone leader may have left members behind; the group
            // id cannot be reused while they live, so kill the group.
            let ours = |pgid: u32| match start_time(pgid) {
                Some(now) => now == recorded,
                None => true,
            };
            if let Some(pgid) = pgid
                && !recorded.is_empty()
                && ours(pgid)
                && killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL).is_ok()
            {
                tracing::info!(
                    pgid,
                    "killed a command's process group left by a previous run"
                );
                killed += 1;
            }
            let _ = std::fs::remove_file(&path);
        }
        killed
    }
}

/// Removes its record when dropped.
pub struct Recorded {
    path: PathBuf,
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks
/// after boot. The command name (field 2) may hold spaces and parentheses,
/// so fields are counted after its closing parenthesis.
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_this_process_is_stable() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
    }
}
