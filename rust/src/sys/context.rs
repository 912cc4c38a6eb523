//! An `io::Error` that says what was being done, or what to do about it,
//! and keeps the errno.
//!
//! `io::Error::new(kind, format!(..))` keeps the message but drops the raw
//! errno, so Python would get an `OSError` without `errno` (and without
//! the subclass, such as `PermissionError`, that CPython picks from it).

use std::fmt;
use std::io;

/// `err` with `what` in front of its message, its errno kept.
pub fn context(err: io::Error, what: impl fmt::Display) -> io::Error {
    let errno = errno(&err);
    let message = format!("{what}: {}", plain(&err));
    io::Error::new(err.kind(), Context { errno, message })
}

/// `err` with `hint` (what to do about it) after its message, its errno kept.
pub fn hint(err: io::Error, hint: impl fmt::Display) -> io::Error {
    let errno = err
        .raw_os_error()
        .or_else(|| errno_and_message(&err).map(|(n, _)| n));
    let message = format!("{} ({hint})", plain(&err));
    io::Error::new(err.kind(), Context { errno, message })
}

/// The errno of `err`, whether raw or kept by [`context`] or [`hint`].
pub fn errno(err: &io::Error) -> Option<i32> {
    err.raw_os_error()
        .or_else(|| errno_and_message(err).map(|(n, _)| n))
}

/// The errno and message of an error made by [`context`], if `err` is one.
pub fn errno_and_message(err: &io::Error) -> Option<(i32, &str)> {
    let ctx = err.get_ref()?.downcast_ref::<Context>()?;
    Some((ctx.errno?, ctx.message.as_str()))
}

/// The message of `err` without Rust's " (os error N)" suffix: the errno
/// travels on its own.
fn plain(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(at) if err.raw_os_error().is_some() => text[..at].to_string(),
        _ => text,
    }
}

#[derive(Debug)]
struct Context {
    errno: Option<i32>,
    message: String,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Context {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_errno_under_the_message() {
        let e = context(
            io::Error::from_raw_os_error(libc::EPERM),
            "opening /dev/net/tun",
        );
        let (code, message) = errno_and_message(&e).expect("a context error");
        assert_eq!(code, libc::EPERM);
        assert!(message.starts_with("opening /dev/net/tun: Operation not permitted"));
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(errno_and_message(&io::Error::other("plain")).is_none());
        let e = hint(e, "needs CAP_NET_ADMIN");
        assert_eq!(errno(&e), Some(libc::EPERM));
        assert!(
            e.to_string()
                .ends_with("tun: Operation not permitted (needs CAP_NET_ADMIN)"),
            "{e}"
        );
    }
}
