//! Filenames as uploaded become names that are safe to create in a run dir and to print on
//! the prompt's `Attached files:` line, while staying readable. The original is kept in the
//! database; only this name ever touches a path.

/// The longest stored name, in bytes. Filesystems allow 255; this leaves room for the `-N`
/// that [`distinct`] may add and keeps the prompt line short.
pub const MAX_NAME_BYTES: usize = 120;
/// The longest extension (with its dot) kept whole when a long name is shortened.
const MAX_EXT_BYTES: usize = 16;
/// The name of a file whose own name leaves nothing usable.
const FALLBACK: &str = "file";

/// Windows device names, which other systems' tools may still trip over when the agent's
/// output travels on (`CON`, `con.txt`, `LPT1.log`).
const DEVICE_NAMES: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// The stored name for an uploaded `original`:
/// - only its last path component counts (`/` and `\` both separate, so
///   `../../etc/passwd` and `C:\Users\me\a.pdf` keep `passwd` and `a.pdf`);
/// - control characters (NUL, newlines, tabs, DEL, C1), invisible format characters (bidi
///   overrides, zero-width) and `: * ? " < > |` become `_`; surrounding whitespace goes;
/// - nothing left, or only dots (`.`, `..`), becomes `file`;
/// - longer than [`MAX_NAME_BYTES`] bytes, the stem is cut on a character boundary and a
///   short extension is kept;
/// - then a leading `.` or `-` (hidden files, names read as flags) and device names (`CON`)
///   get a `_` in front (after the cut, which can leave a device name: `con` and spaces).
///
/// A stored name is its own sanitised name.
pub fn sanitize(original: &str) -> String {
    let last = original
        .rsplit(['/', '\\'])
        .find(|part| !part.trim().is_empty())
        .unwrap_or("");
    let cleaned: String = last
        .chars()
        .map(|c| if is_unsafe(c) { '_' } else { c })
        .collect();
    let cleaned = cleaned.trim();
    if cleaned.chars().all(|c| c == '.') {
        return FALLBACK.to_string();
    }
    let name = shorten(cleaned.to_string());
    let stem = name.split('.').next().unwrap_or("");
    if name.starts_with(['.', '-'])
        || DEVICE_NAMES
            .iter()
            .any(|d| d.eq_ignore_ascii_case(stem.trim_end()))
    {
        // The `_` may push it one byte over; cutting the end again keeps the `_`.
        return shorten(format!("_{name}"));
    }
    name
}

fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')
        || matches!(c,
            '\u{00AD}'                  // soft hyphen
            | '\u{061C}'                // Arabic letter mark
            | '\u{180E}'                // Mongolian vowel separator
            | '\u{200B}'..='\u{200F}'   // zero-width, LRM, RLM
            | '\u{202A}'..='\u{202E}'   // bidi embeddings and overrides
            | '\u{2060}'..='\u{206F}'   // word joiner, bidi isolates, invisible operators
            | '\u{FEFF}'                // zero-width no-break space (BOM)
            | '\u{FFF9}'..='\u{FFFB}') // interlinear annotation
}

/// Splits `name` into stem and extension (with its dot); a leading dot is not an extension.
fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    }
}

fn shorten(name: String) -> String {
    if name.len() <= MAX_NAME_BYTES {
        return name;
    }
    let (stem, ext) = match split_ext(&name) {
        (stem, ext) if ext.len() <= MAX_EXT_BYTES => (stem, ext),
        _ => (name.as_str(), ""),
    };
    let mut end = MAX_NAME_BYTES - ext.len();
    while !stem.is_char_boundary(end) {
        end -= 1;
    }
    // Whatever whitespace the cut exposes goes too (not only ASCII spaces: U+2007 and the
    // like), so the result has no surrounding whitespace and sanitising it again is a no-op.
    let stem = stem[..end].trim_end_matches(|c: char| c == '.' || c.is_whitespace());
    if stem.is_empty() {
        return FALLBACK.to_string();
    }
    format!("{stem}{ext}")
}

