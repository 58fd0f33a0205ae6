//! Bandwidth limits (the CNI `bandwidth` capability) as token buckets, decided here and carried
//! out by `ferrynet_dataplane::tc`.
//!
//! The units and directions are the reference `bandwidth` plugin's: rates in bits per second,
//! bursts in bits; *ingress* is traffic to the container, shaped by a TBF qdisc on the egress of
//! the host end of its veth, *egress* is traffic from the container, redirected from the host
//! end's ingress to an IFB device whose egress carries a TBF. Both live in the host's network
//! namespace, where the container cannot remove them.

use serde::{Deserialize, Serialize};

/// The `bandwidth` capability: rates in bit/s, bursts in bits; 0 means "no limit" for a
/// direction whose rate and burst are both 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    /// Limit of traffic to the container, bit/s.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ingress_rate: u64,
    /// Bucket of traffic to the container, bits.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ingress_burst: u64,
    /// Limit of traffic from the container, bit/s.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub egress_rate: u64,
    /// Bucket of traffic from the container, bits.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub egress_burst: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// How long a packet may wait in a TBF queue (the reference plugin's latency): sets the queue
/// length to `rate × latency + burst` bytes.
pub const LATENCY_MS: u64 = 25;

/// One psched tick, the unit of TBF's `buffer` (the kernel's `PSCHED_SHIFT` is 6).
const TICK_NS: u64 = 64;

/// A token bucket for the kernel's `tbf` qdisc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Rate in bytes per second (the kernel's unit).
    pub rate_bytes: u64,
    /// Bucket size in bytes (`TCA_TBF_BURST`).
    pub burst_bytes: u32,
    /// The bucket as transmission time at `rate`, in psched ticks (`tc_tbf_qopt.buffer`),
    /// saturated at `u32::MAX`; the kernel recomputes it from `burst_bytes`.
    pub buffer_ticks: u32,
    /// Queue length in bytes (`tc_tbf_qopt.limit`): `rate × 25 ms + burst`.
    pub limit_bytes: u32,
}

/// The shaping of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shaping {
    /// Traffic to the container: TBF on the host end's egress.
    pub ingress: Option<TokenBucket>,
    /// Traffic from the container: TBF on the IFB device.
    pub egress: Option<TokenBucket>,
}

/// Why a `bandwidth` capability is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BandwidthError {
    /// A rate without a burst or a burst without a rate.
    #[error("bandwidth: {set} is set but {missing} is not (both or neither)")]
    Half {
        /// The key given.
        set: &'static str,
        /// The key missing.
        missing: &'static str,
    },
    /// A rate under 8 bit/s (0 bytes per second).
    #[error("bandwidth: {key} {value} bit/s is below 8 bit/s (one byte per second)")]
    RateTooLow {
        /// The key.
        key: &'static str,
        /// Its value.
        value: u64,
    },
    /// A burst over the kernel's 32-bit byte count.
    #[error("bandwidth: {key} {value} bits is above 4 GiB (the kernel counts the bucket in 32-bit bytes)")]
    BurstTooLarge {
        /// The key.
        key: &'static str,
        /// Its value.
        value: u64,
    },
    /// A bucket smaller than one full-size packet: such packets could never pass.
    #[error("bandwidth: {key} {value} bits ({bytes} bytes) is below the MTU of {mtu} bytes: full-size packets could never pass")]
    BurstBelowMtu {
        /// The key.
        key: &'static str,
        /// Its value in bits.
        value: u64,
        /// Its value in bytes.
        bytes: u64,
        /// The interface's MTU.
        mtu: u32,
    },
}

impl Bandwidth {
    /// Whether no direction is limited.
    pub fn is_unlimited(&self) -> bool {
        *self == Bandwidth::default()
    }

    /// The token buckets for an interface of `mtu` bytes, or why the limits cannot be applied.
    pub fn shaping(&self, mtu: u32) -> Result<Shaping, BandwidthError> {
        Ok(Shaping {
            ingress: bucket(
                ("ingressRate", self.ingress_rate),
                ("ingressBurst", self.ingress_burst),
                mtu,
            )?,
            egress: bucket(
                ("egressRate", self.egress_rate),
                ("egressBurst", self.egress_burst),
                mtu,
            )?,
        })
    }
}

