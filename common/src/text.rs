//! Text a peer sent (an agent's dial-failure reason, its id or version), made fit to show: in a
//! text log, a status page, JSON or an HTTP body, where a line break forges a log line and a
//! bidirectional override (U+202E) makes a file name read backwards.
//!
//! One rule, [`is_unprintable`], for both uses: [`sanitize`] rewrites a free-form text such as
//! a reason, and a validator refuses an identifier that holds such a character.

/// The Unicode format characters (general category `Cf`), as inclusive ranges in code point
/// order: `DerivedGeneralCategory.txt` of the Unicode Character Database 16.0 (170 code points;
/// the set has been the same since Unicode 15.0). Rust's standard library has no general
/// category lookup, and a crate for these 21 ranges would cost more than it saves. A format
/// character new in a later Unicode version is kept by [`sanitize`] until added here.
const FORMAT: [(char, char); 21] = [
    ('\u{00AD}', '\u{00AD}'),   // SOFT HYPHEN
    ('\u{0600}', '\u{0605}'),   // ARABIC NUMBER SIGN..ARABIC NUMBER MARK ABOVE
    ('\u{061C}', '\u{061C}'),   // ARABIC LETTER MARK
    ('\u{06DD}', '\u{06DD}'),   // ARABIC END OF AYAH
    ('\u{070F}', '\u{070F}'),   // SYRIAC ABBREVIATION MARK
    ('\u{0890}', '\u{0891}'),   // ARABIC POUND MARK ABOVE..ARABIC PIASTRE MARK ABOVE
    ('\u{08E2}', '\u{08E2}'),   // ARABIC DISPUTED END OF AYAH
    ('\u{180E}', '\u{180E}'),   // MONGOLIAN VOWEL SEPARATOR
    ('\u{200B}', '\u{200F}'),   // ZERO WIDTH SPACE..RIGHT-TO-LEFT MARK
    ('\u{202A}', '\u{202E}'),   // LEFT-TO-RIGHT EMBEDDING..RIGHT-TO-LEFT OVERRIDE
    ('\u{2060}', '\u{2064}'),   // WORD JOINER..INVISIBLE PLUS
    ('\u{2066}', '\u{206F}'),   // LEFT-TO-RIGHT ISOLATE..NOMINAL DIGIT SHAPES
    ('\u{FEFF}', '\u{FEFF}'),   // ZERO WIDTH NO-BREAK SPACE (byte order mark)
    ('\u{FFF9}', '\u{FFFB}'),   // INTERLINEAR ANNOTATION ANCHOR..TERMINATOR
    ('\u{110BD}', '\u{110BD}'), // KAITHI NUMBER SIGN
    ('\u{110CD}', '\u{110CD}'), // KAITHI NUMBER SIGN ABOVE
    ('\u{13430}', '\u{1343F}'), // EGYPTIAN HIEROGLYPH VERTICAL JOINER..END WALLED ENCLOSURE
    ('\u{1BCA0}', '\u{1BCA3}'), // SHORTHAND FORMAT LETTER OVERLAP..UP STEP
    ('\u{1D173}', '\u{1D17A}'), // MUSICAL SYMBOL BEGIN BEAM..END PHRASE
    ('\u{E0001}', '\u{E0001}'), // LANGUAGE TAG
    ('\u{E0020}', '\u{E007F}'), // TAG SPACE..CANCEL TAG
];

