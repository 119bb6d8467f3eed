//! Test-only failpoints. With the `failpoints` feature (on in this crate's
//! own tests), `failpoint!("name")` panics, or stalls the thread, while the
//! point is armed; without the feature, the macro compiles to nothing.

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Clone, Copy)]
    enum Action {
        Panic,
        Sleep(Duration),
    }

    static ARMED: Mutex<Option<HashMap<String, (u32, Action)>>> = Mutex::new(None);

    fn set(name: &str, times: u32, action: Action) {
        let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
        armed
            .get_or_insert_with(HashMap::new)
            .insert(name.into(), (times, action));
    }

    /// Make the next `times` hits of `name` panic.
    pub fn arm(name: &str, times: u32) {
        set(name, times, Action::Panic);
    }

    /// Make the next `times` hits of `name` block their thread for `ms`.
    pub fn arm_sleep(name: &str, times: u32, ms: u64) {
        set(name, times, Action::Sleep(Duration::from_millis(ms)));
    }

    /// Count down one hit of `name`, and act if it was armed.
    pub fn hit(name: &str) {
        let action = {
            let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
            match armed.as_mut().and_then(|m| m.get_mut(name)) {
                Some((n, action)) if *n > 0 => {
                    *n -= 1;
                    Some(*action)
                }
                _ => None,
            }
        };
        match action {
            Some(Action::Panic) => panic!("failpoint {name} hit"),
            Some(Action::Sleep(d)) => std::thread::sleep(d),
            None => {}
        }
    }
}

#[cfg(feature = "failpoints")]
pub use armed::{arm, arm_sleep, hit};

/// Panic or stall here while the named failpoint is armed (tests only).
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoints::hit($name);
    };
}
