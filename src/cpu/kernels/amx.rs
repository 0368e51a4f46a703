//! Intel AMX kernel for steps of several tokens (prefill, batched rows, speculative
//! verification): `tdpbusd` multiplies a 16-row × 64-column tile of unsigned codes by a
//! 64-column × 16-token tile of int8 activations into 16 × 16 i32 sums in one instruction,
//! sixteen times the multiply-adds of a 512-bit `vpdpbusd`. Integer sums, so the results
//! equal every other kernel set's bit for bit. One-token steps keep the AVX-512 decode kernel
//! (a tile's arithmetic would be 15/16 wasted there, and decode is bound by memory anyway).
//!
//! Per block of 128 columns and 16 rows (four row groups) the packed codes are unpacked into
//! two code tiles in L1 (one per 64 columns: a row's bit fields 0 and 1, then 2 and 3), loaded
//! once and multiplied by the activations of up to [`TILES`] × 16 tokens, laid out in tile
//! order (`B[k][4n + i] = x[n][64q + 4k + i]`, [`Tiles`]) once per matmul by the CPU backend
//! or once per call.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use super::prefetch_ahead;
use crate::cpu::packed::{BLOCK, GROUP};

/// Weight rows per tile (four row groups).
const ROWS: usize = 16;
/// Tokens per tile.
const TOKENS: usize = 16;
/// Token tiles per pass over the weights (accumulator tiles `tmm0`–`tmm3`).
pub const TILES: usize = 4;
/// Bytes of one tile (16 rows of 64 bytes).
const TILE_BYTES: usize = 1024;

/// Whether this CPU and OS run AMX-INT8: CPUID says AMX-TILE and AMX-INT8, and Linux grants
/// the process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, asked once).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7 exists on every x86_64 CPU that has AVX-512 (checked by the caller
        // before this kernel set is offered).
        let edx = __cpuid_count(7, 0).edx;
        let cpu = edx & (1 << 24) != 0 && edx & (1 << 25) != 0;
        cpu && request_tile_data()
    })
}

/// Asks Linux for permission to use the AMX tile data state; false elsewhere or when refused.
fn request_tile_data() -> bool {
    #[cfg(target_os = "linux")]
    {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: the arch_prctl system call with these arguments only changes the process's
        // permitted extended state; it reads and writes no user memory.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = ROWS as u8;
        t += 1;
    }
    TileConfig(c)
};

/// A cache line: the tile buffers' unit, so that every tile row is one aligned line (a
/// misaligned `tileloadd` runs three to four times slower).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A thread's tile buffers, in [`Line`]s: the code tiles (two sets, alternating blocks) and
/// the accumulators' store.
#[derive(Default)]
struct Scratch {
    codes: Vec<Line>,
    sums: Vec<Line>,
    configured: bool,
}

