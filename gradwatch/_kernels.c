/* One-pass statistics of a CPU tensor, for the sampled step's hooks (gradwatch/cpukernels.py).
 *
 * On CPU each PyTorch op costs its dispatch (a few microseconds) and a pass over memory;
 * the activation statistics of one output took about twenty ops. These kernels read the
 * tensor once and add their sums straight into the layer's row of gradwatch's preallocated
 * fp32 stage (buffers.WindowBuffers.stage): nothing is allocated, nothing goes back to
 * Python but a flag. They only ever see contiguous CPU tensors (float32 or bfloat16) the Python
 * side has checked; CUDA tensors never come here.
 *
 * Sums are accumulated in fp32 vectors over blocks of BLOCK elements, each block then added
 * in double: at least as close to a float64 reference as torch's own fp32 reductions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
/* static helpers returning vectors: no ABI crosses this file */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define W 16         /* floats per vector: one AVX-512 register, two AVX2 ones */
#define BLOCK 2048   /* elements summed in fp32 before the double accumulator */

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));

/* x86-64: an AVX-512 or AVX2 clone picked at load time where the CPU has it, else the baseline */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

enum { F32 = 0, BF16 = 1 };

static inline vf load(const void *p, Py_ssize_t i, int kind) {
    vf v;
    if (kind == F32) {
        memcpy(&v, (const float *)p + i, sizeof v);
    } else {
        vh h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        memcpy(&v, &u, sizeof v);
    }
    return v;
}

