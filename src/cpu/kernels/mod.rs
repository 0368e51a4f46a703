//! CPU kernels: a scalar reference plus SIMD versions chosen at run time (x86_64) or compile
//! time (aarch64, wasm32 with `+simd128`). All share the layout of [`crate::cpu::packed`].

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod scalar;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
pub mod simd128;

/// Drives a `group::<T>(group_ptr, rb, x_ptr, kpad, prefetch) -> [[i32; T]; 4]` micro-kernel
/// over all row groups and tokens: tokens in tiles (kept in L1) outside, row groups inside; each
/// tile is the largest of the sizes listed (descending, ending in 1) that the tokens left fill.
#[cfg(target_arch = "x86_64")]
macro_rules! for_each_group {
    ($w:expr, $rb:expr, $x:expr, $ntok:expr, $out:expr, $pf:expr, [$($tt:literal),+], $group:ident) => {{
        use crate::cpu::packed::GROUP;
        let (w, rb, x, ntok, out): (&[u8], usize, &[i8], usize, &mut [i32]) =
            ($w, $rb, $x, $ntok, $out);
        let kpad = rb * 4;
        let ngroups = w.len() / (GROUP * rb);
        let mut t = 0;
        while t < ntok {
            $(
                if ntok - t >= $tt {
                    for g in 0..ngroups {
                        let gp = w.as_ptr().add(g * GROUP * rb);
                        let xp = x.as_ptr().add(t * kpad);
                        let o = $group::<$tt>(gp, rb, xp, kpad, $pf);
                        for (r, row) in o.iter().enumerate() {
                            out[(g * GROUP + r) * ntok + t..][..$tt].copy_from_slice(row);
                        }
                    }
                    t += $tt;
                    continue;
                }
            )+
        }
    }};
}
#[cfg(target_arch = "x86_64")]
pub(crate) use for_each_group;

/// Software prefetch, into L2, of the `LINES` cache lines `ahead` bytes past `p` (none when
/// `ahead` is 0): weight streams call it once per `64 · LINES` bytes consumed. L2 rather than
/// L1 (`prefetcht1`): an L1 prefetch holds one of the core's few L1 fill buffers until its line
/// arrives, which caps the bytes in flight (Intel Xeon, 2 vCPU: decode 8–20% faster).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn prefetch_ahead<const LINES: usize>(p: *const u8, ahead: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    if ahead != 0 {
        let q = p.wrapping_add(ahead) as *const i8;
        for l in 0..LINES {
            _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(64 * l));
        }
    }
}

/// The distance [`Kernels::with_prefetch`] is measured at: with it, the weight streams of a
/// 2-vCPU Intel Xeon (Emerald Rapids) reach 20–24 GB/s against 11–15 without; Zen 4 streams
/// faster without (its hardware prefetcher crosses pages on its own).
pub const PREFETCH_BYTES: usize = 16384;
/// An instruction set the kernels can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AVX-512 VNNI with Intel AMX tiles for steps of several tokens.
    #[cfg(target_arch = "x86_64")]
    Amx,
    #[cfg(target_arch = "aarch64")]
    Neon,
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    Simd128,
}

/// Fewest tokens a step has for the AMX kernel set to use its tiles: below four the AVX-512
/// kernels are as fast (most of a tile's 16 token columns would be wasted).
#[cfg(target_arch = "x86_64")]
const AMX_MIN_TOKENS: usize = 4;

/// A step's activations laid out once per matmul for kernel sets that read them in an order
/// of their own ([`Kernels::lay_out_tokens`]).
#[derive(Default)]
pub struct TokenTiles {
    #[cfg(target_arch = "x86_64")]
    amx: amx::Tiles,
}

/// Panics unless `w` holds whole rows of `rb` bytes (a multiple of 32) and `x` and `out` hold
/// `ntok` tokens' activations and sums: the bounds every `code_dots` kernel relies on.
fn check_code_dots_sizes(w: &[u8], rb: usize, x: &[i8], ntok: usize, out: &[i32]) {
    assert!(
        rb.is_multiple_of(32)
            && w.len().is_multiple_of(4 * rb)
            && x.len() >= ntok * rb * 4
            && out.len() >= (w.len() / rb) * ntok,
        "code_dots sizes: {} weight bytes of rows of {rb}, {} activations, {ntok} tokens, {} sums",
        w.len(),
        x.len(),
        out.len()
    );
}

