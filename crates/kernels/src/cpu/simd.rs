//! Dot products and dtype conversions, vectorized with AVX2 + FMA (+ F16C for f16) when the CPU
//! has them (checked at run time) and written as 8-lane scalar loops otherwise.

use half::f16;

/// Number of independent accumulators of the portable loops, so that the compiler can keep them in
/// one vector register instead of summing serially.
const LANES: usize = 8;

/// A dot product of f32 activations with one weight row in its stored encoding.
pub(super) type DotFn<T> = fn(&[f32], &[T]) -> f32;

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2_fma() && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Returns the fastest f32 · f32 dot product this CPU runs.
pub(super) fn dot_f32_fn() -> DotFn<f32> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the target features of the function.
        return |x, w| unsafe { x86::dot_f32(x, w) };
    }
    dot_f32_portable
}

/// Returns the fastest f32 · bf16 dot product this CPU runs.
pub(super) fn dot_bf16_fn() -> DotFn<u16> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the target features of the function.
        return |x, w| unsafe { x86::dot_bf16(x, w) };
    }
    dot_bf16_portable
}

/// Returns the fastest f32 · f16 dot product this CPU runs.
pub(super) fn dot_f16_fn() -> DotFn<u16> {
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU supports the target features of the function.
        return |x, w| unsafe { x86::dot_f16(x, w) };
    }
    dot_f16_portable
}

/// f32 dot product of two equally long slices.
pub(super) fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    dot_f32_fn()(x, w)
}

fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

fn lanes_dot<T: Copy>(x: &[f32], w: &[T], to_f32: impl Fn(T) -> f32) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    let mut acc = [0.0f32; LANES];
    let split = x.len() / LANES * LANES;
    for (xc, wc) in x[..split]
        .chunks_exact(LANES)
        .zip(w[..split].chunks_exact(LANES))
    {
        for lane in 0..LANES {
            acc[lane] += xc[lane] * to_f32(wc[lane]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (&xv, &wv) in x[split..].iter().zip(&w[split..]) {
        sum += xv * to_f32(wv);
    }
    sum
}

fn dot_f32_portable(x: &[f32], w: &[f32]) -> f32 {
    lanes_dot(x, w, |v| v)
}

fn dot_bf16_portable(x: &[f32], w: &[u16]) -> f32 {
    lanes_dot(x, w, bf16_bits_to_f32)
}

fn dot_f16_portable(x: &[f32], w: &[u16]) -> f32 {
    lanes_dot(x, w, |b| f16::from_bits(b).to_f32())
}

/// Converts bf16 bit patterns to f32 (exact: bf16 is the upper half of an f32).
pub(super) fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_bits_to_f32(s);
    }
}

/// Converts IEEE half-precision bit patterns to f32 (exact).
pub(super) fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_f16c() {
        // SAFETY: the CPU supports the target features of the function.
        unsafe { x86::f16_to_f32(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16::from_bits(s).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    /// Adds the 8 lanes of a vector.
    #[target_feature(enable = "avx2,fma")]
    fn horizontal_sum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        let single = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        _mm_cvtss_f32(single)
    }

    /// Loads 8 f32 values.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_f32(ptr: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f32 at `ptr`.
        unsafe { _mm256_loadu_ps(ptr) }
    }

    /// Loads 8 bf16 values as f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16(ptr: *const u16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable u16 at `ptr`.
        let half = unsafe { _mm_loadu_si128(ptr.cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16))
    }

    /// Loads 8 f16 values as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(ptr: *const u16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable u16 at `ptr`.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(ptr.cast()) })
    }

    /// Dot product with four independent accumulators (32 values per step) to hide the FMA latency.
    macro_rules! dot_body {
        ($x:expr, $w:expr, $load:path, $scalar:expr) => {{
            let (x, w) = ($x, $w);
            debug_assert_eq!(x.len(), w.len());
            let n = x.len().min(w.len());
            let (xp, wp) = (x.as_ptr(), w.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY: every load reads indices below `n`, the length of both slices.
            unsafe {
                while i + 32 <= n {
                    for (j, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(xp.add(i + 8 * j));
                        *a = _mm256_fmadd_ps(xv, $load(wp.add(i + 8 * j)), *a);
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), $load(wp.add(i)), acc[0]);
                    i += 8;
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut total = horizontal_sum(sum);
            for j in i..n {
                total += x[j] * $scalar(w[j]);
            }
            total
        }};
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
        dot_body!(x, w, load_f32, |v: f32| v)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
        dot_body!(x, w, load_bf16, super::bf16_bits_to_f32)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_f16(x: &[f32], w: &[u16]) -> f32 {
        dot_body!(x, w, load_f16, |b: u16| f16::from_bits(b).to_f32())
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        // SAFETY: every access is below `n`, the length of both slices.
        unsafe {
            while i + 8 <= n {
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), load_f16(src.as_ptr().add(i)));
                i += 8;
            }
        }
        for j in i..n {
            dst[j] = f16::from_bits(src[j]).to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched kernels (AVX2 where present) against the portable loops, on lengths that
    /// leave remainders after the 32- and 8-wide steps.
    #[test]
    fn dispatched_dots_match_portable() {
        for len in [0, 1, 7, 8, 31, 33, 896, 901] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..len)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let bf: Vec<u16> = w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let hf: Vec<u16> = w.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
            let tolerance = 1e-5 * (len as f32).sqrt().max(1.0);

            assert!(
                (dot_f32_fn()(&x, &w) - dot_f32_portable(&x, &w)).abs() <= tolerance,
                "f32 {len}"
            );
            assert!(
                (dot_bf16_fn()(&x, &bf) - dot_bf16_portable(&x, &bf)).abs() <= tolerance,
                "bf16 {len}"
            );
            assert!(
                (dot_f16_fn()(&x, &hf) - dot_f16_portable(&x, &hf)).abs() <= tolerance,
                "f16 {len}"
            );

            let mut converted = vec![0.0; len];
            f16_to_f32(&hf, &mut converted);
            let expected: Vec<f32> = hf.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
            assert_eq!(converted, expected, "f16 conversion {len}");
        }
    }
}