static inline float load1(const void *p, Py_ssize_t i, int kind) {
    if (kind == F32) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline vf vsel(vi m, vf a, vf b) { /* m ? a : b, lane by lane */
    vi ai, bi, r;
    memcpy(&ai, &a, sizeof a);
    memcpy(&bi, &b, sizeof b);
    r = (ai & m) | (bi & ~m);
    vf out;
    memcpy(&out, &r, sizeof out);
    return out;
}

static inline vi imax(vi a, vi b) { /* lane by lane (compilers emit one max op) */
    vi m = a > b;
    return (a & m) | (b & ~m);
}

static inline vf vabs(vf a) {
    vi ai;
    memcpy(&ai, &a, sizeof a);
    ai &= 0x7fffffff;
    memcpy(&a, &ai, sizeof a);
    return a;
}

static inline double hsum(vf v) {
    double s = 0.0;
    for (int j = 0; j < W; j++) s += v[j];
    return s;
}

static inline int64_t hcount(vi v) { /* lanes hold minus the count (true is -1) */
    int64_t s = 0;
    for (int j = 0; j < W; j++) s -= v[j];
    return s;
}

/* One call of a layer: the statistics of one contiguous tensor of n elements, read as
 * [n / units, units], added into the layer's stage row ``out`` (buffers.STAGE_COLS floats):
 * numel, sum x, sum x^2, nonzeros, non-finite (none), saturated (|x - c| > r, when
 * bounded), stuck units (every row <= slo, or every row >= shi, when bounded) and units
 * (when bounded) are added; max |x| is maxed in. Returns 0, the row untouched, when a NaN
 * or an Inf was seen: the caller then takes the ops' path, whose NaN semantics are the
 * reference. */
CLONES static int act_row(const void *x, Py_ssize_t n, Py_ssize_t units, int kind,
                          int bounded, float c, float r, float slo, float shi, float *out,
                          float *scratch) {
    const vf vc = (vf){0} + c, vr = (vf){0} + r, zero = (vf){0};
    vf s1 = zero, s2 = zero, hi = zero + -INFINITY, lo = zero + INFINITY;
    vi zc = (vi){0}, sat = (vi){0};
    double d1 = 0.0, d2 = 0.0;
    int64_t czero = 0, csat = 0;
    float fhi = -INFINITY, flo = INFINITY;
    Py_ssize_t rows = bounded ? n / units : 1, U = bounded ? units : n;
    float *umax = scratch, *umin = scratch ? scratch + units : NULL;
    Py_ssize_t inblock = 0;
    for (Py_ssize_t b = 0; b < rows; b++) {
        const Py_ssize_t base = b * U;
        Py_ssize_t u = 0;
        for (; u + W <= U; u += W) {
            vf v = load(x, base + u, kind);
            s1 += v;
            s2 += v * v;
            zc += (v == zero); /* ordered: a NaN is not a zero (!= would not vectorize) */
            if (bounded) { /* max and min come from the per-unit ones */
                sat += (vabs(v - vc) > vr);
                vf mx = v, mn = v;
                if (b > 0) {
                    vf pmx, pmn;
                    memcpy(&pmx, umax + u, sizeof pmx);
                    memcpy(&pmn, umin + u, sizeof pmn);
                    mx = vsel(v > pmx, v, pmx);
                    mn = vsel(v < pmn, v, pmn);
                }
                memcpy(umax + u, &mx, sizeof mx);
                memcpy(umin + u, &mn, sizeof mn);
            } else {
                hi = vsel(v > hi, v, hi);
                lo = vsel(v < lo, v, lo);
            }
            inblock += W;
            if (inblock >= BLOCK) {
                d1 += hsum(s1);
                d2 += hsum(s2);
                s1 = zero;
                s2 = zero;
                inblock = 0;
            }
        }
        for (; u < U; u++) { /* the tail of a row */
            float v = load1(x, base + u, kind);
            d1 += v;
            d2 += (double)v * v;
            if (v > fhi) fhi = v;
            if (v < flo) flo = v;
            czero += (v == 0.0f);
            if (bounded) {
                csat += (fabsf(v - c) > r);
                if (b == 0 || v > umax[u]) umax[u] = v;
                if (b == 0 || v < umin[u]) umin[u] = v;
            }
        }
    }
    d1 += hsum(s1);
    d2 += hsum(s2);
    /* a NaN or an Inf makes the sum of squares NaN or Inf (so does |x| > 1.8e19, whose
     * square overflows fp32: the ops' path takes those too) */
    if (!isfinite(d2)) return 0;
    for (int j = 0; j < W; j++) {
        if (hi[j] > fhi) fhi = hi[j];
        if (lo[j] < flo) flo = lo[j];
    }
    czero += hcount(zc);
    csat += hcount(sat);
    int64_t stuck = 0;
    if (bounded) {
        for (Py_ssize_t k = 0; k < units; k++) {
            stuck += (umax[k] <= slo) + (umin[k] >= shi);
            if (umax[k] > fhi) fhi = umax[k];
            if (umin[k] < flo) flo = umin[k];
        }
    }
    /* added into the layer's stage row, as the ops' rows are folded into it */
    out[0] += (float)n;
    out[1] += (float)d1;
    out[2] += (float)d2;
    out[3] += (float)(n - czero);
    /* out[4], the non-finite count, stays: none here */
    out[5] += (float)csat;
    out[6] += (float)stuck;
    out[7] += bounded ? (float)units : 0.0f;
    float amax = fhi > -flo ? fhi : -flo;
    if (amax > out[8]) out[8] = amax;
    return 1;
}

/* An output gradient of n elements, added into its layer's stage columns ``out``
 * (buffers.ST_GN..ST_GNF): element count, sum x^2, and 1 when that sum is NaN. */
CLONES static void sq_row(const void *x, Py_ssize_t n, int kind, float *out) {
    const vf zero = (vf){0};
    vf s = zero;
    double d = 0.0;
    Py_ssize_t i = 0, inblock = 0;
    for (; i + W <= n; i += W) {
        vf v = load(x, i, kind);
        s += v * v;
        inblock += W;
        if (inblock >= BLOCK) {
            d += hsum(s);
            s = zero;
            inblock = 0;
        }
    }
    d += hsum(s);
    for (; i < n; i++) {
        float v = load1(x, i, kind);
        d += (double)v * v;
    }
    out[0] += (float)n;
    out[1] += (float)d;
    out[2] += isnan(d) ? 1.0f : 0.0f;
}

/* The fp32 sum of a contiguous tensor of n elements: the non-finite trace's check of one
 * tensor (trace.py), where torch.sum(x, dtype=float32) was one op each. Four fp32 vector
 * accumulators over blocks of BLOCK elements, each block added in double, the total rounded
 * to fp32: a NaN, or infinities of both signs, make it NaN; infinities of one sign make it
 * infinite; finite values whose sum passes the fp32 range make it infinite, as torch's fp32
 * sum does. */
CLONES static float sum_all(const void *x, Py_ssize_t n, int kind) {
    const vf zero = (vf){0};
    double d = 0.0;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) { /* BLOCK: a multiple of 4 W */
        const Py_ssize_t end = n - start > BLOCK ? start + BLOCK : n;
        vf s0 = zero, s1 = zero, s2 = zero, s3 = zero;
        Py_ssize_t i = start;
        for (; i + 4 * W <= end; i += 4 * W) {
            s0 += load(x, i, kind);
            s1 += load(x, i + W, kind);
            s2 += load(x, i + 2 * W, kind);
            s3 += load(x, i + 3 * W, kind);
        }
        d += hsum(s0 + s1) + hsum(s2 + s3);
        for (; i < end; i++) d += load1(x, i, kind);
    }
    return (float)d;
}

/* The L2 norm of a contiguous tensor of n elements, and with want_max its max |x| (NaN
 * when it holds a NaN, as torch's amax gives): one pass. Σx² accumulated in double per
 * block, so a norm of finite values overflows only past the fp32 range itself. */
