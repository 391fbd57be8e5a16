//! Stop-copy: freeze, send everything, rebuild, resume on the destination. The
//! smallest total time and traffic; the whole copy counts as downtime.

use super::Algorithm;

pub struct StopCopy;

impl Algorithm for StopCopy {}
