//! Post-copy: freeze, send everything but the private anonymous memory, resume on
//! the destination at once; the memory follows on demand from the source's frozen
//! copy (the [`pager`](super::pager)).

use super::Algorithm;

pub struct PostCopy;

impl Algorithm for PostCopy {
    fn lazy(&self) -> bool {
        true
    }
}
