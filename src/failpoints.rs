//! Test-only failpoints. With the `failpoints` feature (on in this crate's
//! own tests), `failpoint!("name")` panics while the point is armed; without
//! it, the macro compiles to nothing.

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::Mutex;

    static ARMED: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

    /// Make the next `times` hits of `name` panic.
    pub fn arm(name: &str, times: u32) {
        let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
        armed
            .get_or_insert_with(HashMap::new)
            .insert(name.into(), times);
    }

    /// Whether this hit of `name` should fail; counts it down.
    pub fn hit(name: &str) -> bool {
        let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
        match armed.as_mut().and_then(|m| m.get_mut(name)) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

#[cfg(feature = "failpoints")]
pub use armed::{arm, hit};

/// Panic here while the named failpoint is armed (tests only).
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        if $crate::failpoints::hit($name) {
            panic!(concat!("failpoint ", $name, " hit"));
        }
    };
}