/// A kernel set that is valid on this CPU (only obtainable through detection), with the
/// distance its weight streams prefetch ahead (0: the hardware prefetcher alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
    prefetch: usize,
}

impl Kernels {
    const fn of(isa: Isa) -> Self {
        Kernels { isa, prefetch: 0 }
    }

    /// The fastest kernels this CPU supports.
    pub fn detect() -> Self {
        *Self::available()
            .last()
            .unwrap_or(&Kernels::of(Isa::Scalar))
    }

    /// The kernel set called `name` ("auto" = the fastest), if this CPU supports it.
    pub fn by_name(name: &str) -> crate::Result<Self> {
        if name == "auto" {
            return Ok(Self::detect());
        }
        let avail = Self::available();
        avail
            .iter()
            .copied()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = avail.iter().map(|k| k.name()).collect();
                crate::Error::Config(format!(
                    "kernel set `{name}` is not available on this CPU (available: auto, {})",
                    names.join(", ")
                ))
            })
    }

    /// The portable reference kernels.
    pub fn scalar() -> Self {
        Kernels::of(Isa::Scalar)
    }

    /// Every kernel set this CPU supports, slowest first.
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut v = vec![Kernels::of(Isa::Scalar)];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Kernels::of(Isa::Avx2));
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Kernels::of(Isa::Avx512Vnni));
                if amx::available() {
                    v.push(Kernels::of(Isa::Amx));
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        v.push(Kernels::of(Isa::Neon));
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        v.push(Kernels::of(Isa::Simd128));
        v
    }

    /// These kernels with their weight streams prefetching `bytes` ahead (0: none). Kernel sets
    /// without software prefetch ignore it.
    pub fn with_prefetch(self, bytes: usize) -> Self {
        Kernels {
            prefetch: if self.prefetches() { bytes } else { 0 },
            ..self
        }
    }

    /// Bytes the weight streams prefetch ahead (0: none).
    pub fn prefetch(self) -> usize {
        self.prefetch
    }

    /// Whether this kernel set has software prefetch (x86).
    pub fn prefetches(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.isa, Isa::Avx2 | Isa::Avx512Vnni | Isa::Amx) {
            return true;
        }
        false
    }

    /// Steps of up to this many tokens make one token tile of [`Self::code_dots`], so that a
    /// matmul streams each weight row once (AVX-512: tiles of 5 and fewer tokens; 4 for the
    /// other kernel sets, as measured there).
    pub fn one_tile_tokens(self) -> usize {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => 5,
            _ => 4,
        }
    }

    /// Short name ("scalar", "avx2", "neon").
    pub fn name(self) -> &'static str {
        match self.isa {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => "avx512vnni",
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => "amx",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "neon",
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Isa::Simd128 => "simd128",
        }
    }

    /// `out[r * ntok + t] = Σ_c code(r, c) · x[t][c]` for the packed rows in `w` (`rb` bytes
    /// each) and `ntok` int8 token rows of `4 * rb` values in `x`.
    pub fn code_dots(self, w: &[u8], rb: usize, x: &[i8], ntok: usize, out: &mut [i32]) {
        check_code_dots_sizes(w, rb, x, ntok, out);
        match self.isa {
            Isa::Scalar => scalar::code_dots(w, rb, x, ntok, out),
            // SAFETY: the variant exists only when detection found the features; sizes checked above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::code_dots(w, rb, x, ntok, out, self.prefetch) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => unsafe { avx512::code_dots(w, rb, x, ntok, out, self.prefetch) },
            #[cfg(target_arch = "x86_64")]
            Isa::Amx if ntok < AMX_MIN_TOKENS => unsafe {
                avx512::code_dots(w, rb, x, ntok, out, self.prefetch)
            },
            // SAFETY: `Amx` exists only when `amx::available()` (the tile state granted).
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => unsafe { amx::code_dots(w, rb, x, ntok, out, self.prefetch) },
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { neon::code_dots(w, rb, x, ntok, out) },
            // SAFETY: compiled with simd128 (validated when the module is instantiated).
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Isa::Simd128 => unsafe { simd128::code_dots(w, rb, x, ntok, out) },
        }
    }

    /// Lays the `ntok` token rows of `x` (`kpad` each) out once for every
    /// [`Self::code_dots_tiled`] call of a matmul, where this kernel set reads activations in
    /// an order of its own (AMX tiles); returns whether it did.
    pub fn lay_out_tokens(self, x: &[i8], kpad: usize, ntok: usize, into: &mut TokenTiles) -> bool {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (x, kpad, ntok, into);
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx if ntok >= AMX_MIN_TOKENS => {
                into.amx.lay_out(&x[..ntok * kpad], kpad, ntok);
                true
            }
            _ => false,
        }
    }

    /// [`Self::code_dots`] with `tiles` laid out from `x` by [`Self::lay_out_tokens`] (when it
    /// returned true; otherwise `tiles` is not read).
    pub fn code_dots_tiled(
        self,
        w: &[u8],
        rb: usize,
        x: &[i8],
        ntok: usize,
        tiles: &TokenTiles,
        out: &mut [i32],
    ) {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = tiles;
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx if ntok >= AMX_MIN_TOKENS => {
                check_code_dots_sizes(w, rb, x, ntok, out);
                // SAFETY: `Amx` exists only when `amx::available()`; sizes checked; `tiles` is
                // checked against the width and holds `ntok` tokens of `x` by contract.
                unsafe { amx::code_dots_tiled(w, rb, x, &tiles.amx, out, self.prefetch) }
            }
            _ => self.code_dots(w, rb, x, ntok, out),
        }
    }

    /// The order in which [`Self::head_bf16`] consumes each 32-wide chunk, if not natural.
    fn bf16_perm(self) -> Option<&'static [usize; 32]> {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(&avx2::BF16_PERM),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => Some(&avx512::BF16_PERM),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Reorders activations `x` into `xp` as [`Self::head_bf16`] consumes them.
    pub fn prepare_bf16_activations(self, x: &[f32], xp: &mut [f32]) {
        xp.copy_from_slice(x);
        if let Some(perm) = self.bf16_perm() {
            for (src, dst) in x.chunks_exact(32).zip(xp.chunks_exact_mut(32)) {
                for (d, &p) in dst.iter_mut().zip(perm.iter()) {
                    *d = src[p];
                }
            }
        }
    }

    /// `out[r] = w[r] · x` for consecutive bf16 rows (raw bits) of `cols` columns, with `xp`
    /// from [`Self::prepare_bf16_activations`].
    pub fn head_bf16(self, w: &[u16], cols: usize, xp: &[f32], out: &mut [f32]) {
        assert!(w.len() == out.len() * cols && xp.len() == cols);
        match self.isa {
            // SAFETY: features detected; sizes checked.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::head_bf16(w, cols, xp, out, self.prefetch) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => unsafe {
                avx512::head_bf16(w, cols, xp, out, self.prefetch)
            },
            // SAFETY: NEON is always present on aarch64; sizes checked.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => {
                for (o, row) in out.iter_mut().zip(w.chunks_exact(cols)) {
                    *o = unsafe { neon::dot_bf16(row, xp) };
                }
            }
            // SAFETY: compiled with simd128; sizes checked.
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Isa::Simd128 => {
                for (o, row) in out.iter_mut().zip(w.chunks_exact(cols)) {
                    *o = unsafe { simd128::dot_bf16(row, xp) };
                }
            }
            Isa::Scalar => {
                for (o, row) in out.iter_mut().zip(w.chunks_exact(cols)) {
                    *o = scalar::dot_bf16(row, xp);
                }
            }
        }
    }

    /// [`Self::head_bf16`] of `ntok` token rows at once (`xp`: `ntok` rows prepared by
    /// [`Self::prepare_bf16_activations`]; `out[t * rows + r]`): each weight row is read once
    /// for several tokens, and every token's logits are bit-identical to [`Self::head_bf16`]'s.
    pub fn head_bf16_multi(self, w: &[u16], cols: usize, xp: &[f32], ntok: usize, out: &mut [f32]) {
        let rows = w.len() / cols.max(1);
        assert!(w.len() == rows * cols && xp.len() == ntok * cols && out.len() == ntok * rows);
        match self.isa {
            // SAFETY: features detected; sizes checked.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::head_bf16_multi(w, cols, xp, ntok, out, self.prefetch) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => unsafe {
                avx512::head_bf16_multi(w, cols, xp, ntok, out, self.prefetch)
            },
            #[allow(unreachable_patterns)]
            _ => {
                for (x, o) in xp.chunks_exact(cols).zip(out.chunks_exact_mut(rows)) {
                    self.head_bf16(w, cols, x, o);
                }
            }
        }
    }

    /// Dot product of two int8 vectors whose values lie in [-127, 127].
    pub fn dot_i8(self, w: &[i8], x: &[i8]) -> i32 {
        assert_eq!(w.len(), x.len());
        match self.isa {
            Isa::Scalar => scalar::dot_i8(w, x),
            // SAFETY: features detected; lengths checked.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::dot_i8(w, x, self.prefetch) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => unsafe { avx512::dot_i8(w, x, self.prefetch) },
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { neon::dot_i8(w, x) },
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Isa::Simd128 => unsafe { simd128::dot_i8(w, x) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::packed::PackedTernary;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Every kernel set here, those with software prefetch also with it on (a prefetch must
    /// not change a result).
    fn variants() -> Vec<Kernels> {
        let mut v: Vec<_> = Kernels::available()
            .into_iter()
            .flat_map(|k| [k, k.with_prefetch(PREFETCH_BYTES)])
            .collect();
        v.dedup();
        v
    }

    fn random_case(
        rows: usize,
        cols: usize,
        ntok: usize,
        seed: u64,
    ) -> (PackedTernary, Vec<Vec<u8>>, Vec<i8>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let codes: Vec<Vec<u8>> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|c| ((r * 31 + c * 7 + rng.random_range(0..3)) % 3) as u8)
                    .collect()
            })
            .collect();
        let kpad = crate::cpu::packed::padded_cols(cols);
        let mut x = vec![0i8; ntok * kpad];
        for t in 0..ntok {
            for c in 0..cols {
                // Extremes included: the i16 accumulation must not overflow.
                x[t * kpad + c] = if rng.random_bool(0.2) {
                    127 * if rng.random_bool(0.5) { 1 } else { -1 }
                } else {
                    rng.random_range(-127..=127)
                };
            }
        }
        (
            PackedTernary::from_codes(&codes, cols, vec![1.0; rows]),
            codes,
            x,
        )
    }

    #[test]
    fn code_dots_match_scalar_on_odd_shapes() {
        for (rows, cols, ntok) in [
            (4, 1, 1),
            (4, 128, 1),
            (8, 130, 3),
            (12, 300, 9),
            (172, 64, 5),
            (8, 2304, 17),
            (20, 6912, 2),
            (16, 2560, 7),
            (16, 2560, 1),
            (8, 300, 1),
            (12, 6912, 1),
            // AMX: whole 16-row tiles plus a remainder, token tiles past one pass of 64.
            (36, 300, 70),
            (48, 6912, 16),
            (20, 2560, 64),
            (32, 128, 2),
        ] {
            let (w, codes, x) = random_case(rows, cols, ntok, (rows * cols + ntok) as u64);
            let mut want = vec![0i32; rows * ntok];
            // Independent of the packed layout: straight from the codes.
            for r in 0..rows {
                for t in 0..ntok {
                    want[r * ntok + t] = (0..cols)
                        .map(|c| codes[r][c] as i32 * x[t * w.kpad + c] as i32)
                        .sum();
                    assert!((0..cols).all(|c| w.code(r, c) == codes[r][c]));
                }
            }
            for k in variants() {
                let mut got = vec![0i32; rows * ntok];
                k.code_dots(w.data.as_slice(), w.row_bytes(), &x, ntok, &mut got);
                assert_eq!(
                    got,
                    want,
                    "{} rows={rows} cols={cols} ntok={ntok}",
                    k.name()
                );
            }
        }
    }

    #[test]
    fn all_plus_one_with_max_activations_does_not_overflow() {
        // Worst case for i16 accumulation (every code 2, every activation ±127, many blocks)
        // and for the i32 sums of pre-scaled bit fields (the widest input a config may have).
        for cols in [128 * 40, 1 << 18] {
            let w = PackedTernary::from_codes(&vec![vec![2u8; cols]; 4], cols, vec![1.0; 4]);
            for sign in [127i8, -127] {
                let x = vec![sign; cols];
                for k in variants() {
                    let mut got = [0i32; 4];
                    k.code_dots(w.data.as_slice(), cols / 4, &x, 1, &mut got);
                    assert_eq!(got, [2 * sign as i32 * cols as i32; 4], "{}", k.name());
                }
            }
        }
    }

    #[test]
    fn multi_token_head_equals_the_one_token_head_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(11);
        for (rows, cols) in [(5, 31), (7, 64), (3, 96), (9, 640), (4, 2561)] {
            let w: Vec<u16> = (0..rows * cols)
                .map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)).to_bits())
                .collect();
            for ntok in 1..=9 {
                let x: Vec<f32> = (0..ntok * cols)
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect();
                for k in variants() {
                    let mut xp = vec![0.0; ntok * cols];
                    for (a, b) in x.chunks(cols).zip(xp.chunks_mut(cols)) {
                        k.prepare_bf16_activations(a, b);
                    }
                    let mut got = vec![0.0; ntok * rows];
                    k.head_bf16_multi(&w, cols, &xp, ntok, &mut got);
                    for t in 0..ntok {
                        let mut want = vec![0.0; rows];
                        let plain = k.with_prefetch(0);
                        plain.head_bf16(&w, cols, &xp[t * cols..(t + 1) * cols], &mut want);
                        let g = &got[t * rows..(t + 1) * rows];
                        assert!(
                            g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{} rows={rows} cols={cols} ntok={ntok} t={t}",
                            k.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn head_dots_match_scalar() {
        let mut rng = StdRng::seed_from_u64(9);
        for n in [1, 31, 64, 100, 2560, 2561] {
            let wb: Vec<u16> = (0..n)
                .map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)).to_bits())
                .collect();
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let wi: Vec<i8> = (0..n).map(|_| rng.random_range(-127..=127)).collect();
            let xi: Vec<i8> = (0..n).map(|_| rng.random_range(-127..=127)).collect();
            let f_ref: f64 = wb
                .iter()
                .zip(&x)
                .map(|(&b, &v)| half::bf16::from_bits(b).to_f64() * v as f64)
                .sum();
            let i_ref: i32 = wi.iter().zip(&xi).map(|(&a, &b)| a as i32 * b as i32).sum();
            for k in variants() {
                assert_eq!(k.dot_i8(&wi, &xi), i_ref, "{} n={n}", k.name());
                let mut xp = vec![0.0; n];
                k.prepare_bf16_activations(&x, &mut xp);
                let mut two = [0.0f32; 2];
                let w2: Vec<u16> = wb.iter().chain(wb.iter().rev()).copied().collect();
                k.head_bf16(&w2, n, &xp, &mut two);
                let rev_ref: f64 = wb
                    .iter()
                    .rev()
                    .zip(&x)
                    .map(|(&b, &v)| half::bf16::from_bits(b).to_f64() * v as f64)
                    .sum();
                assert!(
                    (two[0] as f64 - f_ref).abs() <= 1e-4 * (1.0 + f_ref.abs()),
                    "{} n={n}",
                    k.name()
                );
                assert!(
                    (two[1] as f64 - rev_ref).abs() <= 1e-4 * (1.0 + rev_ref.abs()),
                    "{} n={n}",
                    k.name()
                );
            }
        }
    }
}
