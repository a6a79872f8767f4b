//! Clock policy, as pure functions: what the guest's offset is, when to set its clock, whether the host
//! slept, and when to ask the agent at all. The monitor thread applies them; nothing here does I/O.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The guest clock is set when it is off by more than this.
pub const TOLERANCE_MS: i64 = 250;
/// The guest clock is set at least this often.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// A wall-clock jump this much larger than monotonic time means the host slept.
pub const SLEEP_JUMP: Duration = Duration::from_secs(5);

/// The host's wall clock in Unix milliseconds: the one clock helper of the host side.
pub fn now_unix_ms() -> i64 {
    unix_ms(SystemTime::now())
}

pub fn unix_ms(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map(|ms| -ms).unwrap_or(i64::MIN),
    }
}

/// guest - host, the host time taken as the middle of the request's round trip. Saturates rather than
/// overflows: the guest's number is whatever a hostile guest sends.
pub fn offset_ms(guest_unix_ms: i64, host_before_ms: i64, host_after_ms: i64) -> i64 {
    let host = (i128::from(host_before_ms) + i128::from(host_after_ms)) / 2;
    let offset = i128::from(guest_unix_ms) - host;
    offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Whether to set the guest clock now.
pub fn needs_sync(offset_ms: i64, since_last_sync: Duration, host_slept: bool) -> bool {
    host_slept || since_last_sync >= SYNC_INTERVAL || offset_ms.unsigned_abs() > TOLERANCE_MS as u64
}

/// When the guest monitor, which wakes every status interval, asks the agent (status and clock). An idle VM
/// costs the host no agent round trip per wake: a host sleep or a clock change shows locally, as the wall clock
/// jumping against monotonic time, and is then corrected at once.
#[derive(Debug, Clone, Copy)]
pub struct AskPolicy {
    /// Asked at every wake while the VM is used and this long after: a build started over a connection that
    /// has closed since is seen before an idle timeout can run out.
    pub linger: Duration,
    /// Otherwise asked this often (builds, disk, the guest's own clock drift).
    pub quiet: Duration,
}

impl Default for AskPolicy {
    fn default() -> Self {
        AskPolicy { linger: Duration::from_secs(10), quiet: SYNC_INTERVAL }
    }
}

impl AskPolicy {
    /// `since_answer`: since the agent last answered (None: never); `wall_jumped`: since the last wake;
    /// `idle_for`: None while the VM is in use.
    pub fn should_ask(&self, since_answer: Option<Duration>, wall_jumped: bool, idle_for: Option<Duration>) -> bool {
        let Some(since_answer) = since_answer else { return true };
        wall_jumped || idle_for.is_none_or(|idle| idle < self.linger) || since_answer >= self.quiet
    }
}

/// A pair of wall and monotonic readings, to see the wall clock jump (the host slept, or was set).
#[derive(Debug, Clone, Copy)]
pub struct WallMark {
    pub wall: SystemTime,
    pub mono: Instant,
}

impl WallMark {
    pub fn now() -> Self {
        WallMark { wall: SystemTime::now(), mono: Instant::now() }
    }

    /// How far the wall clock moved beyond monotonic time between the two marks (negative: it was set back).
    pub fn wall_drift_ms(&self, later: &WallMark) -> i64 {
        let wall = unix_ms(later.wall).saturating_sub(unix_ms(self.wall));
        let mono = i64::try_from(later.mono.saturating_duration_since(self.mono).as_millis()).unwrap_or(i64::MAX);
        wall.saturating_sub(mono)
    }

    /// True when the wall clock moved more than SLEEP_JUMP beyond monotonic time between the two marks.
    pub fn slept_until(&self, later: &WallMark) -> bool {
        self.wall_drift_ms(later) > SLEEP_JUMP.as_millis() as i64
    }

    /// True when the wall clock moved against monotonic time, either way, by more than the guest may be off.
    pub fn jumped_until(&self, later: &WallMark) -> bool {
        self.wall_drift_ms(later).unsigned_abs() > TOLERANCE_MS as u64
    }
}

/// RFC 3339 UTC timestamp to the second.
pub fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_secs(1_764_079_200)), "2025-11-25T14:00:00Z");
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn sleep_jump_detection() {
        let before = WallMark::now();
        assert!(!before.slept_until(&WallMark::now()));
        let after_sleep = WallMark { wall: before.wall + Duration::from_secs(3600), mono: before.mono + Duration::from_secs(1) };
        assert!(before.slept_until(&after_sleep), "wall clock ran an hour ahead of monotonic time");
        let set_back = WallMark { wall: before.wall - Duration::from_secs(3600), mono: before.mono };
        assert!(!before.slept_until(&set_back), "a clock set back is no sleep");
    }

    #[test]
    fn a_wall_clock_jump_either_way_is_seen_without_the_guest() {
        let before = WallMark::now();
        let two_seconds = |wall_ms: i64| WallMark {
            wall: if wall_ms >= 0 {
                before.wall + Duration::from_millis(wall_ms as u64)
            } else {
                before.wall - Duration::from_millis(wall_ms.unsigned_abs())
            },
            mono: before.mono + Duration::from_secs(2),
        };
        assert!(!before.jumped_until(&two_seconds(2_000)), "a steady clock");
        assert!(!before.jumped_until(&two_seconds(2_000 + TOLERANCE_MS)), "NTP-sized slewing");
        assert!(before.jumped_until(&two_seconds(2_000 + TOLERANCE_MS + 1)));
        assert!(before.jumped_until(&two_seconds(3_600_000)), "the host slept an hour");
        assert!(before.jumped_until(&two_seconds(-3_600_000)), "the host clock was set back");
        assert_eq!(before.wall_drift_ms(&two_seconds(-3_600_000)), -3_602_000);
        assert!(before.slept_until(&two_seconds(3_600_000)) && !before.slept_until(&two_seconds(-3_600_000)));
    }

    #[test]
    fn the_agent_is_asked_when_used_on_a_jump_or_rarely() {
        let p = AskPolicy { linger: Duration::from_secs(10), quiet: Duration::from_secs(60) };
        let s = Duration::from_secs;
        assert!(p.should_ask(None, false, Some(s(3600))), "the first round asks");
        assert!(p.should_ask(Some(s(2)), false, None), "a connection or build: every wake");
        assert!(p.should_ask(Some(s(2)), false, Some(s(9))), "just after the last use");
        assert!(!p.should_ask(Some(s(2)), false, Some(s(10))), "idle: no round trip");
        assert!(!p.should_ask(Some(s(59)), false, Some(s(600))));
        assert!(p.should_ask(Some(s(60)), false, Some(s(600))), "idle, but not forever");
        assert!(p.should_ask(Some(s(2)), true, Some(s(600))), "the host slept or its clock moved");
    }

    #[test]
    fn offsets_never_overflow() {
        assert_eq!(offset_ms(1_000, 900, 1_100), 0);
        assert_eq!(offset_ms(-3_600_000, 0, 0), -3_600_000);
        assert_eq!(offset_ms(i64::MAX, i64::MIN, i64::MIN), i64::MAX);
        assert_eq!(offset_ms(i64::MIN, i64::MAX, i64::MAX), i64::MIN);
        assert_eq!(offset_ms(0, i64::MAX, i64::MAX), -i64::MAX);
    }

    #[test]
    fn sync_policy() {
        assert!(!needs_sync(0, Duration::from_secs(2), false));
        assert!(!needs_sync(-TOLERANCE_MS, Duration::from_secs(2), false));
        assert!(needs_sync(TOLERANCE_MS + 1, Duration::from_secs(2), false));
        assert!(needs_sync(i64::MIN, Duration::ZERO, false), "no overflow on the most negative offset");
        assert!(needs_sync(0, SYNC_INTERVAL, false));
        assert!(needs_sync(0, Duration::ZERO, true));
    }

    #[test]
    fn unix_ms_before_the_epoch_is_negative() {
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_millis(5)), -5);
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(5)), 5);
    }
}
