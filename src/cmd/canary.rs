//! `cync-mitm canary set PERCENT --config FILE`: edits `routing.canary_percent` in the TOML file,
//! keeping its comments and layout (toml_edit), so the file stays the source of truth and the
//! running proxy's watcher applies the change.

use crate::config::{Config, ConfigError};
use std::path::Path;

/// Why the file was not changed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The percentage is out of range.
    #[error("{0} is not a percentage between 0 and 100")]
    Range(f64),
    /// Reading or writing the file.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Error.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{0}")]
    Parse(String),
    /// The edited file would not be a valid configuration.
    #[error("the edited configuration would be invalid, file left unchanged: {0}")]
    Invalid(#[from] ConfigError),
}

/// The edited text: `text` with `routing.canary_percent = percent`, comments kept.
pub fn set_percent_in(
    text: &str,
    percent: f64,
    file: &Path,
) -> Result<(String, Option<f64>), Error> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(Error::Range(percent));
    }
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| Error::Parse(format!("{}: {e}", file.display())))?;
    let routing = doc
        .entry("routing")
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
    let Some(table) = routing.as_table_like_mut() else {
        return Err(Error::Parse(format!(
            "{}: `routing` is not a table",
            file.display()
        )));
    };
    let old = table
        .get("canary_percent")
        .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)));
    // Replace the value in place: the key's comments and the value's spacing stay.
    match table.get_mut("canary_percent") {
        Some(item) => {
            let decor = item.as_value().map(|v| v.decor().clone());
            *item = toml_edit::value(percent);
            if let (Some(d), Some(v)) = (decor, item.as_value_mut()) {
                *v.decor_mut() = d;
            }
        }
        None => {
            table.insert("canary_percent", toml_edit::value(percent));
        }
    }
    let out = doc.to_string();
    Config::from_toml(&out, file)?;
    Ok((out, old))
}

/// Edits the file in place (atomically, by rename, unless it is a symlink as in a ConfigMap).
pub fn set_percent(file: &Path, percent: f64) -> Result<Option<f64>, Error> {
    let io = |source| Error::Io {
        path: file.display().to_string(),
        source,
    };
    // One edit at a time in this process (two clicks in the console); the temporary file's
    // name is this process's own (the CLI may edit the same file meanwhile).
    static EDITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = EDITING.lock().unwrap_or_else(|p| p.into_inner());
    let text = std::fs::read_to_string(file).map_err(io)?;
    let (out, old) = set_percent_in(&text, percent, file)?;
    let is_link = std::fs::symlink_metadata(file)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false);
    if is_link {
        std::fs::write(file, out).map_err(io)?;
    } else {
        let tmp = file.with_extension(format!("toml.tmp.{}", std::process::id()));
        let perms = std::fs::metadata(file).map_err(io)?.permissions();
        std::fs::write(&tmp, out).map_err(io)?;
        std::fs::set_permissions(&tmp, perms).map_err(io)?;
        std::fs::rename(&tmp, file).map_err(io)?;
    }
    Ok(old)
}