CLONES static void norm_max(const void *x, Py_ssize_t n, int kind, int want_max,
                            float *norm, float *mx) {
    /* four independent accumulators: one chain of fused multiply-adds waits on its own
     * latency, four keep the unit busy. max |x| is taken on the bit patterns: for |x| (the
     * sign bit cleared) integer order is float order, and a NaN's pattern is above Inf's,
     * so an integer max both finds the largest |x| and lets a NaN win, as torch's does. */
    const vf zero = (vf){0};
    vf s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    vi m0 = (vi){0}, m1 = (vi){0};
    double d = 0.0;
    int32_t fm = 0;
    Py_ssize_t i = 0, inblock = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
        vf a = load(x, i, kind), b = load(x, i + W, kind);
        vf c = load(x, i + 2 * W, kind), e = load(x, i + 3 * W, kind);
        s0 += a * a;
        s1 += b * b;
        s2 += c * c;
        s3 += e * e;
        if (want_max) {
            vi ia, ib, ic, ie;
            memcpy(&ia, &a, sizeof ia);
            memcpy(&ib, &b, sizeof ib);
            memcpy(&ic, &c, sizeof ic);
            memcpy(&ie, &e, sizeof ie);
            ia &= 0x7fffffff;
            ib &= 0x7fffffff;
            ic &= 0x7fffffff;
            ie &= 0x7fffffff;
            vi p = imax(ia, ib), q = imax(ic, ie);
            m0 = imax(p, m0);
            m1 = imax(q, m1);
        }
        inblock += 4 * W;
        if (inblock >= BLOCK) {
            d += hsum(s0 + s1) + hsum(s2 + s3);
            s0 = s1 = s2 = s3 = zero;
            inblock = 0;
        }
    }
    d += hsum(s0 + s1) + hsum(s2 + s3);
    for (; i < n; i++) {
        float v = load1(x, i, kind);
        d += (double)v * v;
        int32_t iv;
        memcpy(&iv, &v, sizeof iv);
        iv &= 0x7fffffff;
        if (iv > fm) fm = iv;
    }
    *norm = (float)sqrt(d);
    if (want_max) {
        for (int j = 0; j < W; j++) {
            if (m0[j] > fm) fm = m0[j];
            if (m1[j] > fm) fm = m1[j];
        }
        float f;
        memcpy(&f, &fm, sizeof f);
        *mx = isnan(f) ? NAN : f;
    }
}

/* the argument count of a METH_FASTCALL function: 1 when it is want, else 0 with the error
 * set */
static int nargs_ok(Py_ssize_t nargs, Py_ssize_t want, const char *name) {
    if (nargs == want) return 1;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
    return 0;
}

/* the per-unit max/min of a bounded activation: kept per thread, grown as needed */
static _Thread_local float *scratch_buf = NULL;
static _Thread_local Py_ssize_t scratch_cap = 0;

static float *scratch_for(Py_ssize_t units) {
    if (units * 2 > scratch_cap) {
        float *p = PyMem_RawRealloc(scratch_buf, sizeof(float) * 2 * (size_t)units);
        if (p == NULL) return NULL;
        scratch_buf = p;
        scratch_cap = units * 2;
    }
    return scratch_buf;
}

/* act_row(x_ptr, n, units, kind, bounded, c, r, slo, shi, out_ptr) -> bool */
static PyObject *py_act_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 10, "act_row")) return NULL;
    void *x = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    Py_ssize_t units = PyLong_AsSsize_t(args[2]);
    long kind = PyLong_AsLong(args[3]);
    int bounded = PyObject_IsTrue(args[4]);
    double c = PyFloat_AsDouble(args[5]), r = PyFloat_AsDouble(args[6]);
    double slo = PyFloat_AsDouble(args[7]), shi = PyFloat_AsDouble(args[8]);
    float *out = PyLong_AsVoidPtr(args[9]);
    if (PyErr_Occurred()) return NULL;
    if (x == NULL || out == NULL || n <= 0 || (kind != F32 && kind != BF16) ||
        (bounded && (units <= 0 || n % units != 0))) {
        PyErr_SetString(PyExc_ValueError, "act_row: bad arguments");
        return NULL;
    }
    float *scratch = NULL;
    if (bounded && (scratch = scratch_for(units)) == NULL) return PyErr_NoMemory();
    /* the GIL is kept: the work is short, and a thread that gave it up can wait a switch
     * interval (5 ms) to have it back */
    return PyBool_FromLong(act_row(x, n, units, (int)kind, bounded, (float)c, (float)r,
                                   (float)slo, (float)shi, out, scratch));
}

/* The arguments (x_ptr, n, kind, out_ptr) of sq_row and sum_row, read and checked: 1, or 0
 * with the error set. n may be 0 only where empty is allowed (then x_ptr may be 0). */
