//! The CPU backend: weights repacked for SIMD kernels, threads via rayon.

pub mod batch;
pub mod head;
pub mod kernels;
pub mod membw;
pub mod packed;
pub mod team;

use std::cell::RefCell;
use std::sync::Arc;

use crate::arch::GatedAct;
use crate::backend::{Backend, HeadMode, KvCache, KvDtype, Linear, LogitRows, NormSite};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::format::{FloatTensor, Weights};
use crate::reference as ops;
use head::Head;
use kernels::{Kernels, PREFETCH_BYTES};
use packed::{padded_cols, PackedTernary};
use team::Team;

/// Ternary weights from this size on decide the kernels' prefetch distance by measurement
/// ([`CpuBackend::on_shared`]); smaller ones stay in the caches, where it does not matter.
pub const CALIBRATE_BYTES: u64 = 128 << 20;

/// Options of the CPU backend.
#[derive(Debug, Clone, Default)]
pub struct CpuOptions {
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// Head storage.
    pub head: HeadMode,
    /// Kernel set (None = the fastest detected).
    pub kernels: Option<Kernels>,
    /// KV cache type: f32; f16 rounds every cached key and value to f16 (stored in f32), the
    /// numerics of the GPU's f16 cache, for comparing the two; int8 stores them as int8 rows
    /// with a scale each.
    pub kv: KvDtype,
    /// Bytes the kernels' weight streams prefetch ahead (None: measured on this machine, see
    /// [`CpuBackend::on_shared`]; 0: none).
    pub prefetch: Option<usize>,
}

/// A [`CpuBackend`]'s weights in kernel form, shared by every backend made from them
/// ([`CpuBackend::on_shared`]): several serving workers on one model hold one copy.
#[derive(Clone)]
pub struct CpuShared {
    layers: Arc<[CpuLayer]>,
    head: Arc<Head>,
}

struct CpuLayer {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    attn_sub_norm: Vec<f32>,
    ffn_sub_norm: Vec<f32>,
    linear_norms: Vec<Vec<f32>>,
    qkv: PackedTernary,
    o: PackedTernary,
    gate_up: PackedTernary,
    down: PackedTernary,
}

/// Activation buffers of one step, grown to the largest step seen.
#[derive(Default)]
struct Step {
    t: usize,
    x: Vec<f32>,
    tmp: Vec<f32>,
    xq: Vec<i8>,
    /// `xq` laid out for the kernels, once per matmul ([`Kernels::lay_out_tokens`]).
    xq_tiles: kernels::TokenTiles,
    /// Whether `xq_tiles` holds the current matmul's activations.
    tiled: bool,
    xscale: Vec<f32>,
    xsum: Vec<i32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    gu: Vec<f32>,
    mlp: Vec<f32>,
    head_q: Vec<i8>,
    head_x: Vec<f32>,
    /// The normed residual stream of a step (`use_rms_norm`: each linear's norm reads it).
    normed: Vec<f32>,
}

/// The rows of a float store (f32, or f16-rounded f32) as attention reads them: position `p`
/// at row `row(p)`.
pub(crate) struct FloatRows<'a, F> {
    pub(crate) k: &'a [f32],
    pub(crate) v: &'a [f32],
    pub(crate) hd: usize,
    pub(crate) row: F,
}

/// The rows of an int8 store as attention reads them: position `p` at row `row(p)`.
pub(crate) struct Int8Rows<'a, F> {
    pub(crate) k: &'a [i8],
    pub(crate) v: &'a [i8],
    pub(crate) k_scale: &'a [f32],
    pub(crate) v_scale: &'a [f32],
    pub(crate) hd: usize,
    pub(crate) row: F,
}

/// A store's rows for attention, of either kind.
enum Rows<'a, F> {
    Float(FloatRows<'a, F>),
    Int8(Int8Rows<'a, F>),
}

impl<F: Fn(usize) -> usize> Int8Rows<'_, F> {
    /// Attention of `q` over positions `p < len` ([`ops::attend_with`] reading int8).
    #[inline(always)]
    fn attend(&self, q: &[f32], len: usize, scores: &mut [f32], out: &mut [f32]) {
        let hd = self.hd;
        ops::attend_with(
            hd,
            len,
            |p| {
                let r = (self.row)(p);
                ops::dot_i8(q, &self.k[r * hd..][..hd]) * self.k_scale[r]
            },
            |p, w, out| {
                let r = (self.row)(p);
                let w = w * self.v_scale[r];
                for (o, &x) in out.iter_mut().zip(&self.v[r * hd..][..hd]) {
                    *o += w * x as f32;
                }
            },
            scores,
            out,
        );
    }
}

/// Copies keys or values into a float cache, rounded to f16 first when `f16`.
fn write_float(dst: &mut [f32], src: &[f32], f16: bool) {
    if f16 {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = half::f16::from_f32(s).to_f32();
        }
    } else {
        dst.copy_from_slice(src);
    }
}

/// The keys and values of a [`CpuCache`], as its [`KvDtype`] stores them.
enum KvStore {
    /// f32 values (rounded to f16 first with [`KvDtype::F16`]).
    Float { k: Vec<f32>, v: Vec<f32> },
    /// int8 values with one scale per row of `head_dim` values.
    Int8 {
        k: Vec<i8>,
        v: Vec<i8>,
        k_scale: Vec<f32>,
        v_scale: Vec<f32>,
    },
}