/// The bucket of one direction; None when both values are 0.
fn bucket(
    (rate_key, rate): (&'static str, u64),
    (burst_key, burst): (&'static str, u64),
    mtu: u32,
) -> Result<Option<TokenBucket>, BandwidthError> {
    match (rate, burst) {
        (0, 0) => return Ok(None),
        (_, 0) => {
            return Err(BandwidthError::Half {
                set: rate_key,
                missing: burst_key,
            })
        }
        (0, _) => {
            return Err(BandwidthError::Half {
                set: burst_key,
                missing: rate_key,
            })
        }
        _ => {}
    }
    let rate_bytes = rate / 8;
    if rate_bytes == 0 {
        return Err(BandwidthError::RateTooLow {
            key: rate_key,
            value: rate,
        });
    }
    let burst_bytes = u32::try_from(burst / 8)
        .ok()
        .filter(|b| *b < u32::MAX)
        .ok_or(BandwidthError::BurstTooLarge {
            key: burst_key,
            value: burst,
        })?;
    if burst_bytes < mtu {
        return Err(BandwidthError::BurstBelowMtu {
            key: burst_key,
            value: burst,
            bytes: u64::from(burst_bytes),
            mtu,
        });
    }
    // Transmission time of the bucket at the rate, in 64 ns ticks; u128 so no product overflows.
    let ns = u128::from(burst_bytes) * 1_000_000_000 / u128::from(rate_bytes);
    let buffer_ticks = u32::try_from(ns / u128::from(TICK_NS)).unwrap_or(u32::MAX);
    let queued = u128::from(rate_bytes) * u128::from(LATENCY_MS) / 1000;
    let limit_bytes = u32::try_from(queued + u128::from(burst_bytes)).unwrap_or(u32::MAX);
    Ok(Some(TokenBucket {
        rate_bytes,
        burst_bytes,
        buffer_ticks,
        limit_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bw(ir: u64, ib: u64, er: u64, eb: u64) -> Bandwidth {
        Bandwidth {
            ingress_rate: ir,
            ingress_burst: ib,
            egress_rate: er,
            egress_burst: eb,
        }
    }

    #[test]
    fn units_are_bits_and_the_kernel_gets_bytes() {
        // 10 Mbit/s with a 100 kbit (12 500 byte) bucket.
        let s = bw(10_000_000, 100_000, 0, 0).shaping(1500).unwrap();
        assert_eq!(s.egress, None);
        let b = s.ingress.unwrap();
        assert_eq!(b.rate_bytes, 1_250_000);
        assert_eq!(b.burst_bytes, 12_500);
        // 12 500 B at 1 250 000 B/s = 10 ms = 156 250 ticks of 64 ns.
        assert_eq!(b.buffer_ticks, 156_250);
        // 25 ms of the rate (31 250 B) plus the bucket.
        assert_eq!(b.limit_bytes, 31_250 + 12_500);
    }

    #[test]
    fn both_directions_independently() {
        let s = bw(8_000_000, 80_000, 16_000_000, 160_000)
            .shaping(1500)
            .unwrap();
        assert_eq!(s.ingress.unwrap().rate_bytes, 1_000_000);
        assert_eq!(s.egress.unwrap().rate_bytes, 2_000_000);
        assert_eq!(s.egress.unwrap().burst_bytes, 20_000);
        assert!(bw(0, 0, 0, 0).is_unlimited());
        assert_eq!(bw(0, 0, 0, 0).shaping(1500).unwrap(), Shaping::default());
    }

    #[test]
    fn what_containerd_sends() {
        // containerd's CRI sets every burst to MaxUint32 bits (512 MiB).
        let s = bw(
            1_000_000,
            u64::from(u32::MAX),
            1_000_000,
            u64::from(u32::MAX),
        )
        .shaping(1500)
        .unwrap();
        let b = s.ingress.unwrap();
        assert_eq!(b.burst_bytes, u32::MAX / 8);
        // 536 870 911 B at 125 000 B/s is 4 295 s: far beyond u32 ticks, saturated.
        assert_eq!(b.buffer_ticks, u32::MAX);
        assert_eq!(b.limit_bytes, 3_125 + u32::MAX / 8);
        // Rates beyond u32 bytes/s (the kernel then takes TCA_TBF_RATE64).
        let fast = bw(100_000_000_000, 8_000_000, 0, 0).shaping(1500).unwrap();
        assert_eq!(fast.ingress.unwrap().rate_bytes, 12_500_000_000);
        assert_eq!(fast.ingress.unwrap().limit_bytes, 312_500_000 + 1_000_000);
    }

    #[test]
    fn refusals() {
        assert_eq!(
            bw(1_000_000, 0, 0, 0).shaping(1500).unwrap_err(),
            BandwidthError::Half {
                set: "ingressRate",
                missing: "ingressBurst"
            }
        );
        assert_eq!(
            bw(0, 0, 0, 100_000).shaping(1500).unwrap_err(),
            BandwidthError::Half {
                set: "egressBurst",
                missing: "egressRate"
            }
        );
        assert!(matches!(
            bw(7, 100_000, 0, 0).shaping(1500),
            Err(BandwidthError::RateTooLow { value: 7, .. })
        ));
        // 4 GiB of bytes does not fit the kernel's u32.
        let big = (u64::from(u32::MAX) + 1) * 8;
        assert!(matches!(
            bw(0, 0, 1_000_000, big).shaping(1500),
            Err(BandwidthError::BurstTooLarge {
                key: "egressBurst",
                ..
            })
        ));
        assert!(matches!(
            bw(0, 0, 1_000_000, u64::MAX).shaping(1500),
            Err(BandwidthError::BurstTooLarge { .. })
        ));
        // 1 000 bits = 125 bytes: a 1500-byte packet would never get through.
        let e = bw(1_000_000, 1_000, 0, 0).shaping(1500).unwrap_err();
        assert!(e.to_string().contains("125 bytes"), "{e}");
        assert!(bw(1_000_000, 1_500 * 8, 0, 0).shaping(1500).is_ok());
        assert!(bw(1_000_000, 1_500 * 8, 0, 0).shaping(9000).is_err());
    }

    #[test]
    fn record_form_omits_unlimited_directions() {
        let v = serde_json::to_value(bw(1_000, 2_000, 0, 0)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ingressRate": 1000, "ingressBurst": 2000})
        );
        let back: Bandwidth = serde_json::from_value(v).unwrap();
        assert_eq!(back, bw(1_000, 2_000, 0, 0));
    }
}