static int row_args(PyObject *const *args, Py_ssize_t nargs, const char *name, int empty,
                    void **x, Py_ssize_t *n, int *kind, float **out) {
    if (!nargs_ok(nargs, 4, name)) return 0;
    *x = PyLong_AsVoidPtr(args[0]);
    *n = PyLong_AsSsize_t(args[1]);
    long k = PyLong_AsLong(args[2]);
    *out = PyLong_AsVoidPtr(args[3]);
    if (PyErr_Occurred()) return 0;
    if (*out == NULL || *n < (empty ? 0 : 1) || (*n > 0 && *x == NULL) ||
        (k != F32 && k != BF16)) {
        PyErr_Format(PyExc_ValueError, "%s: bad arguments", name);
        return 0;
    }
    *kind = (int)k;
    return 1;
}

/* sq_row(x_ptr, n, kind, out_ptr) -> None */
static PyObject *py_sq_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *x;
    Py_ssize_t n;
    int kind;
    float *out;
    if (!row_args(args, nargs, "sq_row", 0, &x, &n, &kind, &out)) return NULL;
    sq_row(x, n, kind, out);
    Py_RETURN_NONE;
}

/* sum_row(x_ptr, n, kind, out_ptr) -> None: the fp32 value at out_ptr set to the sum of
 * the n elements at x_ptr (0 for none) */
static PyObject *py_sum_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *x;
    Py_ssize_t n;
    int kind;
    float *out;
    if (!row_args(args, nargs, "sum_row", 1, &x, &n, &kind, &out)) return NULL;
    *out = n > 0 ? sum_all(x, n, kind) : 0.0f;
    Py_RETURN_NONE;
}

/* sum_f32(ptr, n) -> float: the sum of the n fp32 values at ptr, in double (0.0 for none);
 * a NaN or an Inf among them makes it NaN or infinite (the trace's host check,
 * trace.StepTrace.host_total). */
static PyObject *py_sum_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 2, "sum_f32")) return NULL;
    const float *x = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (n < 0 || (n > 0 && x == NULL)) {
        PyErr_SetString(PyExc_ValueError, "sum_f32: bad arguments");
        return NULL;
    }
    double s = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) s += x[i];
    return PyFloat_FromDouble(s);
}

/* zero_f32(ptr, n) -> None: the n fp32 values at ptr set to 0 (trace.StepTrace.clear). */
static PyObject *py_zero_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 2, "zero_f32")) return NULL;
    float *x = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (n < 0 || (n > 0 && x == NULL)) {
        PyErr_SetString(PyExc_ValueError, "zero_f32: bad arguments");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) x[i] = 0.0f;
    Py_RETURN_NONE;
}

/* layer_norms(ptrs, numels, layers, n_layers, kind, out_ptr, with_max, empty) -> float
 *
 * Tensor i (ptrs[i], numels[i] elements) belongs to layer layers[i] < n_layers. Writes the
 * fp32 array at out_ptr: [norms (k) | layer norm (L) | layer RMS (L)], and with with_max
 * also [layer max |x| (L) | layer non-finite (L)]: each tensor's L2 norm; per layer the
 * norm of its tensors together, that over sqrt(its element count) (both ``empty`` for a
 * layer without any: 0 for gradients, NaN for weight norms), the max |x| (0 without any,
 * NaN with a NaN) and the number of its tensors whose max |x| is not finite. Returns the
 * sum of the tensors' norms (the host's finiteness check and
 * bound, monitor.StepMonitor._finite). */
