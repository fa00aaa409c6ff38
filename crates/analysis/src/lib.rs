//! Analysis routines.
