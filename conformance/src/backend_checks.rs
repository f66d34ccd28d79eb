//! The checks `infl8 plugin check` runs on each backend of a library: a
//! reference model's numbers at batch 1 and N against the kit's own
//! evaluator, refusals (bad model file, wrong input shape, invalid
//! arguments), the error-buffer contract and concurrent runs.

use std::path::{Path, PathBuf};

use infl8_core::plugin::abi::*;

use crate::raw::{self, RawModel};
use infl8_core::config;

use crate::{
    BACKEND_CHECKS, Options, Outcome, REFERENCE_ROI, Runner, Verdict, expect_codes, reference,
};

/// What every backend's checks share: the reference model, its inputs and
/// the reference outputs.
pub(crate) struct Context {
    pub(crate) settings: config::Settings,
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) model: PathBuf,
    pub(crate) missing: PathBuf,
    pub(crate) corrupt: PathBuf,
    pub(crate) batch: usize,
    pub(crate) tolerance: f32,
    pub(crate) threads: usize,
    /// `batch` items of input, C order.
    pub(crate) input: Vec<f32>,
    /// The kit's own output for `input` ([`reference::evaluate`]), or why
    /// there is none.
    pub(crate) reference: Result<Vec<f32>, String>,
}

impl Context {
    pub(crate) fn new(
        opts: &Options,
        settings: config::Settings,
        dir: tempfile::TempDir,
    ) -> Result<Context, String> {
        let [x, y, z] = REFERENCE_ROI;
        let model = dir.path().join("reference.onnx");
        let proto = infl8_onnx::examples::head_mask_model([x as i64, y as i64, z as i64], 0.5, 8.0);
        infl8_onnx::write_model(&proto, &model)
            .map_err(|e| format!("cannot write the reference model: {e}"))?;
        let corrupt = dir.path().join("corrupt.onnx");
        let mut bytes = infl8_onnx::encode(&proto);
        bytes.truncate(bytes.len() / 3);
        bytes.extend(std::iter::repeat_n(0xFFu8, 64));
        std::fs::write(&corrupt, &bytes)
            .map_err(|e| format!("cannot write {}: {e}", corrupt.display()))?;
        let batch = opts.batch.max(2);
        let input = infl8_onnx::examples::pseudo_random(batch * x * y * z, 7, 0.0, 1.0);
        let reference = reference::evaluate(
            &proto,
            reference::Dense {
                shape: vec![batch, 1, x, y, z],
                data: input.clone(),
            },
        )
        .map(|d| d.data)
        .map_err(|e| e.to_string());
        Ok(Context {
            missing: dir.path().join("no-such-model.onnx"),
            settings,
            _dir: dir,
            model,
            corrupt,
            batch,
            tolerance: opts.tolerance,
            threads: opts.threads.max(2),
            input,
            reference,
        })
    }

    fn item_len(&self) -> usize {
        REFERENCE_ROI.iter().product::<usize>()
    }

    fn shape(&self, batch: usize) -> Vec<usize> {
        let [x, y, z] = REFERENCE_ROI;
        vec![batch, 1, x, y, z]
    }

    fn out_shape(&self, batch: usize) -> Vec<usize> {
        let [x, y, z] = REFERENCE_ROI;
        vec![batch, 2, x, y, z]
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

pub(crate) struct BackendUnderTest<'a> {
    pub(crate) table: &'static Infl8PluginTable,
    pub(crate) index: u32,
    pub(crate) name: &'a str,
    pub(crate) options: String,
    pub(crate) ctx: &'a Context,
}

// SAFETY: the table is static, read-only plugin memory whose functions the
// ABI makes callable from any thread; the rest is plain shared data.
unsafe impl Sync for BackendUnderTest<'_> {}

impl BackendUnderTest<'_> {
    pub(crate) fn run(&self, r: &mut Runner<'_>, require_all: bool) {
        let b = Some(self.name);
        let first = r.next;
        if r.start >= first + BACKEND_CHECKS.len() {
            r.next += BACKEND_CHECKS.len();
            return;
        }
        // The probe loads the model: a crash in it is blamed on the first
        // check not reported yet, so a resumed process moves on.
        let blamed = r.start.max(first);
        r.started(blamed, BACKEND_CHECKS[blamed - first], b);
        if let Some(why) = self.unavailable() {
            let (outcome, verdict) = if require_all {
                (Outcome::Fail, "cannot run on this machine (--require-all)")
            } else {
                (Outcome::Skip, "SKIPPED: cannot run on this machine")
            };
            r.group(BACKEND_CHECKS, b, outcome, &format!("{verdict}: {why}"));
            return;
        }
        let checks: [(&str, &dyn Fn() -> Verdict); 11] = [
            (BACKEND_CHECKS[0], &|| self.load_reference()),
            (BACKEND_CHECKS[1], &|| self.model_io()),
            (BACKEND_CHECKS[2], &|| self.run_vs_reference(1)),
            (BACKEND_CHECKS[3], &|| self.run_vs_reference(self.ctx.batch)),
            (BACKEND_CHECKS[4], &|| self.batch_independent()),
            (BACKEND_CHECKS[5], &|| {
                self.refuses_file(&self.ctx.missing, "missing")
            }),
            (BACKEND_CHECKS[6], &|| {
                self.refuses_file(&self.ctx.corrupt, "corrupt")
            }),
            (BACKEND_CHECKS[7], &|| self.wrong_shapes()),
            (BACKEND_CHECKS[8], &|| self.invalid_arguments()),
            (BACKEND_CHECKS[9], &|| self.error_buffer()),
            (BACKEND_CHECKS[10], &|| self.concurrent()),
        ];
        for (name, f) in checks {
            r.check(name, b, f);
        }
    }