static PyObject *py_layer_norms(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 8, "layer_norms")) return NULL;
    Py_ssize_t L = PyLong_AsSsize_t(args[3]);
    long kind = PyLong_AsLong(args[4]);
    float *out = PyLong_AsVoidPtr(args[5]);
    int with_max = PyObject_IsTrue(args[6]);
    float empty = (float)PyFloat_AsDouble(args[7]);
    if (PyErr_Occurred()) return NULL;
    PyObject *ptrs = NULL, *numels = NULL, *layers = NULL;
    double *acc = NULL;
    PyObject *ret = NULL;
    if (!(ptrs = PySequence_Fast(args[0], "layer_norms: ptrs must be a sequence")) ||
        !(numels = PySequence_Fast(args[1], "layer_norms: numels must be a sequence")) ||
        !(layers = PySequence_Fast(args[2], "layer_norms: layers must be a sequence")))
        goto done;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(ptrs);
    if (k != PySequence_Fast_GET_SIZE(numels) || k != PySequence_Fast_GET_SIZE(layers) ||
        out == NULL || L <= 0 || (kind != F32 && kind != BF16)) {
        PyErr_SetString(PyExc_ValueError, "layer_norms: bad arguments");
        goto done;
    }
    acc = PyMem_RawCalloc((size_t)L * 2, sizeof(double)); /* sum x^2, element count */
    if (acc == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *norm = out, *lnorm = out + k, *lrms = out + k + L;
    float *lmax = with_max ? out + k + 2 * L : NULL, *lnf = with_max ? out + k + 3 * L : NULL;
    if (with_max) {
        for (Py_ssize_t l = 0; l < L; l++) lmax[l] = lnf[l] = 0.0f;
    }
    PyObject **p = PySequence_Fast_ITEMS(ptrs), **q = PySequence_Fast_ITEMS(numels);
    PyObject **r = PySequence_Fast_ITEMS(layers);
    for (Py_ssize_t i = 0; i < k; i++) {
        void *x = PyLong_AsVoidPtr(p[i]);
        Py_ssize_t n = PyLong_AsSsize_t(q[i]), l = PyLong_AsSsize_t(r[i]);
        if (PyErr_Occurred()) goto done;
        if (x == NULL || n <= 0 || l < 0 || l >= L) {
            PyErr_SetString(PyExc_ValueError, "layer_norms: bad tensor");
            goto done;
        }
        float m = 0.0f;
        norm_max(x, n, (int)kind, with_max, norm + i, &m);
        acc[2 * l] += (double)norm[i] * norm[i];
        acc[2 * l + 1] += (double)n;
        if (with_max) {
            if (isnan(m) || isnan(lmax[l])) lmax[l] = NAN;
            else if (m > lmax[l]) lmax[l] = m;
            lnf[l] += !isfinite(m);
        }
    }
    for (Py_ssize_t l = 0; l < L; l++) {
        if (acc[2 * l + 1] == 0.0) { /* a layer without any tensor */
            lnorm[l] = lrms[l] = empty;
            continue;
        }
        double nrm = sqrt(acc[2 * l]);
        lnorm[l] = (float)nrm;
        lrms[l] = (float)(nrm / sqrt(acc[2 * l + 1] > 1.0 ? acc[2 * l + 1] : 1.0));
    }
    double total = 0.0;
    for (Py_ssize_t i = 0; i < k; i++) total += norm[i];
    ret = PyFloat_FromDouble(total);
done:
    PyMem_RawFree(acc);
    Py_XDECREF(ptrs);
    Py_XDECREF(numels);
    Py_XDECREF(layers);
    return ret;
}

/* The views of the update ratio (params.py): view i starts at ptrs[i] and is rows[i] runs
 * of runs[i] contiguous elements, run r at element r * strides[i]. */
typedef struct {
    PyObject *ptrs, *rows, *runs, *strides;
    Py_ssize_t k;
} Views;

static int views_open(Views *v, PyObject *const *args) {
    v->ptrs = v->rows = v->runs = v->strides = NULL;
    if (!(v->ptrs = PySequence_Fast(args[0], "ptrs must be a sequence")) ||
        !(v->rows = PySequence_Fast(args[1], "rows must be a sequence")) ||
        !(v->runs = PySequence_Fast(args[2], "runs must be a sequence")) ||
        !(v->strides = PySequence_Fast(args[3], "strides must be a sequence")))
        return -1;
    v->k = PySequence_Fast_GET_SIZE(v->ptrs);
    if (PySequence_Fast_GET_SIZE(v->rows) != v->k || PySequence_Fast_GET_SIZE(v->runs) != v->k ||
        PySequence_Fast_GET_SIZE(v->strides) != v->k) {
        PyErr_SetString(PyExc_ValueError, "views: lengths differ");
        return -1;
    }
    return 0;
}

static void views_close(Views *v) {
    Py_XDECREF(v->ptrs);
    Py_XDECREF(v->rows);
    Py_XDECREF(v->runs);
    Py_XDECREF(v->strides);
}

/* one view: rows runs of run elements, run r at x + r * step bytes */
typedef struct {
    const char *x;
    Py_ssize_t rows, run, step;
} View;

static int view_at(Views *v, Py_ssize_t i, size_t es, View *w) {
    w->x = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(v->ptrs, i));
    w->rows = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(v->rows, i));
    w->run = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(v->runs, i));
    Py_ssize_t stride = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(v->strides, i));
    if (PyErr_Occurred()) return -1;
    if (w->x == NULL || w->rows <= 0 || w->run <= 0 || stride < w->run) {
        PyErr_SetString(PyExc_ValueError, "views: bad view");
        return -1;
    }
    w->step = stride * (Py_ssize_t)es;
    return 0;
}

/* snapshot(ptrs, rows, runs, strides, kind, dst_ptr) -> None: the views copied one after
 * the other into the fp32 array at dst_ptr (the weights before an optimizer update). */
