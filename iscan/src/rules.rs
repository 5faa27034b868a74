//! YARA rules through yara-x: the built-in test set plus the user's rule files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;

/// Rules always loaded: the EICAR anti-virus test file and elastio's own test marker, so a
/// scan can be shown to work without real malware.
pub const BUILTIN: &str = r#"
rule EICAR_test_file {
  meta:
    description = "the EICAR anti-virus test file"
  strings:
    $eicar = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
  condition:
    $eicar
}

rule elastio_test_malware {
  meta:
    description = "elastio's test marker: a harmless string that scans as malware"
  strings:
    $m = "ELASTIO-ISCAN-TEST-MALWARE-5f0c1a"
  condition:
    $m
}
"#;

/// Most rule files read from a directory, and the deepest directory followed.
const MAX_RULE_FILES: usize = 10_000;
const MAX_DEPTH: usize = 8;

/// Longest a rule set may run over one file before the file is reported as not scanned.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(60);

/// A compiled rule set.
pub struct Rules {
    rules: yara_x::Rules,
    /// The rule files compiled (besides the built-in set).
    pub files: Vec<PathBuf>,
    /// BLAKE3 of the built-in set and every rule file's bytes, in path order (hex, 128 bits):
    /// scans with equal fingerprints judged files by the same rules.
    pub fingerprint: String,
}

impl Rules {
    /// The built-in set, plus every `.yar`/`.yara` file under `path` (a file or a directory),
    /// each in its own namespace (its file stem), so two files may use the same rule names.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let mut compiler = yara_x::Compiler::new();
        compiler.new_namespace("builtin");
        compiler
            .add_source(BUILTIN)
            .map_err(|e| Error::Rules(format!("built-in rules: {e}")))?;
        let mut files = Vec::new();
        let mut hash = blake3::Hasher::new();
        hash.update(BUILTIN.as_bytes());
        if let Some(path) = path {
            collect(path, 0, &mut files)?;
            if files.is_empty() {
                return Err(Error::Rules(format!(
                    "{}: no .yar or .yara files",
                    path.display()
                )));
            }
            files.sort();
            for (i, f) in files.iter().enumerate() {
                let src =
                    std::fs::read(f).map_err(|e| Error::Rules(format!("{}: {e}", f.display())))?;
                hash.update(&(src.len() as u64).to_le_bytes());
                hash.update(&src);
                let stem = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let ns: String = stem
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                compiler.new_namespace(&format!("r{i}_{ns}"));
                compiler
                    .add_source(
                        yara_x::SourceCode::from(src.as_slice())
                            .with_origin(f.display().to_string()),
                    )
                    .map_err(|e| Error::Rules(format!("{}: {e}", f.display())))?;
            }
        }
        Ok(Rules {
            rules: compiler.build(),
            files,
            fingerprint: hex::encode(&hash.finalize().as_bytes()[..16]),
        })
    }

    /// A scanner over these rules, with the per-file time limit.
    pub fn scanner(&self) -> yara_x::Scanner<'_> {
        let mut s = yara_x::Scanner::new(&self.rules);
        s.set_timeout(SCAN_TIMEOUT);
        s
    }
}

/// The rules `bytes` match, as `namespace:rule` (the built-in ones as `builtin:rule`).
pub fn matches(scanner: &mut yara_x::Scanner<'_>, bytes: &[u8]) -> Result<Vec<String>, String> {
    let results = scanner.scan(bytes).map_err(|e| e.to_string())?;
    Ok(results
        .matching_rules()
        .map(|r| {
            let ns = r.namespace();
            // A user file's namespace is r<N>_<stem>: show the stem.
            let ns = ns
                .split_once('_')
                .filter(|(p, _)| p.starts_with('r'))
                .map_or(ns, |(_, s)| s);
            format!("{ns}:{}", r.identifier())
        })
        .collect())
}

fn collect(path: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::Rules(format!("{}: {e}", path.display())))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    if depth > MAX_DEPTH {
        return Ok(());
    }
    let entries =
        std::fs::read_dir(path).map_err(|e| Error::Rules(format!("{}: {e}", path.display())))?;
    for e in entries {
        let e = e.map_err(|e| Error::Rules(format!("{}: {e}", path.display())))?;
        let p = e.path();
        let ft = e
            .file_type()
            .map_err(|e| Error::Rules(format!("{}: {e}", p.display())))?;
        if ft.is_dir() {
            collect(&p, depth + 1, out)?;
        } else if ft.is_file() && p.extension().is_some_and(|x| x == "yar" || x == "yara") {
            out.push(p);
        }
        if out.len() > MAX_RULE_FILES {
            return Err(Error::Rules(format!(
                "{}: more than {MAX_RULE_FILES} rule files",
                path.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_rules_match_their_markers_only() {
        let rules = Rules::load(None).unwrap();
        let mut s = rules.scanner();
        let hit = matches(&mut s, b"xx ELASTIO-ISCAN-TEST-MALWARE-5f0c1a yy").unwrap();
        assert_eq!(hit, ["builtin:elastio_test_malware"]);
        assert!(matches(&mut s, b"nothing to see").unwrap().is_empty());
    }

    #[test]
    fn rule_directories_compile_per_file_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(
            dir.path().join("sub/bad_actor.yar"),
            "rule planted { strings: $a = \"evil-marker\" condition: $a }",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a rule").unwrap();
        let rules = Rules::load(Some(dir.path())).unwrap();
        assert_eq!(rules.files.len(), 1);
        let mut s = rules.scanner();
        assert_eq!(
            matches(&mut s, b"an evil-marker here").unwrap(),
            ["bad_actor:planted"]
        );
        std::fs::write(dir.path().join("broken.yara"), "rule { nope").unwrap();
        let err = Rules::load(Some(dir.path())).err().unwrap().to_string();
        assert!(err.contains("broken.yara"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = Rules::load(Some(empty.path())).err().unwrap().to_string();
        assert!(err.contains("no .yar"), "{err}");
    }
}