    /// Why the backend cannot run here, if its load says so
    /// (`INFL8_UNAVAILABLE`); any other answer is left to the checks.
    fn unavailable(&self) -> Option<String> {
        match RawModel::load(self.table, self.index, &self.ctx.model, &self.options) {
            Err(s) if s.code == INFL8_UNAVAILABLE => Some(s.message),
            _ => None,
        }
    }

    fn load(&self) -> Result<RawModel, String> {
        RawModel::load(self.table, self.index, &self.ctx.model, &self.options)
            .map_err(|s| format!("loading the reference model failed: {s}"))
    }

    fn load_reference(&self) -> Verdict {
        let started = std::time::Instant::now();
        let m = self.load()?;
        drop(m);
        Ok(format!(
            "{}x{}x{} head-mask Conv3d model loaded and freed in {:.0} ms",
            REFERENCE_ROI[0],
            REFERENCE_ROI[1],
            REFERENCE_ROI[2],
            started.elapsed().as_secs_f64() * 1e3
        ))
    }

    fn model_io(&self) -> Verdict {
        let m = self.load()?;
        let (io, guard) = m.io().map_err(|s| format!("model_io: {s}"))?;
        if !guard {
            return Err(format!(
                "model_io wrote past struct_size ({} bytes)",
                Infl8ModelIo::MIN_SIZE
            ));
        }
        let desc = |d: &Infl8TensorDesc, what: &str| -> Result<(String, Vec<i64>), String> {
            let name = raw::plugin_str(d.name).map_err(|e| format!("{what} name: {e}"))?;
            if d.rank as usize > INFL8_MAX_RANK {
                return Err(format!("{what} rank {} exceeds {INFL8_MAX_RANK}", d.rank));
            }
            Ok((name, d.dims[..d.rank as usize].to_vec()))
        };
        let (in_name, in_dims) = desc(&io.input, "input")?;
        let (out_name, out_dims) = desc(&io.output, "output")?;
        let [x, y, z] = REFERENCE_ROI.map(|v| v as i64);
        if in_dims.len() != 5 || in_dims[1..] != [1, x, y, z] {
            return Err(format!(
                "input `{in_name}` is {in_dims:?}; the model declares [N, 1, {x}, {y}, {z}]"
            ));
        }
        if in_dims[0] != INFL8_DIM_SYMBOLIC {
            return Err(format!(
                "input batch is {}; the model's batch is symbolic (INFL8_DIM_SYMBOLIC)",
                in_dims[0]
            ));
        }
        if out_dims.len() != 5 || out_dims[1..] != [2, x, y, z] {
            return Err(format!(
                "output `{out_name}` is {out_dims:?}; the model declares [N, 2, {x}, {y}, {z}]"
            ));
        }
        Ok(format!(
            "{in_name} {in_dims:?} -> {out_name} {out_dims:?} (-1 = symbolic); no byte written past struct_size"
        ))
    }

    fn reference(&self) -> Result<&[f32], String> {
        self.ctx.reference.as_deref().map_err(Clone::clone)
    }

