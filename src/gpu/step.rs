//! Recording and reading back a step: submission in parts, readbacks, the final norm and
//! head, device selections, and access to step activations for tests.

use super::ops::topk::TopkP;
use super::*;
use crate::backend::{HeadRows, RowNeed};

/// A step activation buffer, for tests and debugging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Residual stream, `T × hidden` f32.
    Residual,
    /// Quantized activations, `T × pad64(width)/4` u32 (4 int8 each).
    Quantized,
    /// Per-token activation scale (absmax / 127), `T` f32.
    Scales,
    /// q|k|v, `T × (q + 2 kv)` f32.
    Qkv,
    /// Attention output, `T × q_dim` f32.
    Attention,
    /// gate|up, `T × 2 intermediate` f32.
    GateUp,
    /// Final-normed residual, `T × pad8(hidden)` f32.
    FinalNormed,
    /// Logits, rows × vocab f32 (row 0: the last position's after a decode step's head).
    Logits,
}

impl GpuBackend {
    /// Prints the per-kernel GPU time accumulated since profiling was turned on (stderr).
    pub fn print_gpu_profile(&mut self) {
        let Some(p) = self.rec.take_profile() else {
            return;
        };
        let total: f64 = p.iter().map(|e| e.1).sum();
        eprintln!(
            "gpu kernel time (timestamp queries), total {:.3} ms",
            total * 1e3
        );
        for (name, secs, calls) in p {
            eprintln!(
                "  {name:<20} {:>10.3} ms {:>5.1}%  {calls:>6} dispatches  {:>8.2} us/dispatch",
                secs * 1e3,
                100.0 * secs / total.max(1e-12),
                secs * 1e6 / calls.max(1) as f64
            );
        }
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterDesc {
        &self.ctx.desc
    }

    /// Most tokens in one step.
    pub fn max_step(&self) -> usize {
        self.max_step
    }

    /// Number of shards the head is split into (1 when it fits one binding).
    pub fn head_shards(&self) -> usize {
        self.head_shards.len()
    }

    /// Whether row reductions use subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.ops.subgroups
    }

    pub(super) fn t(&self) -> usize {
        self.step.t as usize
    }