impl KvStore {
    /// `rows` zeroed rows of `hd` values as `kv` stores them (lazily backed: untouched
    /// positions cost no resident memory).
    fn zeroed(kv: KvDtype, rows: usize, hd: usize) -> Self {
        let n = rows * hd;
        match kv {
            KvDtype::F32 | KvDtype::F16 => KvStore::Float {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
            KvDtype::Int8 => KvStore::Int8 {
                k: vec![0; n],
                v: vec![0; n],
                k_scale: vec![0.0; rows],
                v_scale: vec![0.0; rows],
            },
        }
    }
}

/// Keys and values in blocks: rows of `head_dim` values ordered
/// `[block][layer][kv_head][position in block]` (one block: a single sequence's
/// `[layer][kv_head][position]`).
pub struct CpuCache {
    store: KvStore,
    kv: KvDtype,
    blocks: usize,
    block_size: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl CpuCache {
    /// Row of (block, layer, kv head, position in block).
    fn row(&self, block: u32, layer: usize, kh: usize, off: usize) -> usize {
        ((block as usize * self.layers + layer) * self.kv_heads + kh) * self.block_size + off
    }

    /// Stores the key and value of row `r`.
    fn put(&mut self, r: usize, key: &[f32], value: &[f32]) {
        let hd = self.head_dim;
        let at = r * hd..(r + 1) * hd;
        match &mut self.store {
            KvStore::Float { k, v } => {
                let f16 = self.kv == KvDtype::F16;
                write_float(&mut k[at.clone()], key, f16);
                write_float(&mut v[at], value, f16);
            }
            KvStore::Int8 {
                k,
                v,
                k_scale,
                v_scale,
            } => {
                k_scale[r] = crate::quant::quantize_row_absmax(key, &mut k[at.clone()]);
                v_scale[r] = crate::quant::quantize_row_absmax(value, &mut v[at]);
            }
        }
    }

    /// Moves row `src` to row `dst`, its key turned back by `d` positions.
    fn move_row(&mut self, src: usize, dst: usize, d: usize, inv_freq: &[f32], key: &mut [f32]) {
        let hd = self.head_dim;
        match &mut self.store {
            KvStore::Float { k, v } => {
                key.copy_from_slice(&k[src * hd..][..hd]);
                ops::rope_back(key, d, inv_freq);
                write_float(&mut k[dst * hd..][..hd], key, self.kv == KvDtype::F16);
                v.copy_within(src * hd..(src + 1) * hd, dst * hd);
            }
            KvStore::Int8 {
                k,
                v,
                k_scale,
                v_scale,
            } => {
                for (o, &x) in key.iter_mut().zip(&k[src * hd..][..hd]) {
                    *o = x as f32 * k_scale[src];
                }
                ops::rope_back(key, d, inv_freq);
                k_scale[dst] = crate::quant::quantize_row_absmax(key, &mut k[dst * hd..][..hd]);
                v.copy_within(src * hd..(src + 1) * hd, dst * hd);
                v_scale[dst] = v_scale[src];
            }
        }
    }

    /// Attention of `q` over `len` positions whose rows `row(p)` gives
    /// ([`ops::attend_with`]; the f32 store's arithmetic is [`ops::attend`]'s), compiled for AVX2
    /// where the CPU has it (the same operations in the same order, so the same results).
    fn attend(
        &self,
        q: &[f32],
        len: usize,
        row: impl Fn(usize) -> usize,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            unsafe { self.attend_avx2(q, len, &row, scores, out) };
            return;
        }
        self.attend_any(q, len, &row, scores, out);
    }

    /// [`Self::attend`] through the AVX2 attention kernel (bit-identical).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn attend_avx2(
        &self,
        q: &[f32],
        len: usize,
        row: &impl Fn(usize) -> usize,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        use kernels::avx2::attend;
        if !self.head_dim.is_multiple_of(8) {
            return self.attend_any(q, len, row, scores, out);
        }
        match self.rows(row) {
            Rows::Float(r) => attend(q, len, &r, scores, out),
            Rows::Int8(r) => attend(q, len, &r, scores, out),
        }
    }

    /// [`Self::attend`] in the reference's code.
    #[inline(always)]
    fn attend_any(
        &self,
        q: &[f32],
        len: usize,
        row: &impl Fn(usize) -> usize,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        match self.rows(row) {
            Rows::Float(r) => ops::attend_rows(
                q,
                len,
                |p| &r.k[(r.row)(p) * r.hd..][..r.hd],
                |p| &r.v[(r.row)(p) * r.hd..][..r.hd],
                scores,
                out,
            ),
            Rows::Int8(r) => r.attend(q, len, scores, out),
        }
    }

    /// The store's rows, position `p` at row `row(p)`.
    fn rows<F>(&self, row: F) -> Rows<'_, F> {
        let hd = self.head_dim;
        match &self.store {
            KvStore::Float { k, v } => Rows::Float(FloatRows { k, v, hd, row }),
            KvStore::Int8 {
                k,
                v,
                k_scale,
                v_scale,
            } => Rows::Int8(Int8Rows {
                k,
                v,
                k_scale,
                v_scale,
                hd,
                row,
            }),
        }
    }
}

