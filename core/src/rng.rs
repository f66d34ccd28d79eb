//! SplitMix64 (Steele, Lea & Flood 2014), the one pseudo-random step the
//! workspace uses: dataset splits, training samples and test inputs. Tiny
//! and fully specified, so a seed gives the same stream on every platform
//! and version, with no `rand` dependency whose streams may change; its
//! whole state is one `u64`, so a resumed training run continues exactly.

/// Advances `state` and returns the next value of its stream.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_stream() {
        // The first outputs for seed 0 of the authors' C reference.
        let mut s = 0;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut s), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(&mut s), 0x06C4_5D18_8009_454F);
    }
}