static PyObject *py_snapshot(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 6, "snapshot")) return NULL;
    long kind = PyLong_AsLong(args[4]);
    float *dst = PyLong_AsVoidPtr(args[5]);
    if (PyErr_Occurred()) return NULL;
    Views v;
    PyObject *ret = NULL;
    if (views_open(&v, args) < 0) goto done;
    if (dst == NULL || (kind != F32 && kind != BF16)) {
        PyErr_SetString(PyExc_ValueError, "snapshot: bad arguments");
        goto done;
    }
    View w;
    for (Py_ssize_t i = 0; i < v.k; i++) {
        if (view_at(&v, i, kind == F32 ? 4 : 2, &w) < 0) goto done;
        for (Py_ssize_t r = 0; r < w.rows; r++, dst += w.run) {
            const char *src = w.x + r * w.step;
            if (kind == F32) memcpy(dst, src, (size_t)w.run * 4);
            else
                for (Py_ssize_t j = 0; j < w.run; j++) dst[j] = load1(src, j, BF16);
        }
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    views_close(&v);
    return ret;
}

/* One run of a view: sum (x - s)^2 and sum x^2 (x: the weights now, s: their snapshot)
 * added into *dd and *aa. */
CLONES static void delta_sq(const void *x, const float *s, Py_ssize_t n, int kind, double *dd,
                            double *aa) {
    const vf zero = (vf){0};
    vf vd = zero, va = zero;
    Py_ssize_t j = 0, inblock = 0;
    for (; j + W <= n; j += W) {
        vf a = load(x, j, kind), b;
        memcpy(&b, s + j, sizeof b);
        vf dl = a - b;
        vd += dl * dl;
        va += a * a;
        inblock += W;
        if (inblock >= BLOCK) {
            *dd += hsum(vd);
            *aa += hsum(va);
            vd = va = zero;
            inblock = 0;
        }
    }
    *dd += hsum(vd);
    *aa += hsum(va);
    for (; j < n; j++) {
        float a = load1(x, j, kind), dl = a - s[j];
        *dd += (double)dl * dl;
        *aa += (double)a * a;
    }
}

/* update_ratios(ptrs, rows, runs, strides, kind, snap_ptr, layers, n_layers, out_ptr):
 * per layer l, sqrt(sum (x - before)^2) / sqrt(sum x^2) over its views (before: the
 * snapshot's copy), written at out_ptr[l] (fp32; 0/0, NaN, for a layer without any). */
static PyObject *py_update_ratios(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 9, "update_ratios")) return NULL;
    long kind = PyLong_AsLong(args[4]);
    const float *snap = PyLong_AsVoidPtr(args[5]);
    Py_ssize_t L = PyLong_AsSsize_t(args[7]);
    float *out = PyLong_AsVoidPtr(args[8]);
    if (PyErr_Occurred()) return NULL;
    Views v;
    PyObject *ret = NULL, *layers = NULL;
    double *acc = NULL;
    if (views_open(&v, args) < 0) goto done;
    if (!(layers = PySequence_Fast(args[6], "layers must be a sequence"))) goto done;
    if (snap == NULL || out == NULL || L <= 0 || PySequence_Fast_GET_SIZE(layers) != v.k ||
        (kind != F32 && kind != BF16)) {
        PyErr_SetString(PyExc_ValueError, "update_ratios: bad arguments");
        goto done;
    }
    if (!(acc = PyMem_RawCalloc((size_t)L * 2, sizeof(double)))) {
        PyErr_NoMemory();
        goto done;
    }
    View w;
    for (Py_ssize_t i = 0; i < v.k; i++) {
        Py_ssize_t l = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(layers, i));
        if (PyErr_Occurred()) goto done;
        if (l < 0 || l >= L) {
            PyErr_SetString(PyExc_ValueError, "update_ratios: bad layer");
            goto done;
        }
        if (view_at(&v, i, kind == F32 ? 4 : 2, &w) < 0) goto done;
        double dd = 0.0, aa = 0.0;
        for (Py_ssize_t r = 0; r < w.rows; r++, snap += w.run)
            delta_sq(w.x + r * w.step, snap, w.run, (int)kind, &dd, &aa);
        acc[2 * l] += dd;
        acc[2 * l + 1] += aa;
    }
    for (Py_ssize_t l = 0; l < L; l++) out[l] = (float)(sqrt(acc[2 * l]) / sqrt(acc[2 * l + 1]));
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(acc);
    Py_XDECREF(layers);
    views_close(&v);
    return ret;
}

/* add_columns(dst_ptr, ncols, n_rows, cols, srcs) -> None: dst (fp32, [n_rows, ncols],
 * contiguous) gets dst[r, cols[j]] += srcs[j][r] for each j: fp32 vectors of n_rows at the
 * addresses srcs[j]. */