/// `v` resized to hold at least `bytes` (zeroed when grown), as a byte pointer.
fn lines(v: &mut Vec<Line>, bytes: usize) -> *mut u8 {
    v.resize(bytes.div_ceil(64), Line([0; 64]));
    v.as_mut_ptr() as *mut u8
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// `tileloadd` of the 1 KiB tile at `$p` (rows 64 bytes apart) into tile register `$t`.
macro_rules! load_tile {
    ($t:literal, $p:expr) => {
        asm!(concat!("tileloadd ", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) 64usize, options(nostack))
    };
}

/// The instruction `$pre tmmC $post` on accumulator tile `C = $c` (0..4, at run time), with
/// the remaining `asm!` operands.
macro_rules! on_accumulator {
    ($c:expr, $pre:literal, $post:expr, $($operands:tt)*) => {
        match $c {
            0 => asm!(concat!($pre, "tmm0", $post), $($operands)*),
            1 => asm!(concat!($pre, "tmm1", $post), $($operands)*),
            2 => asm!(concat!($pre, "tmm2", $post), $($operands)*),
            _ => asm!(concat!($pre, "tmm3", $post), $($operands)*),
        }
    };
}

/// `tdpbusd` into accumulator tile `$c` (0..4, at run time) from tile registers `$a`, `$b`.
macro_rules! dot_into {
    ($c:expr, $a:literal, $b:literal) => {
        on_accumulator!(
            $c,
            "tdpbusd ",
            concat!(", ", $a, ", ", $b),
            options(nostack, nomem)
        )
    };
}

/// Activations of a step's tokens in tile order, laid out once and read by every task of a
/// matmul: passes of up to 64 tokens; in each, for each 64-column chunk `q` and token tile
/// `j`, a 1 KiB tile whose row `k` holds token `16j + n`'s columns `64q + 4k .. 64q + 4k + 4`
/// at bytes `4n..4n + 4` (zeros past the last token).
#[derive(Default)]
pub struct Tiles {
    lines: Vec<Line>,
    ntok: usize,
    kpad: usize,
}

impl Tiles {
    /// Lays out `ntok` token rows of `kpad` activations from `x`.
    pub fn lay_out(&mut self, x: &[i8], kpad: usize, ntok: usize) {
        let chunks = kpad / 64;
        let pass_bytes = chunks * TILES * TILE_BYTES;
        self.lines.clear();
        let len = ntok.div_ceil(TILES * TOKENS) * pass_bytes;
        // SAFETY: `lines` made `len` bytes of initialized lines.
        let buf = unsafe { std::slice::from_raw_parts_mut(lines(&mut self.lines, len), len) };
        for t in 0..ntok {
            let (pass, tt) = (t / (TILES * TOKENS), t % (TILES * TOKENS));
            let ntiles = (ntok - pass * TILES * TOKENS)
                .min(TILES * TOKENS)
                .div_ceil(TOKENS);
            let (j, n) = (tt / TOKENS, tt % TOKENS);
            let row = &x[t * kpad..(t + 1) * kpad];
            for q in 0..chunks {
                let tile = &mut buf[pass * pass_bytes + (q * ntiles + j) * TILE_BYTES..];
                for k in 0..16 {
                    let src = &row[64 * q + 4 * k..][..4];
                    for (d, &v) in tile[k * 64 + 4 * n..][..4].iter_mut().zip(src) {
                        *d = v as u8;
                    }
                }
            }
        }
        (self.ntok, self.kpad) = (ntok, kpad);
    }

    /// The tiles of pass `p` (tokens `64p..`).
    fn pass(&self, p: usize) -> *const u8 {
        let pass_bytes = self.kpad / 64 * TILES * TILE_BYTES;
        (self.lines.as_ptr() as *const u8).wrapping_add(p * pass_bytes)
    }
}

thread_local! {
    static TILES_OF_CALL: RefCell<Tiles> = RefCell::default();
}

/// See [`super::scalar::code_dots`], for steps of several tokens (one token:
/// [`super::avx512::code_dots`]); lays the activations out for this call alone.
///
/// # Safety
/// As [`code_dots_tiled`].
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn code_dots(w: &[u8], rb: usize, x: &[i8], ntok: usize, out: &mut [i32], pf: usize) {
    TILES_OF_CALL.with_borrow_mut(|t| {
        t.lay_out(x, rb * 4, ntok);
        code_dots_tiled(w, rb, x, t, out, pf)
    })
}

/// [`code_dots`] with the activations `x` already laid out in `tiles` (the same tokens).
/// Rows past the last whole tile of 16 go to the AVX-512 kernel.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI and [`available`] must have returned true; sizes
/// as in [`super::Kernels::code_dots`], `tiles` laid out from `x` with `kpad = 4 * rb`.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn code_dots_tiled(
    w: &[u8],
    rb: usize,
    x: &[i8],
    tiles: &Tiles,
    out: &mut [i32],
    pf: usize,
) {
    let (rows, ntok) = (w.len() / rb, tiles.ntok);
    assert_eq!(tiles.kpad, rb * 4, "activation tiles of another width");
    let tiled = rows / ROWS * ROWS;
    if tiled > 0 {
        SCRATCH.with_borrow_mut(|s| {
            if !s.configured {
                // Once per thread: the configuration stays loaded (released tiles would
                // have to be configured again on every call, which costs more than a small
                // step's tiles).
                asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
                s.configured = true;
            }
            let (w, out) = (&w[..tiled * rb], &mut out[..tiled * ntok]);
            for (p, t0) in (0..ntok).step_by(TILES * TOKENS).enumerate() {
                let nt = (ntok - t0).min(TILES * TOKENS);
                tile_pass(w, rb, nt, tiles.pass(p), s, pf, |row, sums| {
                    // `sums[j]`: token tile j, 16 rows of 16 tokens.
                    for m in 0..ROWS {
                        let o = &mut out[(row + m) * ntok + t0..][..nt];
                        for (j, o) in o.chunks_mut(TOKENS).enumerate() {
                            o.copy_from_slice(&sums[(j * ROWS + m) * TOKENS..][..o.len()]);
                        }
                    }
                });
            }
        });
    }
    if tiled < rows {
        super::avx512::code_dots(&w[tiled * rb..], rb, x, ntok, &mut out[tiled * ntok..], pf);
    }
}

