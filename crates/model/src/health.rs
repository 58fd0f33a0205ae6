//! A producer's health from its check results: `rise` consecutive passes make it healthy,
//! `fall` consecutive failures unhealthy (pure; the agent runs the checks and stores changes).

/// What the checker knows about one producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthState {
    /// None until the first verdict: such a producer takes no traffic yet.
    pub healthy: Option<bool>,
    passes: u32,
    fails: u32,
}

impl HealthState {
    /// Start from a known verdict (a record this host wrote before a restart) or none.
    pub fn new(healthy: Option<bool>) -> HealthState {
        HealthState {
            healthy,
            passes: 0,
            fails: 0,
        }
    }

    /// Count one check result; true when the verdict changed. A producer without a verdict
    /// becomes unhealthy at its first failure (it takes no traffic either way) and healthy
    /// after `rise` passes; a healthy one needs `fall` failures in a row to leave.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> bool {
        let before = self.healthy;
        if ok {
            self.passes = self.passes.saturating_add(1);
            self.fails = 0;
            if self.healthy != Some(true) && self.passes >= rise.max(1) {
                self.healthy = Some(true);
            }
        } else {
            self.fails = self.fails.saturating_add(1);
            self.passes = 0;
            match self.healthy {
                None => self.healthy = Some(false),
                Some(true) if self.fails >= fall.max(1) => self.healthy = Some(false),
                _ => {}
            }
        }
        self.healthy != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut HealthState, results: &[bool], rise: u32, fall: u32) -> Vec<Option<bool>> {
        results
            .iter()
            .map(|ok| s.observe(*ok, rise, fall).then_some(s.healthy).flatten())
            .collect()
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let mut s = HealthState::default();
        // rise 2, fall 3: pass, pass -> healthy; fail, fail, pass resets; three fails -> out.
        let t = run(
            &mut s,
            &[true, true, false, false, true, false, false, false, false],
            2,
            3,
        );
        assert_eq!(
            t,
            [
                None,
                Some(true),
                None,
                None,
                None,
                None,
                None,
                Some(false),
                None
            ]
        );
        // Back in after two passes, not one.
        assert_eq!(run(&mut s, &[true, true], 2, 3), [None, Some(true)]);
    }

    #[test]
    fn unknown_producers_fail_at_once_and_pass_after_rise() {
        let mut s = HealthState::default();
        assert!(s.observe(false, 1, 5));
        assert_eq!(s.healthy, Some(false));
        assert!(!s.observe(false, 1, 5), "already unhealthy: no change");
        assert!(s.observe(true, 1, 5));
        assert_eq!(s.healthy, Some(true));
        let mut fresh = HealthState::default();
        assert!(!fresh.observe(true, 3, 1));
        assert!(!fresh.observe(true, 3, 1));
        assert!(fresh.observe(true, 3, 1));
    }

    #[test]
    fn a_remembered_verdict_is_kept_until_thresholds_say_otherwise() {
        let mut s = HealthState::new(Some(true));
        assert!(!s.observe(false, 1, 2));
        assert!(!s.observe(true, 1, 2));
        assert!(!s.observe(false, 1, 2));
        assert!(s.observe(false, 1, 2));
        assert_eq!(s.healthy, Some(false));
    }
}