static PyObject *py_add_columns(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 5, "add_columns")) return NULL;
    float *dst = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t ncols = PyLong_AsSsize_t(args[1]), rows = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) return NULL;
    PyObject *cols = PySequence_Fast(args[3], "add_columns: cols must be a sequence");
    if (cols == NULL) return NULL;
    PyObject *srcs = PySequence_Fast(args[4], "add_columns: srcs must be a sequence");
    if (srcs == NULL) {
        Py_DECREF(cols);
        return NULL;
    }
    Py_ssize_t k = PySequence_Fast_GET_SIZE(cols);
    PyObject *ret = NULL;
    if (dst == NULL || k != PySequence_Fast_GET_SIZE(srcs) || rows < 0 || ncols <= 0) {
        PyErr_SetString(PyExc_ValueError, "add_columns: bad arguments");
        goto done;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        Py_ssize_t c = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(cols, j));
        const float *src = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(srcs, j));
        if (PyErr_Occurred()) goto done;
        if (c < 0 || c >= ncols || src == NULL) {
            PyErr_SetString(PyExc_ValueError, "add_columns: bad column");
            goto done;
        }
        for (Py_ssize_t r = 0; r < rows; r++) dst[r * ncols + c] += src[r];
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    Py_DECREF(cols);
    Py_DECREF(srcs);
    return ret;
}

/* The stage's columns (buffers.ST_N ..): act_row and sq_row add into them in this order. */
enum { S_N, S_S1, S_S2, S_NNZ, S_NF, S_SAT, S_STUCK, S_UNITS, S_MAX, S_GN, S_GS2, S_GNF,
       S_COLS };
/* commit's ways of taking a per-layer value into its window column */
enum { C_ADD = 0, C_MAX = 1, C_ADD_KNOWN = 2, C_COUNT_KNOWN = 3, C_MODES = 4 };

/* torch.maximum: a NaN on either side gives NaN */
static inline float nan_max(float a, float b) {
    return (isnan(a) || isnan(b)) ? NAN : (a > b ? a : b);
}

static inline float at_least(float x, float lo) { /* torch.clamp(x, min=lo): NaN stays */
    return x < lo ? lo : x;
}

/* One sampled step's activation statistics from its stage row, into the window row, as
 * buffers.WindowBuffers._commit_activations computes them with ops (the same fp32
 * operations in the same order, each rounded once: no multiply-add is fused, as none is in
 * the ops). cols: the 9 window columns of buffers._ACT_COLS, then act_max's. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void commit_act_row(const float *st, float *win, const Py_ssize_t *cols) {
    float n = st[S_N], s1 = st[S_S1];
    float n1 = at_least(n, 1.0f);
    float mean = s1 / n1;
    float prod = s1 * mean;
    float var = (st[S_S2] - prod) / at_least(n1 - 1.0f, 1.0f);
    float gn = st[S_GN], units = st[S_UNITS];
    float vals[9] = {
        mean,
        sqrtf(at_least(var, 0.0f)),
        (n - st[S_NNZ]) / n1,
        st[S_SAT] / n1,
        n > 0 ? 1.0f : 0.0f,
        sqrtf(st[S_GS2] / at_least(gn, 1.0f)),
        gn > 0 ? 1.0f : 0.0f,
        st[S_STUCK] / at_least(units, 1.0f),
        units > 0 ? 1.0f : 0.0f,
    };
    for (int j = 0; j < 9; j++) win[cols[j]] += vals[j];
    win[cols[9]] = nan_max(win[cols[9]], st[S_MAX]);
}

/* commit(dst_ptr, ncols, n_rows, ops, stage_ptr, act_cols) -> None: a step's per-layer
 * values into the window (fp32 [n_rows, ncols], contiguous), what buffers.commit_step does
 * with ops on a sampled step. ops: (mode, col, src_ptr, src_stride) each, src an fp32
 * vector of n_rows (src_stride floats apart); mode C_ADD adds it into column col, C_MAX
 * maxes it in (torch.maximum), C_ADD_KNOWN adds it where it is not NaN, C_COUNT_KNOWN adds
 * 1 where it is not NaN. stage_ptr (0: none): the stage (fp32 [n_rows, S_COLS]) whose
 * activation statistics go into act_cols (commit_act_row). */
