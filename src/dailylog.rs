//! Day files (`<dir>/<prefix>-YYYYMMDD.jsonl`, 0600 in a 0700 folder, appended to, never
//! followed through a symlink) for the parity drift log and the SLO decision log, and their
//! retention.

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// `YYYYMMDD` (UTC) of `t`.
pub fn day(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    crate::codec::TimeAnswer::from_unix(secs, 0)
        .date()
        .replace('-', "")
}

/// `<dir>/<prefix>-<day>.jsonl`.
pub fn daily_path(dir: &Path, prefix: &str, day: &str) -> PathBuf {
    dir.join(format!("{prefix}-{day}.jsonl"))
}

/// An open day file.
pub struct Open {
    /// Its path.
    pub path: PathBuf,
    /// The file, in append mode.
    pub file: std::fs::File,
    /// Its length.
    pub bytes: u64,
}

/// Opens (creating) the day file of `prefix` in `dir`.
pub fn open_daily(dir: &Path, prefix: &str, day: &str) -> std::io::Result<Open> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = daily_path(dir, prefix, day);
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    // A file that existed with wider permissions is narrowed (0600, like captures).
    use std::os::unix::fs::PermissionsExt as _;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok(Open { path, file, bytes })
}

/// Deletes the day files of `prefix` in `dir` older than `keep_days` days before `today`
/// (`YYYYMMDD`); returns how many. Other files are left alone.
pub fn prune(dir: &Path, prefix: &str, today: &str, keep_days: u32) -> usize {
    let Some(today) = day_number(today) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(d) = name
            .to_str()
            .and_then(|n| {
                n.strip_prefix(prefix)?
                    .strip_prefix('-')?
                    .strip_suffix(".jsonl")
            })
            .and_then(day_number)
        else {
            continue;
        };
        if today - d >= i64::from(keep_days) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Days since the epoch of a `YYYYMMDD` string.
fn day_number(s: &str) -> Option<i64> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i64 = s[..4].parse().ok()?;
    let m: i64 = s[4..6].parse().ok()?;
    let d: i64 = s[6..].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_retention() {
        assert_eq!(day(SystemTime::UNIX_EPOCH), "19700101");
        assert_eq!(day_number("19700101"), Some(0));
        assert_eq!(
            day_number("20261202").unwrap() - day_number("20261130").unwrap(),
            2
        );
        assert_eq!(
            day_number("20250301").unwrap() - day_number("20250228").unwrap(),
            1
        );
        assert_eq!(day_number("2026120"), None);
        assert_eq!(day_number("20261302"), None);
        let dir = tempfile::tempdir().unwrap();
        for d in ["20261101", "20261118", "20261119", "20261202"] {
            open_daily(dir.path(), "decisions", d).unwrap();
        }
        std::fs::write(dir.path().join("decisions-notes.jsonl"), "").unwrap();
        std::fs::write(dir.path().join("drift-20200101.jsonl"), "").unwrap();
        assert_eq!(prune(dir.path(), "decisions", "20261202", 14), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "decisions-20261119.jsonl",
                "decisions-20261202.jsonl",
                "decisions-notes.jsonl",
                "drift-20200101.jsonl"
            ]
        );
    }
}