impl KvCache for CpuCache {
    fn blocks(&self) -> usize {
        self.blocks
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
}

/// The CPU backend.
pub struct CpuBackend {
    cfg: ModelConfig,
    kernels: Kernels,
    team: std::sync::Arc<Team>,
    embed: FloatTensor,
    shared: CpuShared,
    final_norm: Vec<f32>,
    inv_freq: Vec<f32>,
    step: Step,
    kv: KvDtype,
}

thread_local! {
    static DOTS: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs "parallel" work on the calling thread (wasm32 has no threads).
#[cfg(target_arch = "wasm32")]
struct CurrentThread;

#[cfg(target_arch = "wasm32")]
impl CurrentThread {
    fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// A buffer that parallel tasks write at disjoint places.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(*mut T);
// SAFETY: tasks only write disjoint elements (each use documents why).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn new(s: &mut [T]) -> Self {
        SharedMut(s.as_mut_ptr())
    }
    /// # Safety
    /// The range is in bounds and no other task touches it concurrently.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

impl CpuBackend {
    /// Repacks `w` for the CPU kernels.
    pub fn load(w: &Weights, opts: &CpuOptions) -> Result<Self> {
        #[cfg(not(target_arch = "wasm32"))]
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads)
            .thread_name(|i| format!("bitnet-load-{i}"))
            .build()
            .map_err(|e| Error::Backend(format!("thread pool: {e}")))?;
        // No threads on wasm32: load on the calling thread.
        #[cfg(target_arch = "wasm32")]
        let pool = CurrentThread;
        let layers = pool.install(|| {
            w.layers
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    // A converted checkpoint holds the layout, mapped: nothing is repacked.
                    let [qkv, o, gate_up, down] = match &w.kernel_layout {
                        Some(kl) => [&kl[i].qkv, &kl[i].o, &kl[i].gate_up, &kl[i].down]
                            .map(PackedTernary::from_kernel),
                        None => [
                            &[&l.q, &l.k, &l.v][..],
                            &[&l.o],
                            &[&l.gate, &l.up],
                            &[&l.down],
                        ]
                        .map(PackedTernary::from_matrices),
                    };
                    Ok(CpuLayer {
                        input_norm: l.input_norm.clone(),
                        post_attention_norm: l.post_attention_norm.clone(),
                        attn_sub_norm: l.attn_sub_norm.clone(),
                        ffn_sub_norm: l.ffn_sub_norm.clone(),
                        linear_norms: l.linear_norms.clone(),
                        qkv: qkv?,
                        o: o?,
                        gate_up: gate_up?,
                        down: down?,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let head = pool.install(|| Head::new(w.head(), opts.head));
        let shared = CpuShared {
            layers: layers.into(),
            head: Arc::new(head),
        };
        Ok(Self::on_shared(w, &shared, opts))
    }

    /// A backend on weights another one prepared from the same `w` (nothing repacked or
    /// copied; their head stays as it was prepared, whatever `opts.head` says).
    ///
    /// Without `opts.prefetch`, the prefetch distance is measured the first time a process
    /// builds a backend on weights too large for the caches ([`CALIBRATE_BYTES`]): a decode
    /// step's ternary matmuls, each half of the layers timed with and without
    /// [`PREFETCH_BYTES`] of software prefetch (the ternary bytes read twice: 50 ms for the
    /// 2B-4T shape at 20 GB/s); the distance is kept when it is at least 5% faster.
    pub fn on_shared(w: &Weights, shared: &CpuShared, opts: &CpuOptions) -> Self {
        let cfg = w.config.clone();
        // After the loading: in the threaded WebAssembly module the team's workers keep threads
        // of the pool that the loading ran on.
        let team = Arc::new(Team::new(opts.threads));
        let mut b = CpuBackend {
            inv_freq: ops::rope_inv_freq(cfg.rope_theta, cfg.head_dim),
            cfg,
            kernels: opts.kernels.unwrap_or_else(Kernels::detect),
            team,
            embed: tied_embedding(w, &shared.head).unwrap_or_else(|| w.embed.clone()),
            shared: shared.clone(),
            final_norm: w.final_norm.clone(),
            step: Step::default(),
            kv: opts.kv,
        };
        let prefetch = match opts.prefetch {
            Some(bytes) => bytes,
            None if b.kernels.prefetches() && b.ternary_bytes() >= CALIBRATE_BYTES => {
                static MEASURED: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
                *MEASURED.get_or_init(|| b.measure_prefetch())
            }
            None => 0,
        };
        b.kernels = b.kernels.with_prefetch(prefetch);
        b
    }

    /// Bytes of ternary weights (what a decode step's matmuls stream).
    fn ternary_bytes(&self) -> u64 {
        let l = &self.shared.layers;
        l.iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .map(|m| m.data.as_slice().len() as u64)
            .sum()
    }

    /// [`PREFETCH_BYTES`] if a decode step's ternary matmuls run at least 5% faster with it than
    /// without, else 0.
    fn measure_prefetch(&mut self) -> usize {
        let base = self.kernels;
        self.ensure_step(1);
        self.step.xq.fill(0);
        self.step.tiled = false;
        let wide = self
            .shared
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .map(|m| m.rows)
            .max()
            .unwrap_or(0);
        let mut out = vec![0f32; wide];
        // Each half of the layers once with and once without, in an order that never reads
        // a half twice in a row (so that neither mode finds the other's bytes in the cache).
        let (n, half) = (self.shared.layers.len(), self.shared.layers.len() / 2);
        let mut time = [0.0f64; 2];
        for (layers, pf) in [(0..half, 0), (half..n, 1), (0..half, 1), (half..n, 0)] {
            self.kernels = base.with_prefetch(pf * PREFETCH_BYTES);
            let t = crate::time::Instant::now();
            for l in &self.shared.layers[layers] {
                for m in [&l.qkv, &l.o, &l.gate_up, &l.down] {
                    self.matmul(m, 0..m.rows, out.as_mut_ptr(), m.rows, false);
                }
            }
            time[pf] += t.elapsed().as_secs_f64();
        }
        self.kernels = base;
        if time[1] < 0.95 * time[0] {
            PREFETCH_BYTES
        } else {
            0
        }
    }

    /// This backend's weights, to build more backends on ([`Self::on_shared`]).
    pub fn shared(&self) -> CpuShared {
        self.shared.clone()
    }

    /// Runs this backend's parallel work on `other`'s threads from now on (two models used
    /// in turn, as a draft model and its target, then never spin against each other).
    pub fn share_threads(&mut self, other: &CpuBackend) {
        self.team = other.team.clone();
    }

    /// Worker threads.
    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    /// The kernel set in use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    fn ensure_step(&mut self, t: usize) {
        let c = &self.cfg;
        let s = &mut self.step;
        s.t = t;
        if s.x.len() >= t * c.hidden_size {
            return;
        }
        let wide = c.hidden_size.max(c.q_dim()).max(c.intermediate_size);
        s.x = vec![0.0; t * c.hidden_size];
        s.tmp = vec![0.0; t * wide];
        s.xq = vec![0; t * padded_cols(wide)];
        s.xscale = vec![0.0; t];
        s.xsum = vec![0; t];
        s.qkv = vec![0.0; t * (c.q_dim() + 2 * c.kv_dim())];
        s.attn = vec![0.0; t * c.q_dim()];
        s.gu = vec![0.0; t * 2 * c.intermediate_size];
        s.mlp = vec![0.0; t * c.intermediate_size];
        s.head_q = vec![0; c.hidden_size];
        s.head_x = vec![0.0; c.hidden_size];
        s.normed = vec![0.0; t * c.hidden_size];
    }

    /// Ternary matmul of the step's quantized rows (stride `w.kpad`) by rows `rows` of `w`
    /// (a multiple of 4 apart); writes (or adds into) `out[t * ld + r]`.
    fn matmul(
        &self,
        w: &PackedTernary,
        rows: std::ops::Range<usize>,
        out: *mut f32,
        ld: usize,
        accumulate: bool,
    ) {
        let s = &self.step;
        let t = s.t;
        let rb = w.row_bytes();
        let x = &s.xq[..t * w.kpad];
        let (xscale, xsum) = (&s.xscale[..t], &s.xsum[..t]);
        let k = self.kernels;
        // Rows per task (multiples of 4). A step of at most one token tile streams the
        // weights once: one contiguous range per thread, since every new range restarts the
        // hardware prefetcher (256-row tasks made decode's matmuls 17% slower on Zen 4, and
        // 5-token verification steps 4-10% slower).
        // Longer steps re-read a task's rows for every tile of tokens: tasks that stay in L2,
        // several per thread for balance.
        let nrows = rows.len();
        let threads = self.team.threads();
        let per = if t <= k.one_tile_tokens() {
            nrows.div_ceil(threads).div_ceil(4) * 4
        } else {
            (nrows / (threads * 8)).clamp(4, 256) / 4 * 4
        };
        let out = SharedMut(out);
        self.team.run(nrows.div_ceil(per), &|c| {
            let r0 = rows.start + c * per;
            let n = per.min(rows.end - r0);
            let chunk = &w.data.as_slice()[r0 * rb..(r0 + n) * rb];
            DOTS.with_borrow_mut(|dots| {
                if dots.len() < n * t {
                    dots.resize(n * t, 0);
                }
                if s.tiled {
                    k.code_dots_tiled(chunk, rb, x, t, &s.xq_tiles, dots);
                } else {
                    k.code_dots(chunk, rb, x, t, dots);
                }
                let dots = &dots[..n * t];
                let rs = &w.row_scale[r0..r0 + n];
                for ti in 0..t {
                    // SAFETY: each (token, row) element is written by exactly one task, and
                    // `out` holds `t * ld` elements with `r0 + n <= ld`.
                    let o = unsafe { out.slice(ti * ld + r0, n) };
                    epilogue(o, dots, ti, t, xsum[ti], xscale[ti], rs, accumulate);
                }
            });
        });
    }
}

/// One token's outputs of a task's rows: `o[r] (+)= (dots[r * t + ti] - xsum) · xscale ·
/// rs[r]`, in that order of operations (the results do not depend on the step's size). One
/// tight loop per token, so that the compiler vectorizes it (the contiguous one-token case
/// fully).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn epilogue(
    o: &mut [f32],
    dots: &[i32],
    ti: usize,
    t: usize,
    xsum: i32,
    xscale: f32,
    rs: &[f32],
    accumulate: bool,
) {
    let d = dots[ti..].iter().step_by(t);
    let v = d.zip(rs).map(|(&d, &rs)| (d - xsum) as f32 * xscale * rs);
    if accumulate {
        o.iter_mut().zip(v).for_each(|(p, v)| *p += v);
    } else {
        o.iter_mut().zip(v).for_each(|(p, v)| *p = v);
    }
}

impl CpuBackend {
    /// Final norm and head of the step's `rows` into `out` (`rows.len() × vocab`), the head's
    /// weights read once for all of them.
    fn head_rows(
        &mut self,
        rows: impl ExactSizeIterator<Item = usize>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (h, vocab) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let s = &mut self.step;
        let n = rows.len();
        if s.normed.len() < n * h {
            s.normed.resize(n * h, 0.0);
        }
        for (dst, r) in s.normed.chunks_mut(h).zip(rows) {
            if r >= s.t {
                return Err(Error::Request(format!(
                    "logits of row {r} requested from a {}-row step",
                    s.t
                )));
            }
            ops::rmsnorm(
                &s.x[r * h..(r + 1) * h],
                &self.final_norm,
                self.cfg.rms_norm_eps,
                dst,
            );
        }
        out.clear();
        out.resize(n * vocab, 0.0);
        s.head_q.resize(n * h, 0);
        s.head_x.resize(n * h, 0.0);
        self.shared.head.logits_batch(
            &self.team,
            self.kernels,
            &s.normed[..n * h],
            h,
            &mut s.head_q,
            &mut s.head_x,
            out,
        );
        Ok(())
    }
}

/// A tied model's embedding as the head's copy of the same rows (huge pages, already
/// resident), so that looking tokens up does not map the checkpoint's pages back in.
fn tied_embedding(w: &Weights, head: &Head) -> Option<FloatTensor> {
    // Tied: the head was prepared from `w.embed` itself.
    w.lm_head
        .is_none()
        .then(|| head.bf16_tensor().cloned())
        .flatten()
}

/// RMSNorm (with gamma `w`; none: no norm) + int8 quantization of `t` rows of `src` (width
/// `width`), with the padded stride of the consuming matrix. `tmp` holds `t * width` scratch.
#[allow(clippy::too_many_arguments)]
fn norm_quant_rows(
    team: &Team,
    t: usize,
    src: &[f32],
    width: usize,
    w: Option<&[f32]>,
    eps: f32,
    tmp: &mut [f32],
    xq: &mut [i8],
    xscale: &mut [f32],
    xsum: &mut [i32],
) {
    let kpad = padded_cols(width);
    let (tmp, xq, xscale, xsum) = (
        SharedMut::new(tmp),
        SharedMut::new(xq),
        SharedMut::new(xscale),
        SharedMut::new(xsum),
    );
    team.run(t, &|i| {
        // SAFETY: task i touches only row i of each buffer; all hold at least t rows.
        let (buf, q, sc, sm) = unsafe {
            (
                tmp.slice(i * width, width),
                xq.slice(i * kpad, kpad),
                xscale.slice(i, 1),
                xsum.slice(i, 1),
            )
        };
        let row = &src[i * width..(i + 1) * width];
        let absmax = match w {
            Some(w) => ops::rmsnorm_quant(row, w, eps, buf, q),
            None => crate::quant::quantize_activations(row, q),
        };
        sc[0] = absmax / 127.0;
        sm[0] = q.iter().map(|&v| v as i32).sum();
    });
}

impl Backend for CpuBackend {
    type Cache = CpuCache;

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn describe(&self) -> String {
        let pf = match self.kernels.prefetch() {
            0 => String::new(),
            b => format!(", prefetch {} KiB", b / 1024),
        };
        format!(
            "cpu ({} kernels, {} threads{pf})",
            self.kernels.name(),
            self.team.threads()
        )
    }

    fn new_pool(&self, blocks: usize, block_size: usize) -> Result<CpuCache> {
        let c = &self.cfg;
        let rows = blocks
            .checked_mul(block_size * c.num_layers * c.num_kv_heads)
            .filter(|r| r.checked_mul(c.head_dim * 8).is_some())
            .ok_or_else(|| Error::Request("KV cache size overflows".into()))?;
        Ok(CpuCache {
            store: KvStore::zeroed(self.kv, rows, c.head_dim),
            kv: self.kv,
            blocks,
            block_size,
            layers: c.num_layers,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        })
    }

    fn block_bytes(&self, block_size: usize) -> usize {
        // f16 values are held as f32 on the CPU.
        let kv = match self.kv {
            KvDtype::F16 => KvDtype::F32,
            kv => kv,
        };
        2 * block_size
            * self.cfg.num_layers
            * self.cfg.num_kv_heads
            * kv.row_bytes(self.cfg.head_dim)
    }

    fn embed(&mut self, tokens: &[u32]) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Request(format!(
                "token id {bad} is out of range (vocab_size {vocab})"
            )));
        }
        self.ensure_step(tokens.len());
        let h = self.cfg.hidden_size;
        for (row, &tok) in self.step.x.chunks_mut(h).zip(tokens) {
            self.embed.row_into(tok as usize, row);
        }
        Ok(())
    }