static PyObject *py_commit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!nargs_ok(nargs, 6, "commit")) return NULL;
    float *dst = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t ncols = PyLong_AsSsize_t(args[1]), rows = PyLong_AsSsize_t(args[2]);
    const float *stage = args[4] == Py_None ? NULL : PyLong_AsVoidPtr(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (dst == NULL || rows < 0 || ncols <= 0) {
        PyErr_SetString(PyExc_ValueError, "commit: bad window");
        return NULL;
    }
    Py_ssize_t act[10];
    if (stage != NULL) {
        PyObject *ac = PySequence_Fast(args[5], "commit: act_cols must be a sequence");
        if (ac == NULL) return NULL;
        int ok = PySequence_Fast_GET_SIZE(ac) == 10;
        for (Py_ssize_t j = 0; ok && j < 10; j++) {
            act[j] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(ac, j));
            ok = !PyErr_Occurred() && act[j] >= 0 && act[j] < ncols;
        }
        Py_DECREF(ac);
        if (!ok) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "commit: bad act_cols");
            return NULL;
        }
    }
    PyObject *ops = PySequence_Fast(args[3], "commit: ops must be a sequence");
    if (ops == NULL) return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(ops);
    PyObject *ret = NULL;
    /* every op checked before the window is touched: a bad one changes nothing */
    for (int pass = 0; pass < 2; pass++) {
        for (Py_ssize_t j = 0; j < k; j++) {
            PyObject *op = PySequence_Fast_GET_ITEM(ops, j);
            if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) != 4) {
                PyErr_SetString(PyExc_ValueError, "commit: each op is (mode, col, src, stride)");
                goto done;
            }
            long mode = PyLong_AsLong(PyTuple_GET_ITEM(op, 0));
            Py_ssize_t c = PyLong_AsSsize_t(PyTuple_GET_ITEM(op, 1));
            const float *src = PyLong_AsVoidPtr(PyTuple_GET_ITEM(op, 2));
            Py_ssize_t stride = PyLong_AsSsize_t(PyTuple_GET_ITEM(op, 3));
            if (PyErr_Occurred()) goto done;
            if (mode < 0 || mode >= C_MODES || c < 0 || c >= ncols || src == NULL
                    || stride < 1) {
                PyErr_SetString(PyExc_ValueError, "commit: bad op");
                goto done;
            }
            if (pass == 0) continue;
            float *d = dst + c;
            for (Py_ssize_t r = 0; r < rows; r++, d += ncols) {
                float v = src[r * stride];
                switch (mode) {
                case C_ADD: *d += v; break;
                case C_MAX: *d = nan_max(*d, v); break;
                case C_ADD_KNOWN: *d += isnan(v) ? 0.0f : v; break;
                default: *d += isnan(v) ? 0.0f : 1.0f; break;
                }
            }
        }
    }
    if (stage != NULL)
        for (Py_ssize_t r = 0; r < rows; r++) commit_act_row(stage + r * S_COLS, dst + r * ncols, act);
    ret = Py_None;
    Py_INCREF(ret);
done:
    Py_DECREF(ops);
    return ret;
}

static PyMethodDef methods[] = {
    {"snapshot", (PyCFunction)(void (*)(void))py_snapshot, METH_FASTCALL,
     "snapshot(ptrs, rows, runs, strides, kind, dst_ptr) -> None"},
    {"update_ratios", (PyCFunction)(void (*)(void))py_update_ratios, METH_FASTCALL,
     "update_ratios(ptrs, rows, runs, strides, kind, snap_ptr, layers, n_layers, out_ptr)"},
    {"add_columns", (PyCFunction)(void (*)(void))py_add_columns, METH_FASTCALL,
     "add_columns(dst_ptr, ncols, n_rows, cols, srcs) -> None"},
    {"commit", (PyCFunction)(void (*)(void))py_commit, METH_FASTCALL,
     "commit(dst_ptr, ncols, n_rows, ops, stage_ptr, act_cols) -> None"},
    {"zero_f32", (PyCFunction)(void (*)(void))py_zero_f32, METH_FASTCALL,
     "zero_f32(ptr, n) -> None"},
    {"sum_f32", (PyCFunction)(void (*)(void))py_sum_f32, METH_FASTCALL,
     "sum_f32(ptr, n) -> float"},
    {"layer_norms", (PyCFunction)(void (*)(void))py_layer_norms, METH_FASTCALL,
     "layer_norms(ptrs, numels, layers, n_layers, kind, out_ptr, with_max, empty) -> float"},
    {"act_row", (PyCFunction)(void (*)(void))py_act_row, METH_FASTCALL,
     "act_row(x_ptr, n, units, kind, bounded, c, r, slo, shi, out_ptr) -> bool"},
    {"sq_row", (PyCFunction)(void (*)(void))py_sq_row, METH_FASTCALL,
     "sq_row(x_ptr, n, kind, out_ptr) -> None"},
    {"sum_row", (PyCFunction)(void (*)(void))py_sum_row, METH_FASTCALL,
     "sum_row(x_ptr, n, kind, out_ptr) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gradwatch._kernels",
    "One-pass statistics of contiguous CPU tensors (see gradwatch/cpukernels.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
