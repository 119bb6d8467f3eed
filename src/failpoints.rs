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
    /// Failpoints armed for one subject (an entry's key), until disarmed.
    static ON: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

    /// Make every hit of `name` for `subject` panic, until [`disarm_on`].
    pub fn arm_on(name: &str, subject: &str) {
        let mut on = ON.lock().unwrap_or_else(|p| p.into_inner());
        on.get_or_insert_with(HashMap::new)
            .insert(name.into(), subject.into());
    }

    pub fn disarm_on(name: &str) {
        let mut on = ON.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = on.as_mut() {
            m.remove(name);
        }
    }

    /// The subjects that stall their thread at a failpoint, and how long.
    type Stalls = HashMap<String, (Vec<String>, Duration)>;
    static SLEEP_ON: Mutex<Option<Stalls>> = Mutex::new(None);

    /// Make every hit of `name` for one of `subjects` block its thread for
    /// `ms`, until [`disarm_sleep_on`].
    pub fn arm_sleep_on(name: &str, subjects: &[&str], ms: u64) {
        let mut on = SLEEP_ON.lock().unwrap_or_else(|p| p.into_inner());
        let subjects = subjects.iter().map(|s| s.to_string()).collect();
        on.get_or_insert_with(HashMap::new)
            .insert(name.into(), (subjects, Duration::from_millis(ms)));
    }

    pub fn disarm_sleep_on(name: &str) {
        let mut on = SLEEP_ON.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = on.as_mut() {
            m.remove(name);
        }
    }

    /// Panic if `name` is armed for `subject`; stall if it is armed to
    /// sleep for it.
    pub fn hit_on(name: &str, subject: &str) {
        let sleep = {
            let on = SLEEP_ON.lock().unwrap_or_else(|p| p.into_inner());
            on.as_ref()
                .and_then(|m| m.get(name))
                .filter(|(subjects, _)| subjects.iter().any(|s| s == subject))
                .map(|(_, d)| *d)
        };
        if let Some(d) = sleep {
            std::thread::sleep(d);
        }
        let armed = {
            let on = ON.lock().unwrap_or_else(|p| p.into_inner());
            on.as_ref()
                .and_then(|m| m.get(name))
                .is_some_and(|s| s == subject)
        };
        if armed {
            panic!("failpoint {name} hit for {subject}");
        }
    }

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
pub use armed::{arm, arm_on, arm_sleep, arm_sleep_on, disarm_on, disarm_sleep_on, hit, hit_on};

/// Panic or stall here while the named failpoint is armed (tests only); with
/// a subject, panic or stall while it is armed for that subject.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoints::hit($name);
    };
    ($name:literal, $subject:expr) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoints::hit_on($name, $subject);
    };
}
