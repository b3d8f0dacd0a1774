//! Container runtime.