/// `name`, or `stem-2.ext`, `stem-3.ext`, ... : the first that is not in `taken`. Used when
/// several attachments of one run share a stored name, so none overwrites another.
pub fn distinct(name: &str, taken: &[String]) -> String {
    if !taken.iter().any(|t| t == name) {
        return name.to_string();
    }
    let (stem, ext) = split_ext(name);
    (2..)
        .map(|n| format!("{stem}-{n}{ext}"))
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or_else(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_safe(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && name != "."
            && name != ".."
            && !name.starts_with(['.', '-'])
            && !name.chars().any(is_unsafe)
            && name.trim() == name
    }

    #[test]
    fn names_become_safe_and_stay_readable() {
        for (original, stored) in [
            // Ordinary names stay as they are.
            ("a.pdf", "a.pdf"),
            ("my report (final).docx", "my report (final).docx"),
            ("Übersicht 2026.xlsx", "Übersicht 2026.xlsx"),
            ("数据.csv", "数据.csv"),
            ("archive.tar.gz", "archive.tar.gz"),
            ("README", "README"),
            ("a,b;c=d+e&f#1.txt", "a,b;c=d+e&f#1.txt"),
            // Only the last path component is kept.
            ("../../etc/passwd", "passwd"),
            ("/etc/passwd", "passwd"),
            ("C:\\Users\\me\\a.pdf", "a.pdf"),
            ("..\\..\\boot.ini", "boot.ini"),
            ("dir/sub/", "sub"),
            ("a/../..", "file"),
            // Reserved names.
            ("", "file"),
            ("   ", "file"),
            (".", "file"),
            ("..", "file"),
            ("...", "file"),
            ("/", "file"),
            (".bashrc", "_.bashrc"),
            ("-rf", "_-rf"),
            ("--help.txt", "_--help.txt"),
            ("CON", "_CON"),
            ("con.txt", "_con.txt"),
            ("lpt1", "_lpt1"),
            ("CONFIG.txt", "CONFIG.txt"),
            // Control, invisible and reserved characters.
            ("a\0b.txt", "a_b.txt"),
            ("line\nbreak.txt", "line_break.txt"),
            ("tab\there\r.txt", "tab_here_.txt"),
            ("del\u{7f}.txt", "del_.txt"),
            ("c1\u{85}.txt", "c1_.txt"),
            ("evil\u{202E}fdp.exe", "evil_fdp.exe"),
            ("zero\u{200B}width.txt", "zero_width.txt"),
            ("what?.txt", "what_.txt"),
            ("a:b*c\"d<e>f|g.txt", "a_b_c_d_e_f_g.txt"),
            // What is left after replacing must not start a hidden file either.
            ("\n.hidden", "_.hidden"),
        ] {
            assert_eq!(sanitize(original), stored, "{original:?}");
        }
    }

    #[test]
    fn long_names_are_cut_keeping_the_extension() {
        let long = format!("{}.pdf", "a".repeat(10_000));
        let s = sanitize(&long);
        assert_eq!(s.len(), MAX_NAME_BYTES);
        assert!(s.ends_with("aaa.pdf"), "{s}");

        // Multi-byte characters are never split.
        let wide = format!("{}.txt", "é".repeat(5_000));
        let s = sanitize(&wide);
        assert!(s.len() <= MAX_NAME_BYTES && s.ends_with("é.txt"), "{s}");

        // An "extension" too long to be one is cut like the rest.
        let s = sanitize(&format!("a.{}", "b".repeat(500)));
        assert_eq!(s.len(), MAX_NAME_BYTES);
        assert!(s.starts_with("a.bbb"));

        // Cutting does not leave a stem ending in dots or spaces.
        let s = sanitize(&format!("{}{}.txt", "x".repeat(110), " .".repeat(20)));
        assert_eq!(s, format!("{}.txt", "x".repeat(110)));
    }

    #[test]
    fn a_cut_that_leaves_a_device_name_still_gets_its_underscore() {
        // Found by fuzz/fuzz_targets/filename.rs: `con`, 141 spaces and more was checked
        // for a device name before the cut, which then left plain `con`.
        let s = sanitize(&format!("con{}x9", " ".repeat(141)));
        assert_eq!(s, "_con");
        assert_eq!(sanitize(&s), s);
        // Prefixing a name already at the limit cuts it again, keeping the extension.
        let s = sanitize(&format!(".{}.txt", "a".repeat(200)));
        assert_eq!(s.len(), MAX_NAME_BYTES);
        assert!(s.starts_with("_.aaa") && s.ends_with("a.txt"), "{s}");
        assert_eq!(sanitize(&s), s);
    }

    #[test]
    fn a_cut_never_ends_in_whitespace_and_sanitising_twice_changes_nothing() {
        // Found by fuzz/fuzz_targets/filename.rs: a cut right after a figure space (U+2007)
        // left it at the end, and a second pass trimmed it.
        let long = format!("{}\u{2007}{}", "x".repeat(117), "y".repeat(50));
        let s = sanitize(&long);
        assert_eq!(s, "x".repeat(117));
        assert_eq!(sanitize(&s), s);
        let with_ext = format!("{}\u{3000}{}.txt", "x".repeat(110), "y".repeat(50));
        let s = sanitize(&with_ext);
        assert!(s.trim() == s && s.ends_with(".txt"), "{s:?}");
        assert_eq!(sanitize(&s), s);
    }

    #[test]
    fn every_result_is_safe() {
        let nasty = [
            "../../etc/passwd",
            "/abs/olute",
            "a\0b",
            "\0",
            "\u{1}\u{2}\u{3}",
            ". .",
            "-",
            ".",
            "..",
            "",
            "CON",
            " lead and trail ",
            "\u{202E}",
            &"ü".repeat(10_000),
            &"/".repeat(100),
            &format!(".{}", "x".repeat(300)),
        ];
        for name in nasty {
            let s = sanitize(name);
            assert!(is_safe(&s), "{name:?} -> {s:?}");
        }
    }

    #[test]
    fn distinct_names_within_a_run() {
        let mut taken = Vec::new();
        for _ in 0..3 {
            let n = distinct("a.txt", &taken);
            taken.push(n);
        }
        assert_eq!(taken, ["a.txt", "a-2.txt", "a-3.txt"]);

        // A real file already called a-2.txt is not overwritten either.
        let taken = vec!["a.txt".to_string(), "a-2.txt".to_string()];
        assert_eq!(distinct("a.txt", &taken), "a-3.txt");
        assert_eq!(distinct("README", &["README".into()]), "README-2");
        assert_eq!(distinct("x.tar.gz", &["x.tar.gz".into()]), "x.tar-2.gz");
        assert_eq!(distinct("b.txt", &taken), "b.txt");
    }
}
