//! Ransom notes: the names families drop them under, and the Tor addresses they carry.

/// Largest file looked at as a possible note.
pub const MAX_NOTE_BYTES: u64 = 64 * 1024;

/// Words in the names ransomware gives its notes (`HOW_TO_DECRYPT.txt`,
/// `Restore-My-Files.txt`, `!!!READ_ME!!!.hta`, `_readme.txt` …), compared lower case with `-`,
/// ` ` and `.` read as `_`.
const NOTE_WORDS: &[&str] = &[
    "decrypt",
    "ransom",
    "restore_my_files",
    "restore_files",
    "recover_files",
    "recover_my_files",
    "how_to_recover",
    "how_to_restore",
    "your_files",
    "files_encrypted",
    "files_are_encrypted",
    "read_me_now",
    "!!!read_me",
    "!!!_read_me",
];

/// Whole names (stem, lower case) too common a word to be listed above.
const NOTE_STEMS: &[&str] = &["_readme", "!readme!", "readme_now", "read_me!!!"];

/// Whether a file named `name` is named like a ransom note.
pub fn is_note_name(name: &[u8]) -> bool {
    let lower: String = String::from_utf8_lossy(name)
        .to_ascii_lowercase()
        .chars()
        .map(|c| if matches!(c, '-' | ' ' | '.') { '_' } else { c })
        .collect();
    if NOTE_WORDS.iter().any(|w| lower.contains(w)) {
        return true;
    }
    let raw = String::from_utf8_lossy(name).to_ascii_lowercase();
    let stem = raw.rsplit_once('.').map_or(raw.as_str(), |(s, _)| s);
    NOTE_STEMS.contains(&stem)
}

/// Whether a text reads like a ransom note: it speaks of encryption (what it sells) and of
/// getting paid or contacted (how it sells it). Source code that decrypts things does the
/// first only.
pub fn reads_like_ransom(text: &[u8]) -> bool {
    let lower = String::from_utf8_lossy(&text[..text.len().min(MAX_NOTE_BYTES as usize)])
        .to_ascii_lowercase();
    let crypto = ["encrypt", "decrypt", "crypted", "ransom"];
    let sell = [
        "bitcoin",
        "btc",
        "monero",
        "xmr",
        "payment",
        "pay ",
        "tor browser",
        ".onion",
        "contact",
        "your id",
        "personal id",
        "price",
        "recover your",
        "restore your",
        "decryptor",
    ];
    crypto.iter().any(|w| lower.contains(w)) && sell.iter().any(|w| lower.contains(w))
}

/// Whether a file with extension `ext` can be a note people open (text, web pages, HTA).
pub fn is_note_extension(ext: Option<&str>) -> bool {
    matches!(
        ext,
        None | Some("txt" | "html" | "htm" | "hta" | "rtf" | "md" | "url" | "log" | "nfo")
    )
}

/// The first Tor onion address in `text` (v3: 56 base32 characters, v2: 16), if any.
pub fn onion_address(text: &[u8]) -> Option<String> {
    const SUFFIX: &[u8] = b".onion";
    let is_b32 = |b: u8| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b);
    let mut from = 0;
    while let Some(pos) = find(&text[from..], SUFFIX) {
        let end = from + pos;
        let start = text[..end]
            .iter()
            .rposition(|&b| !is_b32(b.to_ascii_lowercase()))
            .map_or(0, |p| p + 1);
        let len = end - start;
        if len == 56 || len == 16 {
            return Some(String::from_utf8_lossy(&text[start..end + SUFFIX.len()]).into_owned());
        }
        from = end + SUFFIX.len();
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn note_names() {
        for n in [
            "HOW_TO_DECRYPT.txt",
            "Restore-My-Files.txt",
            "!!!READ_ME!!!.hta",
            "_readme.txt",
            "YOUR_FILES_ARE_ENCRYPTED.html",
            "how to recover files.txt",
        ] {
            assert!(is_note_name(n.as_bytes()), "{n}");
        }
        for n in [
            "README.md",
            "readme.txt",
            "restore.log",
            "notes.txt",
            "decoder.py.orig",
        ] {
            assert!(!is_note_name(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn ransom_vocabulary() {
        assert!(reads_like_ransom(
            b"All your files are encrypted. Pay 0.5 BTC to get the decryptor."
        ));
        assert!(!reads_like_ransom(
            b"int decrypt(const uint8_t *key, uint8_t *buf);"
        ));
        assert!(!reads_like_ransom(b"invoice: please pay by friday"));
        assert!(is_note_extension(Some("txt")) && is_note_extension(None));
        assert!(!is_note_extension(Some("js")) && !is_note_extension(Some("gz")));
    }

    #[test]
    fn onion_addresses() {
        let v3 = "vww6ybal4bd7szmgncyruucpgfkqahzddi37ktceo3ah7ngmcopnpyyd";
        assert_eq!(v3.len(), 56);
        let note = format!("Your files are encrypted. Visit http://{v3}.onion/pay to recover.");
        assert_eq!(onion_address(note.as_bytes()), Some(format!("{v3}.onion")));
        assert_eq!(
            onion_address(b"see expyuzz4wqqyqhjn.onion now").as_deref(),
            Some("expyuzz4wqqyqhjn.onion")
        );
        assert_eq!(
            onion_address(b"a .onion address is how Tor names services"),
            None
        );
        assert_eq!(onion_address(b"short.onion"), None);
        assert_eq!(onion_address(b""), None);
    }
}
