//! [`Position`]: the index of an entry in the log.

use std::fmt;

/// The index of an entry in the log. Positions only grow. Its identity is
/// 8 bytes big-endian, as in the Mesos replicated log, so identities sort
/// like positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position(u64);

impl Position {
    /// The position with this index.
    pub const fn new(index: u64) -> Self {
        Position(index)
    }

    /// The index as a number.
    pub const fn value(self) -> u64 {
        self.0
    }

    /// 8 bytes big-endian.
    pub fn identity(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// Parses an identity; `None` unless it is exactly 8 bytes.
    pub fn from_identity(bytes: &[u8]) -> Option<Self> {
        <[u8; 8]>::try_from(bytes)
            .ok()
            .map(|b| Position(u64::from_be_bytes(b)))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u64> for Position {
    fn from(v: u64) -> Self {
        Position(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_big_endian_and_sorts_like_positions() {
        let a = Position::new(1);
        let b = Position::new(256);
        assert_eq!(a.identity(), [0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(a.identity() < b.identity());
        assert_eq!(Position::from_identity(&b.identity()), Some(b));
        assert_eq!(Position::from_identity(&[1, 2, 3]), None);
    }
}