    fn rmsnorm_quant(&mut self, layer: usize, site: NormSite) {
        let l = &self.shared.layers[layer];
        let w = match site {
            NormSite::Input => &l.input_norm,
            NormSite::PostAttention => &l.post_attention_norm,
        };
        let s = &mut self.step;
        norm_quant_rows(
            &self.team,
            s.t,
            &s.x,
            self.cfg.hidden_size,
            Some(w),
            self.cfg.rms_norm_eps,
            &mut s.tmp,
            &mut s.xq,
            &mut s.xscale,
            &mut s.xsum,
        );
    }

    fn attn_out_quant(&mut self, layer: usize, sub_norm: bool) {
        let w = &self.shared.layers[layer].attn_sub_norm;
        let s = &mut self.step;
        norm_quant_rows(
            &self.team,
            s.t,
            &s.attn,
            self.cfg.q_dim(),
            sub_norm.then_some(&w[..]),
            self.cfg.sub_norm_eps(),
            &mut s.tmp,
            &mut s.xq,
            &mut s.xscale,
            &mut s.xsum,
        );
    }

    fn gated_act_quant(&mut self, layer: usize, act: GatedAct, sub_norm: bool) {
        let i = self.cfg.intermediate_size;
        let s = &mut self.step;
        for (gu, m) in s.gu[..s.t * 2 * i].chunks(2 * i).zip(s.mlp.chunks_mut(i)) {
            ops::gated_act(act, &gu[..i], &gu[i..], m);
        }
        let w = &self.shared.layers[layer].ffn_sub_norm;
        norm_quant_rows(
            &self.team,
            s.t,
            &s.mlp,
            i,
            sub_norm.then_some(&w[..]),
            self.cfg.sub_norm_eps(),
            &mut s.tmp,
            &mut s.xq,
            &mut s.xscale,
            &mut s.xsum,
        );
    }