/// Every whole 16-row tile of `w` against the activation tiles of one pass at `acts` (`nt`
/// tokens):
/// `emit(first row, sums)` after each row tile, with its accumulator tiles (one per token
/// tile) stored one after the other in `sums`. The four accumulator tiles hold as many row
/// tiles × token tiles as fit (4 × 1, 2 × 2, 1 × 3 or 4), so that several independent
/// `tdpbusd` chains overlap.
#[inline(always)]
unsafe fn tile_pass(
    w: &[u8],
    rb: usize,
    nt: usize,
    acts: *const u8,
    s: &mut Scratch,
    pf: usize,
    mut emit: impl FnMut(usize, &[i32]),
) {
    let ntiles = nt.div_ceil(TOKENS);
    let per_pass = (TILES / ntiles).max(1);
    let row_tiles = w.len() / rb / ROWS;
    let nblocks = rb * 4 / BLOCK;
    // Two sets (alternating blocks) of two code tiles per row tile of a pass.
    let codes_base = lines(&mut s.codes, 2 * per_pass * 2 * TILE_BYTES);
    let sums = lines(&mut s.sums, TILES * ROWS * TOKENS * 4) as *mut i32;
    let mask = _mm512_set1_epi8(3);
    // Shift counts per 16-bit lane of a row's 32 bytes broadcast to both halves: fields 0 and
    // 1 (the code tile of columns 0..64 of the block), fields 2 and 3 (columns 64..128); the
    // mask then keeps two bits per byte.
    let fields01 = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
    let fields23 = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(6));
    let mut i0 = 0;
    while i0 < row_tiles {
        let nr = per_pass.min(row_tiles - i0);
        for c in 0..nr * ntiles {
            on_accumulator!(c, "tilezero ", "", options(nostack, nomem));
        }
        let compute = |b: usize| {
            let codes = codes_base.add((b % 2) * per_pass * 2 * TILE_BYTES);
            let acts = |q: usize, j: usize| acts.add((q * ntiles + j) * TILE_BYTES);
            if ntiles == 1 {
                load_tile!("tmm6", acts(2 * b, 0));
                load_tile!("tmm7", acts(2 * b + 1, 0));
                for r in 0..nr {
                    load_tile!("tmm4", codes.add(r * 2 * TILE_BYTES));
                    dot_into!(r, "tmm4", "tmm6");
                    load_tile!("tmm5", codes.add((r * 2 + 1) * TILE_BYTES));
                    dot_into!(r, "tmm5", "tmm7");
                }
            } else {
                for r in 0..nr {
                    load_tile!("tmm4", codes.add(r * 2 * TILE_BYTES));
                    load_tile!("tmm5", codes.add((r * 2 + 1) * TILE_BYTES));
                    for j in 0..ntiles {
                        load_tile!("tmm6", acts(2 * b, j));
                        dot_into!(r * ntiles + j, "tmm4", "tmm6");
                        load_tile!("tmm7", acts(2 * b + 1, j));
                        dot_into!(r * ntiles + j, "tmm5", "tmm7");
                    }
                }
            }
        };
        for b in 0..nblocks {
            let codes = codes_base.add((b % 2) * per_pass * 2 * TILE_BYTES);
            for r in 0..nr {
                let tile = w.as_ptr().add((i0 + r) * ROWS * rb + b * GROUP * 32);
                let dst = codes.add(r * 2 * TILE_BYTES);
                for g in 0..ROWS / GROUP {
                    let src = tile.add(g * GROUP * rb);
                    prefetch_ahead::<2>(src, pf);
                    for m in 0..GROUP {
                        let row =
                            _mm512_broadcast_i64x4(_mm256_loadu_si256(src.add(32 * m) as *const _));
                        let at = (g * GROUP + m) * 64;
                        let lo = _mm512_and_si512(_mm512_srlv_epi16(row, fields01), mask);
                        let hi = _mm512_and_si512(_mm512_srlv_epi16(row, fields23), mask);
                        _mm512_storeu_si512(dst.add(at) as *mut _, lo);
                        _mm512_storeu_si512(dst.add(TILE_BYTES + at) as *mut _, hi);
                    }
                }
            }
            // The tiles of the block before: its codes were stored an iteration ago, so the
            // tile loads do not wait on stores still in flight.
            if b > 0 {
                compute(b - 1);
            }
        }
        compute(nblocks - 1);
        for r in 0..nr {
            for j in 0..ntiles {
                let dst = sums.add(j * ROWS * TOKENS);
                on_accumulator!(
                    r * ntiles + j,
                    "tilestored [{d} + {s}*1], ",
                    "",
                    d = in(reg) dst,
                    s = in(reg) 64usize,
                    options(nostack)
                );
            }
            emit(
                (i0 + r) * ROWS,
                std::slice::from_raw_parts(sums, TILES * ROWS * TOKENS),
            );
        }
        i0 += nr;
    }
}