/// What may keep the new percentage from having an effect, as lines for the user: a routing
/// mode that ignores it, or an environment variable that overrides it in a proxy started with
/// it. `env` reads the environment (the proxy's overrides are applied as it would).
pub fn moot_notes(cfg: &Config, env: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut notes = Vec::new();
    if cfg.rollout.enabled {
        notes.push(
            "[rollout] is enabled: the rollout sets the mode and the percentage step by step, \
             and the file's routing.canary_percent is used again only once it is disabled"
                .to_owned(),
        );
    }
    if let Some(v) = env("CANARY_PERCENTAGE") {
        notes.push(format!(
            "CANARY_PERCENTAGE={v} is set in this shell; a proxy started with it in its \
             environment uses that value instead of routing.canary_percent"
        ));
    }
    let dark_launch = env("DARK_LAUNCH")
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
    match cfg.routing.mode {
        crate::route::Mode::LegacyOnly if dark_launch => notes.push(
            "routing.mode is legacy_only in the file; DARK_LAUNCH (set in this shell) makes it \
             shadow in a proxy started with it, where the percentage picks the devices to \
             mirror, and every device stays on the cloud"
                .to_owned(),
        ),
        crate::route::Mode::LegacyOnly => notes.push(
            "routing.mode is legacy_only: every device stays on the cloud whatever the \
             percentage; it moves devices with mode new_primary or new_only"
                .to_owned(),
        ),
        crate::route::Mode::Shadow => notes.push(
            "routing.mode is shadow: every device stays on the cloud; the percentage picks the \
             devices whose frames are to be mirrored to the new path (moving devices needs \
             mode new_primary or new_only)"
                .to_owned(),
        ),
        crate::route::Mode::NewPrimary | crate::route::Mode::NewOnly => {}
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_say_when_the_percentage_is_moot() {
        let mut cfg = Config::default();
        let none = |_: &str| None;
        let n = moot_notes(&cfg, none);
        assert_eq!(n.len(), 1);
        assert!(n[0].contains("legacy_only"));
        cfg.routing.mode = crate::route::Mode::Shadow;
        let n = moot_notes(&cfg, none);
        assert_eq!(n.len(), 1);
        assert!(n[0].contains("shadow"), "{n:?}");
        cfg.routing.mode = crate::route::Mode::NewPrimary;
        assert!(moot_notes(&cfg, none).is_empty());
        let n = moot_notes(&cfg, |k| (k == "CANARY_PERCENTAGE").then(|| "5".to_owned()));
        assert_eq!(n.len(), 1);
        assert!(n[0].contains("CANARY_PERCENTAGE=5"));
        cfg.routing.mode = crate::route::Mode::LegacyOnly;
        let n = moot_notes(&cfg, |k| (k == "DARK_LAUNCH").then(|| "true".to_owned()));
        assert_eq!(n.len(), 1);
        assert!(n[0].contains("DARK_LAUNCH"), "{n:?}");
    }

    #[test]
    fn keeps_comments_and_layout() {
        let text = "# top comment\n[routing]\n# the share\ncanary_percent = 10 # was ten\nmode = \"legacy_only\"\n\n[log]\nfilter = \"info\" # keep\n";
        let (out, old) = set_percent_in(text, 25.0, Path::new("x.toml")).unwrap();
        assert_eq!(old, Some(10.0));
        assert!(out.contains("# top comment"));
        assert!(out.contains("# the share"));
        assert!(out.contains("canary_percent = 25.0 # was ten"), "{out}");
        assert!(out.contains("filter = \"info\" # keep"));
        let c = Config::from_toml(&out, Path::new("x.toml")).unwrap();
        assert_eq!(c.routing.canary_percent, 25.0);
    }

    #[test]
    fn adds_the_section_when_missing_and_refuses_bad_values() {
        let (out, old) =
            set_percent_in("[log]\nfilter = \"info\"\n", 5.5, Path::new("x.toml")).unwrap();
        assert_eq!(old, None);
        assert_eq!(
            Config::from_toml(&out, Path::new("x"))
                .unwrap()
                .routing
                .canary_percent,
            5.5
        );
        assert!(matches!(
            set_percent_in("", 101.0, Path::new("x")),
            Err(Error::Range(_))
        ));
        // new_only with no new_path address: the edit would make the file invalid.
        let e =
            set_percent_in("[routing]\nmode = \"new_only\"\n", 10.0, Path::new("x")).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }

    #[test]
    fn edits_files_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[routing]\ncanary_percent = 1\n").unwrap();
        assert_eq!(set_percent(&f, 50.0).unwrap(), Some(1.0));
        assert_eq!(Config::load(&f).unwrap().routing.canary_percent, 50.0);
        assert!(!dir.path().join("c.toml.tmp").exists());
    }
}
