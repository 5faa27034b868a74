//! Magic numbers, and what a file's extension promises.
//!
//! A file of uniform bytes is explained when it starts with the magic of a format that is
//! dense by nature (xz, zip, JPEG, an age or LUKS container …) and its extension does not
//! promise something else. Ciphertext has no magic: a `.docx` that is no longer a zip, or a
//! `.txt` of uniform bytes, is what ransomware leaves.

/// A format recognised by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub name: &'static str,
    /// Uniform content is normal in this format (compressed, media, encrypted containers).
    pub dense: bool,
}

/// (name, offset, magic, dense)
const MAGICS: &[(&str, usize, &[u8], bool)] = &[
    ("zip", 0, b"PK\x03\x04", true),
    ("zip", 0, b"PK\x05\x06", true),
    ("zip", 0, b"PK\x07\x08", true),
    // With its method byte (deflate): two bytes alone are too easy to meet by chance.
    ("gzip", 0, b"\x1f\x8b\x08", true),
    ("xz", 0, b"\xfd7zXZ\x00", true),
    ("zstd", 0, b"\x28\xb5\x2f\xfd", true),
    ("bzip2", 0, b"BZh", true),
    ("7z", 0, b"7z\xbc\xaf\x27\x1c", true),
    ("rar", 0, b"Rar!\x1a\x07", true),
    ("lz4", 0, b"\x04\x22\x4d\x18", true),
    ("jpeg", 0, b"\xff\xd8\xff", true),
    ("png", 0, b"\x89PNG\r\n\x1a\n", true),
    ("gif", 0, b"GIF8", true),
    ("webp", 8, b"WEBP", true),
    ("mp4", 4, b"ftyp", true),
    ("mp3", 0, b"ID3", true),
    ("ogg", 0, b"OggS", true),
    ("flac", 0, b"fLaC", true),
    ("pdf", 0, b"%PDF-", true),
    ("age", 0, b"age-encryption.org/", true),
    ("luks", 0, b"LUKS\xba\xbe", true),
    ("kdbx", 0, b"\x03\xd9\xa2\x9a", true),
    ("deb", 0, b"!<arch>\ndebian", true),
    ("rpm", 0, b"\xed\xab\xee\xdb", true),
    ("ole2", 0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", false),
    ("sqlite", 0, b"SQLite format 3\x00", false),
    ("elf", 0, b"\x7fELF", false),
    ("pe", 0, b"MZ", false),
    ("class", 0, b"\xca\xfe\xba\xbe", false),
    ("wasm", 0, b"\x00asm", false),
    ("psd", 0, b"8BPS", false),
    ("tiff", 0, b"II*\x00", false),
    ("tiff", 0, b"MM\x00*", false),
    ("qcow2", 0, b"QFI\xfb", true),
    ("matroska", 0, b"\x1a\x45\xdf\xa3", true),
    ("squashfs", 0, b"hsqs", true),
    ("avi", 8, b"AVI ", true),
    ("wav", 8, b"WAVE", false),
    ("tar", 257, b"ustar", false),
];

/// The format `head` (a file's first bytes) starts with.
pub fn detect(head: &[u8]) -> Option<Format> {
    MAGICS
        .iter()
        .find(|(_, at, magic, _)| head.get(*at..at + magic.len()) == Some(*magic))
        .map(|&(name, _, _, dense)| Format { name, dense })
}

/// What an extension promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promise {
    /// One of these formats' magic.
    Formats(&'static [&'static str]),
    /// Text: no magic, never uniform.
    Text,
}