    fn ternary_matmul(&mut self, layer: usize, linear: Linear) {
        let l = &self.shared.layers[layer];
        let s = &mut self.step;
        let (fused, part) = match linear.part_of(&self.cfg) {
            Some((fused, rows)) => (fused, Some(rows)),
            None => (linear, None),
        };
        let (w, out, accumulate) = match fused {
            Linear::Qkv => (&l.qkv, s.qkv.as_mut_ptr(), false),
            Linear::O => (&l.o, s.x.as_mut_ptr(), true),
            Linear::GateUp => (&l.gate_up, s.gu.as_mut_ptr(), false),
            _ => (&l.down, s.x.as_mut_ptr(), true),
        };
        let rows = part.unwrap_or(0..w.rows);
        s.tiled = self
            .kernels
            .lay_out_tokens(&s.xq, w.kpad, s.t, &mut s.xq_tiles);
        // The output buffers are not read by `matmul` (it reads xq/xscale/xsum/xq_tiles only).
        self.matmul(w, rows, out, w.rows, accumulate);
    }

    fn linear_norm_quant(&mut self, layer: usize, site: NormSite, linear: Linear) {
        let l = &self.shared.layers[layer];
        let (h, eps) = (self.cfg.hidden_size, self.cfg.sub_norm_eps());
        let first = match site {
            NormSite::Input => &l.input_norm,
            NormSite::PostAttention => &l.post_attention_norm,
        };
        let own = crate::format::NORMED_PARTS
            .iter()
            .position(|(p, _)| *p == linear)
            .and_then(|i| l.linear_norms.get(i))
            .map_or(&[][..], |w| &w[..]);
        let s = &mut self.step;
        for (x, n) in s.x[..s.t * h].chunks(h).zip(s.normed.chunks_mut(h)) {
            crate::reference::rmsnorm(x, first, self.cfg.rms_norm_eps, n);
        }
        norm_quant_rows(
            &self.team,
            s.t,
            &s.normed,
            h,
            Some(own),
            eps,
            &mut s.tmp,
            &mut s.xq,
            &mut s.xscale,
            &mut s.xsum,
        );
    }