    fn compare(&self, got: &raw::Output, batch: usize, want: &[f32]) -> Verdict {
        let shape = self.ctx.out_shape(batch);
        if got.shape != shape {
            return Err(format!("output shape {:?}, expected {shape:?}", got.shape));
        }
        let d = max_abs_diff(&got.data, want);
        if d > self.ctx.tolerance {
            return Err(format!(
                "max |diff| from the reference {d:.3e} > tolerance {:.1e}",
                self.ctx.tolerance
            ));
        }
        Ok(format!(
            "shape {shape:?}, max |diff| from the reference {d:.2e} (tolerance {:.0e})",
            self.ctx.tolerance
        ))
    }

    fn run_vs_reference(&self, batch: usize) -> Verdict {
        let reference = self.reference()?;
        let m = self.load()?;
        let n = batch * self.ctx.item_len();
        let out = m
            .run(&self.ctx.input[..n], &self.ctx.shape(batch))
            .map_err(|s| format!("model_run (batch {batch}): {s}"))?;
        self.compare(&out, batch, &reference[..2 * n])
    }

    fn batch_independent(&self) -> Verdict {
        let m = self.load()?;
        let len = self.ctx.item_len();
        let whole = m
            .run(&self.ctx.input, &self.ctx.shape(self.ctx.batch))
            .map_err(|s| format!("model_run (batch {}): {s}", self.ctx.batch))?;
        let mut worst = 0f32;
        for i in 0..self.ctx.batch {
            let one = m
                .run(&self.ctx.input[i * len..(i + 1) * len], &self.ctx.shape(1))
                .map_err(|s| format!("model_run (item {i}): {s}"))?;
            let part = whole
                .data
                .get(i * 2 * len..(i + 1) * 2 * len)
                .ok_or_else(|| format!("the batch output holds {} values", whole.data.len()))?;
            worst = worst.max(max_abs_diff(&one.data, part));
        }
        if worst > self.ctx.tolerance {
            return Err(format!(
                "an item run alone differs from the same item in a batch by {worst:.3e}"
            ));
        }
        Ok(format!(
            "each of {} items alone = its slice of the batch (max |diff| {worst:.2e})",
            self.ctx.batch
        ))
    }

    fn refuses_file(&self, path: &Path, what: &str) -> Verdict {
        match RawModel::load(self.table, self.index, path, &self.options) {
            Ok(_) => Err(format!("model_load of a {what} file returned OK")),
            Err(s) if s.code == INFL8_LOAD_FAILED && !s.message.trim().is_empty() => {
                Ok(format!("LOAD_FAILED: {}", s.message))
            }
            Err(s) if s.code == INFL8_LOAD_FAILED => {
                Err("LOAD_FAILED with an empty message: say what is wrong".into())
            }
            Err(s) => Err(format!("{s}; expected LOAD_FAILED")),
        }
    }

    fn wrong_shapes(&self) -> Verdict {
        let m = self.load()?;
        let [x, y, z] = REFERENCE_ROI;
        let cases: [(Vec<usize>, &[i32]); 3] = [
            (vec![1, 1, x / 2, y / 2, z / 2], &[INFL8_SHAPE_MISMATCH]),
            (vec![1, 2, x, y, z], &[INFL8_SHAPE_MISMATCH]),
            (
                vec![1, x, y, z],
                &[INFL8_SHAPE_MISMATCH, INFL8_INVALID_ARGUMENT],
            ),
        ];
        let mut seen = Vec::new();
        for (shape, want) in cases {
            let n: usize = shape.iter().product();
            let data = vec![0.5f32; n];
            match m.run(&data, &shape) {
                Ok(out) => {
                    return Err(format!(
                        "input {shape:?} was accepted (output {:?})",
                        out.shape
                    ));
                }
                Err(s) => {
                    expect_codes(s.code, want, &format!("run {shape:?}"))?;
                    if s.message.trim().is_empty() {
                        return Err(format!("run {shape:?}: refused with an empty message"));
                    }
                    seen.push(format!("{shape:?}: {}", s.message));
                }
            }
        }
        Ok(seen.join("; "))
    }

