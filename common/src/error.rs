//! Reporting errors with their causes. Error types say what was being done and keep the cause
//! as their `source`, never copied into their own message; whoever reports an error (a log
//! line, a refusal's body) prints the whole chain with [`chain`].

use std::error::Error;
use std::fmt;

/// An error whose concrete type varies (a file, a parser, a socket): kept as a source.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// `err` and its sources as one line, `what: why: deeper why`.
pub fn chain<'a>(err: &'a (dyn Error + 'static)) -> Chain<'a> {
    Chain(err)
}

/// The [`Display`](fmt::Display) of [`chain`].
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(&'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut err = self.0;
        write!(f, "{err}")?;
        // tonic's `Status` already prints its source (as `Debug`) in its own message: going on
        // would tell that cause twice.
        while !err.is::<tonic::Status>() {
            let Some(source) = err.source() else { break };
            write!(f, ": {source}")?;
            err = source;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("loading the file")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("reading the stream")]
    struct OverStatus(#[source] tonic::Status);

    #[test]
    fn every_cause_once() {
        let err = Outer(std::io::Error::other(Outer(std::io::Error::other(
            "disk on fire",
        ))));
        // An `io::Error` shows the error it wraps and hands on that error's source.
        assert_eq!(
            chain(&err).to_string(),
            "loading the file: loading the file: disk on fire"
        );
        let status = tonic::Status::from_error(Box::new(Outer(std::io::Error::other("gone"))));
        let shown = chain(&OverStatus(status)).to_string();
        assert!(shown.starts_with("reading the stream: code: "), "{shown}");
        assert_eq!(shown.matches("gone").count(), 1, "{shown}");
    }
}