    fn rope_kv_write(&mut self, cache: &mut CpuCache, layer: usize, pos: usize) {
        let c = &self.cfg;
        let (hd, q, kv) = (c.head_dim, c.q_dim(), c.kv_dim());
        let s = &mut self.step;
        for (ti, row) in s.qkv[..s.t * (q + 2 * kv)]
            .chunks_mut(q + 2 * kv)
            .enumerate()
        {
            let p = pos + ti;
            ops::rope_heads(&mut row[..q + kv], hd, p, &self.inv_freq);
            for h in 0..c.num_kv_heads {
                let (ks, vs) = (q + h * hd, q + kv + h * hd);
                cache.put(
                    cache.row(0, layer, h, p),
                    &row[ks..ks + hd],
                    &row[vs..vs + hd],
                );
            }
        }
    }

    fn attention(&mut self, cache: &CpuCache, layer: usize, pos: usize) {
        let c = &self.cfg;
        let (hd, q, kv) = (c.head_dim, c.q_dim(), c.kv_dim());
        let group = c.num_heads / c.num_kv_heads;
        let (nh, cap) = (c.num_heads, cache.block_size);
        let s = &mut self.step;
        let qkv = &s.qkv;
        let attn = SharedMut::new(&mut s.attn);
        self.team.run(s.t * nh, &|i| {
            let (ti, h) = (i / nh, i % nh);
            let len = pos + ti + 1;
            let qv = &qkv[ti * (q + 2 * kv) + h * hd..][..hd];
            let base = cache.row(0, layer, h / group, 0);
            // SAFETY: task i writes only head h of token ti.
            let out = unsafe { attn.slice(i * hd, hd) };
            SCORES.with_borrow_mut(|scores| {
                if scores.len() < len {
                    scores.resize(cap.max(len), 0.0);
                }
                cache.attend(qv, len, |p| base + p, scores, out);
            });
        });
    }