/// What a file named with extension `ext` (lower case, no dot) must look like, if elastio
/// knows the extension.
pub fn promise(ext: &str) -> Option<Promise> {
    use Promise::*;
    Some(match ext {
        // A password-protected OOXML document is an OLE2 container.
        "docx" | "xlsx" | "pptx" => Formats(&["zip", "ole2"]),
        "zip" | "odt" | "ods" | "odp" | "jar" | "apk" | "epub" | "whl" | "xpi" | "nupkg" => {
            Formats(&["zip"])
        }
        "gz" | "tgz" => Formats(&["gzip"]),
        "xz" | "txz" => Formats(&["xz"]),
        "zst" | "zstd" | "tzst" => Formats(&["zstd"]),
        "bz2" | "tbz2" => Formats(&["bzip2"]),
        "7z" => Formats(&["7z"]),
        "rar" => Formats(&["rar"]),
        "jpg" | "jpeg" => Formats(&["jpeg"]),
        "png" => Formats(&["png"]),
        "gif" => Formats(&["gif"]),
        "webp" => Formats(&["webp"]),
        "mp4" | "m4a" | "m4v" | "mov" | "heic" => Formats(&["mp4"]),
        "ogg" | "opus" => Formats(&["ogg"]),
        "mkv" | "webm" | "mka" => Formats(&["matroska"]),
        "squashfs" | "snap" => Formats(&["squashfs"]),
        "avi" => Formats(&["avi"]),
        "flac" => Formats(&["flac"]),
        "pdf" => Formats(&["pdf"]),
        "doc" | "xls" | "ppt" | "msg" | "msi" => Formats(&["ole2"]),
        "sqlite" | "sqlite3" => Formats(&["sqlite"]),
        "exe" | "dll" | "sys" => Formats(&["pe"]),
        "so" | "o" => Formats(&["elf"]),
        "deb" => Formats(&["deb"]),
        "rpm" => Formats(&["rpm"]),
        "psd" => Formats(&["psd"]),
        "tif" | "tiff" => Formats(&["tiff"]),
        "qcow2" => Formats(&["qcow2"]),
        "tar" => Formats(&["tar"]),
        "txt" | "log" | "csv" | "tsv" | "json" | "xml" | "html" | "htm" | "md" | "rst" | "ini"
        | "conf" | "cfg" | "yaml" | "yml" | "toml" | "sql" | "c" | "h" | "cc" | "cpp" | "hpp"
        | "rs" | "go" | "py" | "rb" | "pl" | "sh" | "js" | "ts" | "java" | "cs" | "php" | "css"
        | "svg" | "tex" | "rtf" | "eml" => Text,
        _ => return None,
    })
}

/// Formats whose content is uniform by nature (range coders, ciphertext containers): a file
/// that is one, and is named as one, may turn uniform without being suspect.
pub fn uniform_by_nature(format: &str) -> bool {
    matches!(format, "xz" | "7z" | "rar" | "age" | "luks" | "kdbx")
}

/// Extensions of files encrypted on purpose (keys, vaults, PGP): a new one of uniform bytes is
/// expected.
pub fn encrypted_by_design(ext: &str) -> bool {
    matches!(
        ext,
        "gpg" | "pgp" | "asc" | "age" | "kdbx" | "p12" | "pfx" | "jks" | "keystore" | "aes"
    )
}

/// Extensions ransomware families are known to append. Only ever a signal together with
/// uniform content and no magic.
pub fn ransomware_extension(ext: &str) -> bool {
    matches!(
        ext,
        "locked"
            | "encrypted"
            | "crypt"
            | "crypted"
            | "lockbit"
            | "locky"
            | "wncry"
            | "wnry"
            | "cerber"
            | "ryk"
            | "conti"
            | "akira"
            | "phobos"
            | "djvu"
            | "ransom"
            | "crab"
    )
}

/// The extension of a file name: after the last dot, lower case; none for dot files without
/// another dot, names ending in a dot, or more than 16 bytes.
pub fn extension(name: &[u8]) -> Option<String> {
    let dot = name.iter().rposition(|&b| b == b'.')?;
    let ext = &name[dot + 1..];
    if dot == 0 || ext.is_empty() || ext.len() > 16 || !ext.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    Some(String::from_utf8_lossy(ext).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_and_promises_agree() {
        assert_eq!(detect(b"PK\x03\x04rest").map(|f| f.name), Some("zip"));
        assert_eq!(
            detect(b"\xfd7zXZ\x00..").map(|f| (f.name, f.dense)),
            Some(("xz", true))
        );
        assert_eq!(
            detect(b"\x7fELF\x02").map(|f| (f.name, f.dense)),
            Some(("elf", false))
        );
        assert_eq!(
            detect(b"MZ"),
            Some(Format {
                name: "pe",
                dense: false
            })
        );
        assert_eq!(detect(b"hello"), None);
        assert_eq!(detect(b""), None);
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(detect(&tar).map(|f| f.name), Some("tar"));
        // Every format a promise names is one detect() can find.
        for ext in [
            "docx", "gz", "xz", "zst", "jpg", "png", "pdf", "doc", "exe", "so", "tar",
        ] {
            let Some(Promise::Formats(names)) = promise(ext) else {
                panic!("{ext}")
            };
            for n in names {
                assert!(MAGICS.iter().any(|m| m.0 == *n), "{ext}: {n}");
            }
        }
        assert_eq!(promise("log"), Some(Promise::Text));
        assert_eq!(promise("locked"), None);
    }

    #[test]
    fn extensions() {
        assert_eq!(extension(b"report.DOCX").as_deref(), Some("docx"));
        assert_eq!(extension(b"a.tar.gz").as_deref(), Some("gz"));
        assert_eq!(extension(b"report.docx.locked").as_deref(), Some("locked"));
        assert_eq!(extension(b".bashrc"), None);
        assert_eq!(extension(b"Makefile"), None);
        assert_eq!(extension(b"x."), None);
        assert_eq!(extension(b"x.a b"), None);
        assert!(ransomware_extension("locked") && !ransomware_extension("log"));
    }
}