/// Whether `c` is a Unicode format character (general category `Cf`): invisible, and some
/// (the bidirectional overrides and isolates) reorder the text around them.
pub fn is_format(c: char) -> bool {
    FORMAT
        .binary_search_by(|&(first, last)| {
            if last < c {
                std::cmp::Ordering::Less
            } else if first > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Whether `c` must not appear in text shown to people or written to a log: a control
/// character (general category `Cc`: CR, LF, TAB, NEL U+0085...), a format character
/// ([`is_format`]), or a line or paragraph separator (U+2028, U+2029: JavaScript, editors and
/// some log viewers end a line there).
pub fn is_unprintable(c: char) -> bool {
    c.is_control() || is_format(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// What marks a text [`sanitize`] cut short.
pub const ELLIPSIS: char = '…';

/// `text` made printable and at most `max_bytes` bytes long: control characters and line or
/// paragraph separators become a space (so `a\r\nb` stays two words on one line), format
/// characters are dropped, and a text too long is cut on a character boundary and ends with
/// [`ELLIPSIS`] (which counts towards `max_bytes`). The work is bounded by the input's length,
/// whatever it holds.
pub fn sanitize(text: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_bytes));
    for c in text.chars() {
        if is_format(c) {
            continue;
        }
        let c = if is_unprintable(c) { ' ' } else { c };
        if out.len() + c.len_utf8() > max_bytes {
            // Room for the ellipsis, where there is any.
            let room = max_bytes.saturating_sub(ELLIPSIS.len_utf8());
            if max_bytes >= ELLIPSIS.len_utf8() {
                while out.len() > room {
                    out.pop();
                }
                out.push(ELLIPSIS);
            }
            break;
        }
        out.push(c);
    }
    out
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_and_controls_become_spaces() {
        assert_eq!(
            sanitize(
                "a\r\nb\tc\u{0}d\u{7f}e\u{85}f\u{2028}g\u{2029}h\u{b}\u{c}i",
                100
            ),
            "a  b c d e f g h  i"
        );
    }

    #[test]
    fn format_characters_are_dropped() {
        assert_eq!(sanitize("evil\u{202E}txt.exe", 100), "eviltxt.exe");
        assert_eq!(
            sanitize("\u{FEFF}zero\u{200B}width\u{2066}iso\u{2069}\u{E0041}", 100),
            "zerowidthiso"
        );
        assert_eq!(sanitize("soft\u{AD}hyphen", 100), "softhyphen");
    }

    #[test]
    fn printable_text_is_kept_as_it_is() {
        let text = "dial tcp 10.0.0.1:443: connection refused (é, 日本, 🙂, \"quoted\", <b>)";
        assert_eq!(sanitize(text, 1000), text);
        assert_eq!(sanitize("", 10), "");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_with_an_ellipsis() {
        assert_eq!(sanitize("abcdef", 6), "abcdef");
        assert_eq!(sanitize("abcdefg", 6), "abc…");
        // "é" is two bytes: never split.
        let cut = sanitize(&"é".repeat(100), 10);
        assert_eq!(cut, "ééé…");
        assert!(cut.len() <= 10);
        for max in 0..40 {
            let cut = sanitize(&"日本語🙂x".repeat(10), max);
            assert!(cut.len() <= max, "{max}: {cut:?}");
        }
        // No room for the ellipsis: just cut.
        assert_eq!(sanitize("abcdef", 2), "ab");
        assert_eq!(sanitize("abcdef", 0), "");
        // Dropped characters cost nothing, so a flood of them leaves the text whole.
        let flood = format!("{}ok", "\u{200B}".repeat(10_000));
        assert_eq!(sanitize(&flood, 10), "ok");
    }

    #[test]
    fn the_output_never_holds_what_it_removes() {
        let nasty: String = (0u32..0x3000)
            .chain(0xE0000..0xE0100)
            .chain(0xFFF0..0x10000)
            .filter_map(char::from_u32)
            .collect();
        let out = sanitize(&nasty, usize::MAX);
        assert!(!out.chars().any(is_unprintable));
        assert!(!out.contains(['\r', '\n', '\u{2028}', '\u{202E}']));
    }

    #[test]
    fn the_format_table_is_sorted_and_matches_known_characters() {
        assert!(FORMAT.windows(2).all(|w| w[0].1 < w[1].0));
        assert!(FORMAT.iter().all(|(first, last)| first <= last));
        let count: u32 = FORMAT
            .iter()
            .map(|&(first, last)| last as u32 - first as u32 + 1)
            .sum();
        assert_eq!(count, 170, "Unicode 16.0 has 170 Cf code points");
        for c in [
            '\u{202E}',
            '\u{200B}',
            '\u{FEFF}',
            '\u{2066}',
            '\u{E0001}',
            '\u{AD}',
        ] {
            assert!(is_format(c), "U+{:04X}", c as u32);
        }
        assert!(is_format('\u{1343F}'), "the last added, in Unicode 15.0");
        for c in [
            'a',
            ' ',
            '\u{2028}',
            '\u{85}',
            '\u{2065}',
            '\u{E0000}',
            '\u{13440}',
        ] {
            assert!(!is_format(c), "U+{:04X}", c as u32);
        }
        for c in [
            '\u{2028}', '\u{2029}', '\u{85}', '\r', '\n', '\t', '\u{202E}',
        ] {
            assert!(is_unprintable(c), "U+{:04X}", c as u32);
        }
        for c in ['a', ' ', 'é', '\u{A0}', '🙂'] {
            assert!(!is_unprintable(c), "U+{:04X}", c as u32);
        }
    }
}