    fn invalid_arguments(&self) -> Verdict {
        use std::ptr::{null, null_mut};
        let t = self.table;
        let (Some(load), Some(io), Some(run), Some(free), Some(tfree)) = (
            t.model_load,
            t.model_io,
            t.model_run,
            t.model_free,
            t.tensor_free,
        ) else {
            return Err("null function pointers".into());
        };
        let m = self.load()?;
        let path = std::ffi::CString::new(self.ctx.model.to_string_lossy().as_bytes())
            .map_err(|e| e.to_string())?;
        let mut err = [0u8; raw::ERR_CAP];
        let e = err.as_mut_ptr().cast::<std::ffi::c_char>();
        let mut handle: *mut Infl8Model = null_mut();
        let shape: Vec<u64> = self.ctx.shape(1).iter().map(|&d| d as u64).collect();
        let input = &self.ctx.input[..self.ctx.item_len()];
        let mut out = raw::empty_out();
        let mut small_out = raw::empty_out();
        small_out.struct_size = 8;
        let mut io_buf = [0u64; 32];
        let io_ptr = io_buf.as_mut_ptr().cast::<Infl8ModelIo>();
        let inv = &[INFL8_INVALID_ARGUMENT][..];
        let rank9 = [1u64; 9];
        // SAFETY: each call passes the ABI's types; the deliberately bad
        // argument is one the ABI says a plugin must refuse.
        let calls: Vec<(&str, i32, &[i32])> = unsafe {
            vec![
                (
                    "model_load(path = NULL)",
                    load(self.index, null(), null(), &mut handle, e, raw::ERR_CAP),
                    inv,
                ),
                (
                    "model_load(out_model = NULL)",
                    load(
                        self.index,
                        path.as_ptr(),
                        null(),
                        null_mut(),
                        e,
                        raw::ERR_CAP,
                    ),
                    inv,
                ),
                (
                    "model_load(backend_index = backend_count)",
                    load(
                        t.backend_count,
                        path.as_ptr(),
                        null(),
                        &mut handle,
                        e,
                        raw::ERR_CAP,
                    ),
                    inv,
                ),
                (
                    "model_io(model = NULL)",
                    {
                        (*io_ptr).struct_size = Infl8ModelIo::MIN_SIZE;
                        io(null(), io_ptr, e, raw::ERR_CAP)
                    },
                    inv,
                ),
                (
                    "model_io(out_io = NULL)",
                    io(m.handle(), null_mut(), e, raw::ERR_CAP),
                    inv,
                ),
                (
                    "model_io(struct_size = 4)",
                    {
                        (*io_ptr).struct_size = 4;
                        io(m.handle(), io_ptr, e, raw::ERR_CAP)
                    },
                    inv,
                ),
                (
                    "model_run(model = NULL)",
                    run(
                        null(),
                        input.as_ptr(),
                        shape.as_ptr(),
                        5,
                        &mut out,
                        e,
                        raw::ERR_CAP,
                    ),
                    inv,
                ),
                (
                    "model_run(input = NULL)",
                    run(
                        m.handle(),
                        null(),
                        shape.as_ptr(),
                        5,
                        &mut out,
                        e,
                        raw::ERR_CAP,
                    ),
                    inv,
                ),
                (
                    "model_run(shape = NULL, rank 5)",
                    run(
                        m.handle(),
                        input.as_ptr(),
                        null(),
                        5,
                        &mut out,
                        e,
                        raw::ERR_CAP,
                    ),
                    inv,
                ),
                (
                    "model_run(rank = 9)",
                    run(
                        m.handle(),
                        input.as_ptr(),
                        rank9.as_ptr(),
                        9,
                        &mut out,
                        e,
                        raw::ERR_CAP,
                    ),
                    &[
                        INFL8_INVALID_ARGUMENT,
                        INFL8_SHAPE_MISMATCH,
                        INFL8_UNSUPPORTED,
                    ],
                ),
                (
                    "model_run(out = NULL)",
                    run(
                        m.handle(),
                        input.as_ptr(),
                        shape.as_ptr(),
                        5,
                        null_mut(),
                        e,
                        raw::ERR_CAP,
                    ),
                    inv,
                ),
                (
                    "model_run(out->struct_size = 8)",
                    run(
                        m.handle(),
                        input.as_ptr(),
                        shape.as_ptr(),
                        5,
                        &mut small_out,
                        e,
                        raw::ERR_CAP,
                    ),
                    inv,
                ),
                ("model_free(NULL)", free(null_mut()), &[INFL8_OK]),
                ("tensor_free(NULL)", tfree(null_mut()), &[INFL8_OK]),
            ]
        };
        if !handle.is_null() {
            // SAFETY: a handle a refused call should not have produced;
            // release it rather than leak.
            unsafe { free(handle) };
            return Err("a refused model_load still stored a handle".into());
        }
        let mut failures = Vec::new();
        for (call, code, want) in &calls {
            if let Err(e) = expect_codes(*code, want, call) {
                failures.push(e);
            }
        }
        if failures.is_empty() {
            Ok(format!("{} bad calls refused without a crash", calls.len()))
        } else {
            Err(failures.join("; "))
        }
    }

