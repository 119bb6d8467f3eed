//! Queue backends. Each backend lives in its own folder and only sets itself
//! up; what does not depend on a backend stays here.

pub mod embedded;