    /// Checks a step of `t` tokens whose host inputs are `host`: the ids in the vocabulary,
    /// the step within what the backend was planned for.
    pub(super) fn check_inputs(&self, host: &[u32], t: usize) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        if let Some(bad) = host.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Request(format!(
                "token id {bad} is out of range (vocab_size {vocab})"
            )));
        }
        if t > self.max_step {
            return Err(Error::Request(format!(
                "{t} tokens in one step but the GPU backend was planned for at most {}",
                self.max_step
            )));
        }
        Ok(())
    }

    /// Whether the step's rows run the one-token kernels (a decode step), each row's results
    /// exactly a one-token step's.
    pub(super) fn one_token_rows(&self) -> bool {
        self.t() == 1 || self.decode_rows
    }

    /// Writes the step uniform and tokens, and submits the recorded work (if any).
    pub(super) fn flush(&mut self) -> Option<wgpu::SubmissionIndex> {
        let q = &self.ctx.queue;
        q.write_buffer(&self.bufs.step, 0, bytemuck::bytes_of(&self.step));
        if !self.tokens.is_empty() {
            let at = (self.tokens_at * 4) as u64;
            q.write_buffer(&self.bufs.tokens, at, bytemuck::cast_slice(&self.tokens));
        }
        self.rec.submit(q)
    }

    /// RoPE cos/sin per (position, j) for `positions` positions, computed exactly like the CPU
    /// backend's `ops::rope`.
    pub(super) fn rope_table(&self, positions: usize) -> wgpu::Buffer {
        let half = self.cfg.head_dim / 2;
        let mut table = Vec::with_capacity(positions * 2 * half);
        for p in 0..positions {
            for &f in &self.inv_freq[..half] {
                let (s, co) = (p as f32 * f).sin_cos();
                table.push(co);
                table.push(s);
            }
        }
        storage_init(&self.ctx.device, "rope table", bytemuck::cast_slice(&table))
    }

    /// Records the final norm, head and argmax of the step's last position (into the argmax
    /// result word).
    pub(super) fn record_argmax(&mut self) {
        self.record_head_last();
        self.ops
            .argmax
            .record(&mut self.rec, &self.argmax_bg, self.cfg.vocab_size, 1);
    }

    /// Records the final norm, head and argmax of every row of the step (argmax result words
    /// `0..t`); an error (discarding the step) past the rows one head pass holds.
    pub(super) fn record_argmax_rows(&mut self) -> Result<()> {
        let t = self.t();
        if t > self.logit_rows {
            self.rec.discard();
            return Err(Error::Request(format!(
                "the argmax of {t} rows asked of a step of at most {}",
                self.logit_rows
            )));
        }
        self.record_final_norm();
        self.step.row0 = 0;
        self.step.nrows = t as u32;
        let int8 = self.int8_head();
        for (s, bg) in &self.head_shards {
            self.ops
                .head
                .record(&mut self.rec, bg, s.rows, t, int8, true);
        }
        self.ops
            .argmax
            .record(&mut self.rec, &self.argmax_bg, self.cfg.vocab_size, t);
        Ok(())
    }

    /// Records the final norm, head and argmax of the step's last position and the copy of
    /// the result word into the returned readback buffer.
    pub(super) fn record_argmax_last(&mut self) -> wgpu::Buffer {
        self.record_argmax();
        let (res, rb) = (
            self.bufs.argmax_result.clone(),
            self.bufs.argmax_readback.clone(),
        );
        self.rec.encoder().copy_buffer_to_buffer(&res, 0, &rb, 0, 4);
        rb
    }

    /// Whether the head is stored as int8 (`--head int8`).
    pub(super) fn int8_head(&self) -> bool {
        self.final_norm_q_bg.is_some()
    }

    /// Records the final norm of every row of the step.
    /// With the int8 head, the norm quantizes the rows to int8 instead (xq, xs).
    pub(super) fn record_final_norm(&mut self) {
        let t = self.t();
        let (kind, bg) = match &self.final_norm_q_bg {
            Some(bg) => (NormKind::QUANT, bg),
            None => (NormKind::F32, &self.final_norm_bg),
        };
        self.ops.norm.record(&mut self.rec, kind, bg, t);
    }

    /// Runs the head over the final-normed rows `range` (recorded with the step so far), in
    /// batches of the logits buffer's rows, and appends to `out` what `need` asks of each row
    /// (all logits when None; `need[i]` is row `range.start + i`): with `out.ids` filled, the
    /// argmax of every row, found on the device (4 bytes a row come back instead of its
    /// logits); candidates found on the device (k up to [`ops::topk::MAX_K`]; past it from the
    /// logits on the host); logits.
    pub(super) fn read_head_rows(
        &mut self,
        range: std::ops::Range<usize>,
        need: Option<&[RowNeed]>,
        out: &mut HeadRows,
    ) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        if range.is_empty() {
            self.flush();
            return Ok(());
        }
        let total = range.len();
        let with_ids = need.is_some();
        if with_ids && (total * 4) as u64 > self.bufs.argmax_readback.size() {
            self.rec.discard();
            return Err(Error::Request(format!(
                "the argmax of {total} rows asked of a step of at most {}",
                self.bufs.argmax_readback.size() / 4
            )));
        }
        let kmax = ops::topk::MAX_K.min(vocab);
        let need_of = |i: usize| need.map_or(RowNeed::Logits, |n| n[i]);
        // Rows whose logits come back: Logits rows and candidates past the device's k.
        let wants = |i: usize| match need_of(i) {
            RowNeed::Logits => true,
            RowNeed::Candidates { k, .. } => k > kmax,
            RowNeed::Argmax => false,
        };
        let row_bytes = (vocab * 4) as u64;
        let mut r0 = range.start;
        let (mut host_logits, mut dev, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        while r0 < range.end {
            let n = self.logit_rows.min(range.end - r0);
            self.step.row0 = r0 as u32;
            self.step.nrows = n as u32;
            let (int8, decode) = (self.int8_head(), self.one_token_rows());
            for (s, bg) in &self.head_shards {
                self.ops
                    .head
                    .record(&mut self.rec, bg, s.rows, n, int8, decode);
            }
            let first = r0 - range.start;
            if with_ids {
                self.ops
                    .argmax
                    .record(&mut self.rec, &self.argmax_bg, vocab, n);
                let (res, rb) = (
                    self.bufs.argmax_result.clone(),
                    self.bufs.argmax_readback.clone(),
                );
                self.rec.encoder().copy_buffer_to_buffer(
                    &res,
                    0,
                    &rb,
                    first as u64 * 4,
                    n as u64 * 4,
                );
            }
            // Candidates on the device: every selected row's max(k) best (the order is the
            // same whatever k, so each row keeps its own first k).
            let (mut sel, mut kdev) = (Vec::new(), 0);
            for i in 0..n {
                if let RowNeed::Candidates { k, inv_t } = need_of(first + i) {
                    if k <= kmax {
                        sel.push((i as u32, inv_t));
                        kdev = kdev.max(k);
                    }
                }
            }
            let cand_bytes = (sel.len() * kdev * 8) as u64;
            if !sel.is_empty() {
                let res = self.record_top_k(&sel, kdev)?;
                let rb = self.bufs.topk_readback.clone();
                self.rec
                    .encoder()
                    .copy_buffer_to_buffer(&res, 0, &rb, 0, cand_bytes);
            }
            // The wanted rows, packed to the front of the readback in runs.
            let (logits, readback) = (self.bufs.logits.clone(), self.bufs.readback.clone());
            let mut kept = 0u64;
            let mut i = 0;
            while i < n {
                if !wants(first + i) {
                    i += 1;
                    continue;
                }
                let run = (i..n).take_while(|&j| wants(first + j)).count() as u64;
                self.rec.encoder().copy_buffer_to_buffer(
                    &logits,
                    i as u64 * row_bytes,
                    &readback,
                    kept * row_bytes,
                    run * row_bytes,
                );
                kept += run;
                i += run as usize;
            }
            self.flush();
            // When every row read back is a Logits row, they go straight to `out` (one copy
            // of the rows fewer: megabytes a step at a large vocabulary).
            let direct = (0..n).all(|i| !wants(first + i) || need_of(first + i) == RowNeed::Logits);
            host_logits.clear();
            if kept > 0 {
                let sink = if direct {
                    &mut out.logits
                } else {
                    &mut host_logits
                };
                self.read_mapped(&readback, kept * row_bytes, |data| {
                    // Copied by the host's idle cores: a 128k vocabulary's 32 rows are 16 MB.
                    use rayon::prelude::*;
                    let rows = bytemuck::cast_slice::<u8, f32>(data);
                    sink.par_extend(rows.par_iter().copied());
                })?;
            }
            dev.clear();
            if !sel.is_empty() {
                let rb = self.bufs.topk_readback.clone();
                self.read_mapped(&rb, cand_bytes, |data| dev.extend(candidate_pairs(data)))?;
            }
            // Every row's part, in row order.
            let (mut next_dev, mut next_host) = (0, 0);
            for i in 0..n {
                let wanted = wants(first + i) && !direct;
                let logits_row = if wanted {
                    next_host += 1;
                    Some(&host_logits[(next_host - 1) * vocab..next_host * vocab])
                } else {
                    None
                };
                match (need_of(first + i), logits_row) {
                    (RowNeed::Logits, Some(l)) => out.logits.extend_from_slice(l),
                    (RowNeed::Candidates { k, inv_t }, Some(l)) => {
                        crate::reference::top_candidates(l, k, inv_t, &mut scratch);
                        out.cands.extend_from_slice(&scratch);
                    }
                    (RowNeed::Candidates { k, .. }, None) => {
                        let row = &dev[next_dev * kdev..(next_dev + 1) * kdev];
                        out.cands.extend_from_slice(&row[..k]);
                        next_dev += 1;
                    }
                    _ => {}
                }
            }
            r0 += n;
        }
        if with_ids {
            let rb = self.bufs.argmax_readback.clone();
            self.read_mapped(&rb, total as u64 * 4, |data| {
                out.ids.extend_from_slice(bytemuck::cast_slice(data));
            })?;
        }
        Ok(())
    }

    /// [`Self::read_head_rows`] of every row's logits into `out` (replacing its contents).
    pub(super) fn read_head_logits(
        &mut self,
        range: std::ops::Range<usize>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let mut got = HeadRows {
            logits: std::mem::take(out),
            ..Default::default()
        };
        got.logits.clear();
        let r = self.read_head_rows(range, None, &mut got);
        *out = got.logits;
        r
    }

    /// Records the final norm and the head of the step's last position (logits row 0).
    pub(super) fn record_head_last(&mut self) {
        let t = self.t();
        self.record_final_norm();
        self.step.row0 = (t - 1) as u32;
        self.step.nrows = 1;
        let int8 = self.int8_head();
        for (s, bg) in &self.head_shards {
            self.ops
                .head
                .record(&mut self.rec, bg, s.rows, 1, int8, true);
        }
    }

    /// After a step's `layer`: submits what is recorded so far every few layers, so the GPU
    /// starts on the first layers while the host encodes the rest (wgpu's per-dispatch encoding
    /// at submit costs a large part of a decode step's GPU time), unless the GPU is still busy
    /// with queued steps: then the step goes in one submit (H200: decode 446 vs 427 tok/s).
    pub(super) fn end_layer(&mut self, layer: usize) {
        if !self.whole_step && layer % SUBMIT_LAYERS == 1 && layer + 1 < self.cfg.num_layers {
            self.flush();
        }
    }

    /// Starts recording a step of `t` tokens with its embedding gather: the last `host.len()`
    /// inputs are written at submit, the ones before them are in the tokens buffer already
    /// (copied there on the device).
    pub(super) fn begin_step(&mut self, host: &[u32], t: usize) {
        // Drop any unsubmitted work of an abandoned step.
        self.rec.discard();
        if let Some(timing) = &mut self.timing {
            timing.started = Some(crate::time::Instant::now());
        }
        self.tokens.clear();
        self.tokens.extend_from_slice(host);
        self.tokens_at = t - host.len();
        self.decode_rows = false;
        self.moves = 0;
        self.whole_step = !self.queued.is_empty();
        self.step = params::Step {
            t: t as u32,
            chunk: 64,
            nsplit: 1,
            ..Default::default()
        };
        let h = self.cfg.hidden_size;
        for (_, bg) in &self.embed_shards {
            self.ops.embed.record(&mut self.rec, bg, h, t);
        }
    }

    pub(super) fn wait_map(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        self.read_mapped(buf, bytes, |data| data.to_vec())
    }

    /// Waits for the submitted work, maps the first `bytes` of `buf` and hands them to `f`.
    pub(super) fn read_mapped<T>(
        &self,
        buf: &wgpu::Buffer,
        bytes: u64,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        self.read_mapped_after(buf, bytes, None, f)
    }

    /// [`Self::read_mapped`] waiting only for submission `index` (all work when None), so
    /// work queued after it keeps the GPU busy meanwhile.
    pub(super) fn read_mapped_after<T>(
        &self,
        buf: &wgpu::Buffer,
        bytes: u64,
        index: Option<wgpu::SubmissionIndex>,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        buf.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        self.ctx
            .device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map_err(|e| Error::Backend(format!("poll: {e}")))?;
        rx.recv()
            .map_err(|e| Error::Backend(format!("map: {e}")))?
            .map_err(|e| Error::Backend(format!("map: {e}")))?;
        let data = buf
            .get_mapped_range(0..bytes)
            .map_err(|e| Error::Backend(format!("map: {e}")))?;
        let r = f(&data);
        drop(data);
        buf.unmap();
        Ok(r)
    }

    pub(super) fn activation(&self, a: Activation) -> &wgpu::Buffer {
        let b = &self.bufs;
        match a {
            Activation::Residual => &b.x,
            Activation::Quantized => &b.xq,
            Activation::Scales => &b.xs,
            Activation::Qkv => &b.qkv,
            Activation::Attention => &b.attn,
            Activation::GateUp => &b.gu,
            Activation::FinalNormed => &b.hn,
            Activation::Logits => &b.logits,
        }
    }

    /// Records the top-k passes over the logits rows `sel` selects ((logits row, 1 /
    /// temperature) each; k <= [`ops::topk::MAX_K`], at most the vocab). Returns the buffer
    /// that then holds each selected row's k best (key, id) pairs, best first.
    fn record_top_k(&mut self, sel: &[(u32, f32)], k: usize) -> Result<wgpu::Buffer> {
        let vocab = self.cfg.vocab_size;
        if k == 0 || k > ops::topk::MAX_K.min(vocab) {
            self.rec.discard();
            return Err(Error::Request(format!(
                "GPU top-k takes k in 1..={}, got {k}",
                ops::topk::MAX_K.min(vocab)
            )));
        }
        if sel.is_empty() || sel.len() > self.logit_rows {
            self.rec.discard();
            return Err(Error::Request(format!(
                "GPU top-k of {} rows at once (1..={})",
                sel.len(),
                self.logit_rows
            )));
        }
        let words: Vec<[u32; 2]> = sel.iter().map(|&(r, t)| [r, t.to_bits()]).collect();
        self.ctx
            .queue
            .write_buffer(&self.bufs.topk_sel, 0, bytemuck::cast_slice(&words));
        let mut n = vocab;
        let mut pass = 0;
        loop {
            let (params, bg) = &self.topk_passes[pass];
            let p = TopkP {
                n: n as u32,
                k: k as u32,
                ld: vocab as u32,
                pad: 0,
            };
            self.ctx
                .queue
                .write_buffer(params, 0, bytemuck::bytes_of(&p));
            self.ops
                .topk
                .record(&mut self.rec, bg, pass == 0, n, sel.len());
            let groups = n.div_ceil(ops::topk::CHUNK);
            if groups == 1 {
                break;
            }
            n = groups * k;
            pass += 1;
        }
        Ok(self.bufs.topk[pass % 2].clone())
    }

    /// Records the top-k passes over logits row 0 (see [`Self::record_top_k`]), submits, and
    /// reads the k best (logit × `inv_t`, id) back, best first, in the order of
    /// [`crate::reference::top_candidates`].
    pub fn top_k_of_logits(
        &mut self,
        k: usize,
        inv_t: f32,
        out: &mut Vec<(f32, u32)>,
    ) -> Result<()> {
        let res = self.record_top_k(&[(0, inv_t)], k)?;
        let rb = self.bufs.topk_readback.clone();
        let bytes = (k * 8) as u64;
        self.rec
            .encoder()
            .copy_buffer_to_buffer(&res, 0, &rb, 0, bytes);
        self.flush();
        out.clear();
        self.read_mapped(&rb, bytes, |data| out.extend(candidate_pairs(data)))
    }

    /// Submits pending work and reads a whole activation buffer (as u32 words; tests and
    /// debugging only: this allocates a staging buffer).
    pub fn read_activation(&mut self, a: Activation) -> Result<Vec<u32>> {
        self.flush();
        let src = self.activation(a).clone();
        let staging = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("debug read"),
            size: src.size(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        enc.copy_buffer_to_buffer(&src, 0, &staging, 0, src.size());
        self.ctx.queue.submit([enc.finish()]);
        let bytes = self.wait_map(&staging, src.size())?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    /// Submits pending work, then overwrites the start of an activation buffer with `words`
    /// (tests and debugging).
    pub fn write_activation(&mut self, a: Activation, words: &[u32]) {
        self.flush();
        let buf = self.activation(a).clone();
        self.ctx
            .queue
            .write_buffer(&buf, 0, bytemuck::cast_slice(words));
    }

    pub(super) fn norm(
        &mut self,
        kind: NormKind,
        which: impl Fn(&GpuLayer) -> &wgpu::BindGroup,
        layer: usize,
    ) {
        let t = self.t();
        self.ops
            .norm
            .record(&mut self.rec, kind, which(&self.layers[layer]), t);
    }
}

/// (key, id) pairs of topk.wgsl as (scaled logit, id): the key's `total_cmp` order undone.
fn candidate_pairs(data: &[u8]) -> impl Iterator<Item = (f32, u32)> + '_ {
    data.chunks_exact(8).map(|e| {
        let key = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let bits = if key & 0x8000_0000 != 0 {
            key & 0x7fff_ffff
        } else {
            !key
        };
        (f32::from_bits(bits), id)
    })
}
