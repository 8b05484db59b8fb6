//! Response headers an app handler may set: names must be RFC 9110 tokens, values free of
//! control characters (CR/LF/NUL would split the response), and the headers that frame
//! the message stay the server's.

/// Why a handler's header was refused; the message names the header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The name is empty or has a character outside RFC 9110's `tchar`.
    #[error("invalid response header name {0:?}: use letters, digits and !#$%&'*+-.^_`|~")]
    Name(String),
    /// The value holds a control character (CR, LF, NUL, ...), which could end the
    /// header and inject others.
    #[error(
        "invalid value for response header '{0}': control characters (CR, LF, NUL) are not allowed"
    )]
    Value(String),
    /// A header that frames the response (its length, encoding, connection); the server
    /// sets these itself, and a second copy would let a handler smuggle a response.
    #[error("response header '{0}' is set by the server; a handler may not set it")]
    Reserved(String),
}

/// Headers that decide how the response is framed on the connection.
const RESERVED: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "keep-alive",
    "trailer",
];

/// RFC 9110 §5.6.2: `token = 1*tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks one handler header. Values may hold visible ASCII, spaces, tabs and
/// non-ASCII text (`obs-text`), but no other control character.
pub fn check(name: &str, value: &str) -> Result<(), HeaderError> {
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(HeaderError::Name(name.to_string()));
    }
    if RESERVED.iter().any(|r| name.eq_ignore_ascii_case(r)) {
        return Err(HeaderError::Reserved(name.to_string()));
    }
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(HeaderError::Value(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_headers_pass() {
        for (k, v) in [
            ("X-A", "a"),
            ("Cache-Control", "max-age=60, public"),
            ("x-weird!#$%&'*+-.^_`|~", "tab\tand ümlaut"),
            ("Set-Cookie", "a=b; Path=/; HttpOnly"),
            ("X-Empty", ""),
        ] {
            assert_eq!(check(k, v), Ok(()), "{k}: {v}");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        for k in [
            "",
            "X A",
            "X:A",
            "X-A\r\nInjected",
            "Ü",
            "a\0",
            "(x)",
            "a/b",
        ] {
            assert_eq!(
                check(k, "v"),
                Err(HeaderError::Name(k.to_string())),
                "{k:?}"
            );
        }
    }

    #[test]
    fn control_characters_in_values_are_refused() {
        for v in [
            "a\r\nInjected: yes",
            "a\nb",
            "a\rb",
            "a\0b",
            "a\x1bb",
            "a\x7fb",
        ] {
            assert_eq!(
                check("X-A", v),
                Err(HeaderError::Value("X-A".into())),
                "{v:?}"
            );
        }
    }

    #[test]
    fn framing_headers_stay_the_servers() {
        for k in [
            "Content-Length",
            "transfer-encoding",
            "Connection",
            "Upgrade",
        ] {
            assert!(
                matches!(check(k, "1"), Err(HeaderError::Reserved(_))),
                "{k}"
            );
        }
        let msg = check("X-A", "a\r\nb").unwrap_err().to_string();
        assert!(msg.contains("'X-A'"), "{msg}");
    }
}