    fn kv_shift(
        &mut self,
        cache: &mut CpuCache,
        table: &[u32],
        from: usize,
        to: usize,
        n: usize,
    ) -> Result<()> {
        let bs = cache.block_size;
        crate::backend::check_shift(table.len() * bs, from, to, n)?;
        let mut key = vec![0.0; cache.head_dim];
        let at = |p: usize| (table[p / bs], p % bs);
        // Ascending: a row is read before anything lands on it (to < from).
        for layer in 0..cache.layers {
            for kh in 0..cache.kv_heads {
                for i in 0..n {
                    let ((sb, so), (db, d_off)) = (at(from + i), at(to + i));
                    let (src, dst) = (
                        cache.row(sb, layer, kh, so),
                        cache.row(db, layer, kh, d_off),
                    );
                    cache.move_row(src, dst, from - to, &self.inv_freq, &mut key);
                }
            }
        }
        Ok(())
    }

    fn logits(&mut self, rows: LogitRows, out: &mut Vec<f32>) -> Result<()> {
        let t = self.step.t;
        match rows {
            LogitRows::None => Ok(()),
            LogitRows::Last => self.head_rows(t - 1..t, out),
            LogitRows::All => self.head_rows(0..t, out),
        }
    }

    fn decode_bytes_per_token(&self) -> u64 {
        let ternary: usize = self
            .shared
            .layers
            .iter()
            .map(|l| {
                [&l.qkv, &l.o, &l.gate_up, &l.down]
                    .iter()
                    .map(|m| m.data.as_slice().len())
                    .sum::<usize>()
            })
            .sum();
        let norms =
            self.shared.layers.len() * 4 * (2 * self.cfg.hidden_size + self.cfg.intermediate_size);
        ternary as u64 + self.shared.head.bytes() + norms as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn a_tied_embedding_reads_the_heads_copy_and_the_same_rows() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        let w = crate::format::safetensors::load(&dir).unwrap();
        assert!(w.lm_head.is_none(), "the fixture is tied");
        let b = CpuBackend::load(&w, &CpuOptions::default()).unwrap();
        let head = b.shared.head.bf16_tensor().unwrap();
        assert_eq!(
            b.embed.bytes.as_slice().as_ptr(),
            head.bytes.as_slice().as_ptr()
        );
        let (mut got, mut want) = (vec![0.0; w.embed.cols], vec![0.0; w.embed.cols]);
        for r in [0, 1, w.embed.rows - 1] {
            b.embed.row_into(r, &mut got);
            w.embed.row_into(r, &mut want);
            assert_eq!(got, want, "row {r}");
        }
        let int8 = CpuOptions {
            head: HeadMode::Int8,
            ..Default::default()
        };
        let b = CpuBackend::load(&w, &int8).unwrap();
        assert_eq!(
            b.embed.bytes.as_slice().as_ptr(),
            w.embed.bytes.as_slice().as_ptr()
        );
    }

    fn cache(kv: KvDtype, rows: usize, hd: usize) -> CpuCache {
        CpuCache {
            store: KvStore::zeroed(kv, rows, hd),
            kv,
            blocks: 1,
            block_size: rows,
            layers: 1,
            kv_heads: 1,
            head_dim: hd,
        }
    }

