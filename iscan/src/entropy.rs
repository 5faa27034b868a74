//! Telling ciphertext from everything else in a window of bytes.
//!
//! Shannon entropy alone cannot: zstd, gzip, JPEG and xz output are all close to 8 bits per
//! byte. Ciphertext is also *uniform*: every byte value equally likely, so Pearson's χ² of the
//! byte histogram against the uniform one follows the χ² law with 255 degrees of freedom (mean
//! 255, standard deviation √510 ≈ 22.6). Deflate and zstd streams score in the thousands on
//! 64 KiB (their Huffman/FSE tables skew the bytes); range coders (xz, 7z) are as uniform as
//! ciphertext, which is why a window is only ever judged together with the file's magic number
//! ([`crate::magic`]).

/// Bytes per window. Large enough that χ² separates deflate/zstd output from uniform bytes.
pub const WINDOW: usize = 64 * 1024;

/// The smallest window judged (a file's tail, a small file): below this χ² and entropy say
/// little.
pub const MIN_WINDOW: usize = 4 * 1024;

/// Entropy above which a window is "high" (bits per byte).
pub const HIGH_ENTROPY: f64 = 7.5;

/// Entropy a uniform window must reach (a 4 KiB window of random bytes has ~7.95).
pub const UNIFORM_ENTROPY: f64 = 7.9;

/// χ² below which a window is uniform: the 255-degree law's mean plus ~7 standard deviations, so
/// a window of random bytes fails it about once in 10¹¹ windows.
pub const UNIFORM_CHI2: f64 = 420.0;

/// What a window of bytes looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Text, code, tables, executables: structure.
    Low,
    /// Compressed or media data: dense but skewed.
    High,
    /// Indistinguishable from random bytes: ciphertext (or a range coder's output).
    Uniform,
}

/// A byte histogram and what it says.
#[derive(Clone)]
pub struct Histogram {
    counts: [u64; 256],
    n: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; 256],
            n: 0,
        }
    }
}

impl Histogram {
    pub fn of(bytes: &[u8]) -> Self {
        let mut h = Histogram::default();
        h.add(bytes);
        h
    }

    pub fn add(&mut self, bytes: &[u8]) {
        // Four sub-histograms break the store-to-load dependency on runs of one byte value.
        let mut c = [[0u32; 256]; 4];
        let mut quads = bytes.chunks_exact(4);
        for q in &mut quads {
            c[0][q[0] as usize] += 1;
            c[1][q[1] as usize] += 1;
            c[2][q[2] as usize] += 1;
            c[3][q[3] as usize] += 1;
        }
        for &b in quads.remainder() {
            c[0][b as usize] += 1;
        }
        for (v, total) in self.counts.iter_mut().enumerate() {
            *total +=
                u64::from(c[0][v]) + u64::from(c[1][v]) + u64::from(c[2][v]) + u64::from(c[3][v]);
        }
        self.n += bytes.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Shannon entropy in bits per byte (0 for no bytes).
    pub fn entropy(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let n = self.n as f64;
        self.counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n;
                -p * p.log2()
            })
            .sum()
    }

    /// Pearson's χ² against the uniform distribution over 256 values.
    pub fn chi2(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let e = self.n as f64 / 256.0;
        self.counts
            .iter()
            .map(|&c| {
                let d = c as f64 - e;
                d * d / e
            })
            .sum()
    }

    /// The class of these bytes, or `None` for fewer than [`MIN_WINDOW`] of them.
    pub fn class(&self) -> Option<Class> {
        if self.n < MIN_WINDOW as u64 {
            return None;
        }
        let h = self.entropy();
        Some(if h >= UNIFORM_ENTROPY && self.chi2() <= UNIFORM_CHI2 {
            Class::Uniform
        } else if h >= HIGH_ENTROPY {
            Class::High
        } else {
            Class::Low
        })
    }
}

/// The class of one window (`None` if shorter than [`MIN_WINDOW`]).
pub fn classify(bytes: &[u8]) -> Option<Class> {
    Histogram::of(bytes).class()
}

/// `n` pseudo-random bytes from `seed` (splitmix64): the tests' stand-in for ciphertext.
#[cfg(test)]
pub(crate) fn pseudo_random(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_uniform_text_is_low_and_short_input_is_not_judged() {
        for seed in 0..50 {
            assert_eq!(classify(&pseudo_random(WINDOW, seed)), Some(Class::Uniform));
            assert_eq!(
                classify(&pseudo_random(MIN_WINDOW, seed)),
                Some(Class::Uniform)
            );
        }
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog 0123456789\n"
            .iter()
            .cycle()
            .take(WINDOW)
            .copied()
            .collect();
        assert_eq!(classify(&text), Some(Class::Low));
        assert_eq!(classify(&[0u8; WINDOW]), Some(Class::Low));
        assert_eq!(classify(&pseudo_random(MIN_WINDOW - 1, 1)), None);
    }

    /// Dense but skewed bytes (what a Huffman coder leaves): high, not uniform.
    #[test]
    fn skewed_dense_bytes_are_high_not_uniform() {
        let mut bytes = pseudo_random(WINDOW, 7);
        // Every 8th byte forced into the lower half: entropy stays ≈ 7.98, χ² explodes.
        for b in bytes.iter_mut().step_by(8) {
            *b &= 0x7f;
        }
        let h = Histogram::of(&bytes);
        assert!(h.entropy() > HIGH_ENTROPY, "{}", h.entropy());
        assert!(h.chi2() > UNIFORM_CHI2, "{}", h.chi2());
        assert_eq!(h.class(), Some(Class::High));
    }

    #[test]
    fn histogram_counts_every_byte_once() {
        let bytes = pseudo_random(1001, 3);
        let h = Histogram::of(&bytes);
        assert_eq!(h.len(), 1001);
        assert_eq!(h.counts.iter().sum::<u64>(), 1001);
        let mut g = Histogram::default();
        g.add(&bytes[..500]);
        g.add(&bytes[500..]);
        assert_eq!(g.counts, h.counts);
    }
}