    fn error_buffer(&self) -> Verdict {
        let run = self.table.model_run.ok_or("no model_run")?;
        let m = self.load()?;
        let bad: Vec<u64> = vec![1, 2, 3];
        let data = [0f32; 6];
        const CAP: usize = 12;
        let mut buf = [0xAAu8; 64];
        let mut out = raw::empty_out();
        // SAFETY: a 3-value shape over 6 values; the buffer holds 64 bytes
        // of which CAP are offered.
        let code = unsafe {
            run(
                m.handle(),
                data.as_ptr(),
                bad.as_ptr(),
                3,
                &mut out,
                buf.as_mut_ptr().cast(),
                CAP,
            )
        };
        if code == INFL8_OK {
            return Err("a [1, 2, 3] input was accepted".into());
        }
        if buf[CAP..].iter().any(|&b| b != 0xAA) {
            return Err(format!("the message was written past err_cap = {CAP}"));
        }
        let Some(nul) = buf[..CAP].iter().position(|&b| b == 0) else {
            return Err(format!("no NUL terminator within err_cap = {CAP}"));
        };
        let text = std::str::from_utf8(&buf[..nul])
            .map_err(|_| "the truncated message is not valid UTF-8".to_string())?;
        let mut zero = [0xAAu8; 8];
        // SAFETY: a null buffer with cap 0, then a real one with cap 0:
        // the plugin must write nothing.
        let (code_null, code_zero) = unsafe {
            (
                run(
                    m.handle(),
                    data.as_ptr(),
                    bad.as_ptr(),
                    3,
                    &mut out,
                    std::ptr::null_mut(),
                    0,
                ),
                run(
                    m.handle(),
                    data.as_ptr(),
                    bad.as_ptr(),
                    3,
                    &mut out,
                    zero.as_mut_ptr().cast(),
                    0,
                ),
            )
        };
        if code_null != code || code_zero != code {
            return Err(format!(
                "the status changed with the error buffer: {} with one, {} with none",
                status_name(code),
                status_name(code_null)
            ));
        }
        if zero.iter().any(|&b| b != 0xAA) {
            return Err("a message was written into a buffer with err_cap = 0".into());
        }
        Ok(format!(
            "{} truncated to `{text}` within {CAP} bytes; null/0-capacity buffers untouched",
            status_name(code)
        ))
    }

    fn concurrent(&self) -> Verdict {
        let reference = self.reference()?;
        let m = self.load()?;
        let len = self.ctx.item_len();
        let ctx = self.ctx;
        let m = &m;
        let results: Vec<Result<f32, String>> = std::thread::scope(|s| {
            let mut handles = Vec::new();
            for t in 0..ctx.threads {
                handles.push(s.spawn(move || {
                    let mut worst = 0f32;
                    for k in 0..3 {
                        let i = (t + k) % ctx.batch;
                        let out = m
                            .run(&ctx.input[i * len..(i + 1) * len], &ctx.shape(1))
                            .map_err(|s| format!("thread {t} run {k}: {s}"))?;
                        let want = &reference[i * 2 * len..(i + 1) * 2 * len];
                        if out.data.len() != want.len() {
                            return Err(format!("thread {t} run {k}: {} values", out.data.len()));
                        }
                        worst = worst.max(max_abs_diff(&out.data, want));
                    }
                    Ok(worst)
                }));
            }
            // Loads and frees on other threads, while the runs go on.
            for _ in 0..2 {
                handles.push(s.spawn(|| {
                    let other = self.load()?;
                    let out = other
                        .run(&ctx.input[..len], &ctx.shape(1))
                        .map_err(|s| format!("a model loaded on another thread: {s}"))?;
                    Ok(max_abs_diff(&out.data, &reference[..2 * len]))
                }));
            }
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into())))
                .collect()
        });
        let mut worst = 0f32;
        for r in results {
            worst = worst.max(r?);
        }
        if worst > self.ctx.tolerance {
            return Err(format!(
                "concurrent runs differ from the reference by {worst:.3e} > {:.1e}",
                self.ctx.tolerance
            ));
        }
        Ok(format!(
            "{} threads x 3 runs on one handle + 2 loads on other threads; max |diff| {worst:.2e}",
            self.ctx.threads
        ))
    }
}