    /// The int8 cache holds each row to within half a step of its own scale (absmax / 127), and
    /// its attention is the f32 attention of those dequantized rows (odd lengths and widths).
    #[test]
    fn int8_rows_round_within_half_a_step_and_attend_as_dequantized() {
        let mut rng = StdRng::seed_from_u64(7);
        for (len, hd) in [(1, 8), (37, 64), (5, 13), (130, 128)] {
            let rows: Vec<Vec<f32>> = (0..2 * len)
                .map(|r| {
                    let amp = 0.1 + (r % 7) as f32;
                    (0..hd).map(|_| rng.random_range(-amp..amp)).collect()
                })
                .collect();
            let mut c8 = cache(KvDtype::Int8, len, hd);
            let mut deq = cache(KvDtype::F32, len, hd);
            for p in 0..len {
                c8.put(p, &rows[2 * p], &rows[2 * p + 1]);
            }
            let KvStore::Int8 {
                k,
                v,
                k_scale,
                v_scale,
            } = &c8.store
            else {
                unreachable!()
            };
            for p in 0..len {
                let back = |q: &[i8], s: f32| q.iter().map(|&x| x as f32 * s).collect::<Vec<_>>();
                let (kd, vd) = (
                    back(&k[p * hd..][..hd], k_scale[p]),
                    back(&v[p * hd..][..hd], v_scale[p]),
                );
                for (orig, got, s) in [
                    (&rows[2 * p], &kd, k_scale[p]),
                    (&rows[2 * p + 1], &vd, v_scale[p]),
                ] {
                    for (a, b) in orig.iter().zip(got) {
                        assert!((a - b).abs() <= 0.5 * s * 1.0001, "{a} vs {b} (scale {s})");
                    }
                }
                deq.put(p, &kd, &vd);
            }
            let q: Vec<f32> = (0..hd).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut s1, mut s2) = (vec![0.0; len], vec![0.0; len]);
            let (mut o8, mut of) = (vec![0.0; hd], vec![0.0; hd]);
            c8.attend(&q, len, |p| p, &mut s1, &mut o8);
            deq.attend(&q, len, |p| p, &mut s2, &mut of);
            for (a, b) in o8.iter().zip(&of) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "len {len} hd {hd}: {a} vs {b}"
                );
            }
        }
    }

    /// The AVX2 attention kernel gives the reference's results bit for bit on every store
    /// (f32, f16-rounded, int8), odd lengths and widths, positions scattered over the rows, and
    /// peaked softmaxes (queries 100× larger) where most weights underflow to zero and
    /// some to subnormals.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_attention_equals_the_reference_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        let (mut zeros, mut tiny) = (0, 0);
        for kv in [KvDtype::F32, KvDtype::F16, KvDtype::Int8] {
            for hd in [8, 16, 40, 64, 72, 128] {
                for (len, qamp) in [1, 7, 8, 9, 63, 270]
                    .into_iter()
                    .flat_map(|l| [(l, 3.0f32), (l, 300.0)])
                {
                    let rows = len + 5;
                    let mut c = cache(kv, rows, hd);
                    for r in 0..rows {
                        let amp = 0.1 + (r % 5) as f32;
                        let kr: Vec<f32> = (0..hd).map(|_| rng.random_range(-amp..amp)).collect();
                        let vr: Vec<f32> = (0..hd).map(|_| rng.random_range(-amp..amp)).collect();
                        c.put(r, &kr, &vr);
                    }
                    let q: Vec<f32> = (0..hd).map(|_| rng.random_range(-qamp..qamp)).collect();
                    let row = |p: usize| (p * 7 + 3) % rows;
                    let (mut s1, mut o1) = (vec![0.0; len], vec![0.0; hd]);
                    c.attend_any(&q, len, &row, &mut s1, &mut o1);
                    let (mut s2, mut o2) = (vec![0.0; len], vec![0.0; hd]);
                    // SAFETY: AVX2 detected.
                    unsafe { c.attend_avx2(&q, len, &row, &mut s2, &mut o2) };
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&s2), bits(&s1), "scores {kv:?} hd={hd} len={len}");
                    assert_eq!(bits(&o2), bits(&o1), "out {kv:?} hd={hd} len={len}");
                    if qamp > 100.0 && len == 270 {
                        zeros += s1.iter().filter(|&&w| w == 0.0).count();
                        tiny += s1.iter().filter(|&&w| w != 0.0 && w < 1e-30).count();
                    }
                }
            }
        }
        // The peaked cases did exercise skipped and tiny weights.
        assert!(
            zeros > 1000 && tiny > 0,
            "{zeros} zero, {tiny} tiny weights"
        );
    }

    /// A moved row's key is the key turned back by the distance (f32 exactly [`ops::rope_back`],
    /// int8 within a step of each scale) and its value is unchanged.
    #[test]
    fn moved_rows_turn_keys_back_and_keep_values() {
        let hd = 16;
        let inv = ops::rope_inv_freq(10000.0, hd);
        let key: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.7).sin()).collect();
        let value: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.3).cos()).collect();
        let mut want = key.clone();
        ops::rope_back(&mut want, 5, &inv);
        for kv in [KvDtype::F32, KvDtype::Int8] {
            let mut c = cache(kv, 8, hd);
            c.put(6, &key, &value);
            let mut scratch = vec![0.0; hd];
            c.move_row(6, 1, 5, &inv, &mut scratch);
            let (k1, v1, tol) = match &c.store {
                KvStore::Float { k, v } => (k[hd..2 * hd].to_vec(), v[hd..2 * hd].to_vec(), 0.0),
                KvStore::Int8 {
                    k,
                    v,
                    k_scale,
                    v_scale,
                } => (
                    k[hd..2 * hd]
                        .iter()
                        .map(|&x| x as f32 * k_scale[1])
                        .collect(),
                    v[hd..2 * hd]
                        .iter()
                        .map(|&x| x as f32 * v_scale[1])
                        .collect(),
                    k_scale[6].max(k_scale[1]),
                ),
            };
            for (a, b) in k1.iter().zip(&want) {
                assert!((a - b).abs() <= tol, "{kv:?}: key {a} vs {b}");
            }
            for (a, b) in v1.iter().zip(&value) {
                assert!(
                    (a - b).abs() <= 0.5 * tol + f32::EPSILON,
                    "{kv:?}: value {a} vs {b}"
                );
            }
        }
    }
}
