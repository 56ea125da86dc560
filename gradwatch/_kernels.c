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

/* The L2 norm of a contiguous tensor of n elements, and with want_max its max |x| (NaN
 * when it holds a NaN, as torch's amax gives): one pass. Σx² accumulated in double per
 * block, so a norm of finite values overflows only past the fp32 range itself. */
CLONES static void norm_max(const void *x, Py_ssize_t n, int kind, int want_max,
                            float *norm, float *mx) {
    /* four independent accumulators: one chain of fused multiply-adds waits on its own
     * latency, four keep the unit busy */
    const vf zero = (vf){0};
    vf s0 = zero, s1 = zero, s2 = zero, s3 = zero, m0 = zero, m1 = zero;
    double d = 0.0;
    float fm = 0.0f;
    Py_ssize_t i = 0, inblock = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
        vf a = load(x, i, kind), b = load(x, i + W, kind);
        vf c = load(x, i + 2 * W, kind), e = load(x, i + 3 * W, kind);
        s0 += a * a;
        s1 += b * b;
        s2 += c * c;
        s3 += e * e;
        if (want_max) {
            vf aa = vabs(a), ab = vabs(b), ac = vabs(c), ae = vabs(e);
            vf p = vsel(aa > ab, aa, ab), q = vsel(ac > ae, ac, ae);
            m0 = vsel(p > m0, p, m0);
            m1 = vsel(q > m1, q, m1);
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
        if (fabsf(v) > fm) fm = fabsf(v);
    }
    *norm = (float)sqrt(d);
    if (want_max) {
        for (int j = 0; j < W; j++) {
            if (m0[j] > fm) fm = m0[j];
            if (m1[j] > fm) fm = m1[j];
        }
        /* the max skips NaN (no comparison holds); the sum of squares is NaN exactly when
         * an element is (an Inf makes it Inf, never NaN): no test per element needed.
         * (A NaN self-comparison per lane would not vectorize.) */
        *mx = isnan(d) ? NAN : fm;
    }
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
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "act_row takes 10 arguments");
        return NULL;
    }
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

/* sq_row(x_ptr, n, kind, out_ptr) -> None */
static PyObject *py_sq_row(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "sq_row takes 4 arguments");
        return NULL;
    }
    void *x = PyLong_AsVoidPtr(args[0]);
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    long kind = PyLong_AsLong(args[2]);
    float *out = PyLong_AsVoidPtr(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (x == NULL || out == NULL || n <= 0 || (kind != F32 && kind != BF16)) {
        PyErr_SetString(PyExc_ValueError, "sq_row: bad arguments");
        return NULL;
    }
    sq_row(x, n, (int)kind, out);
    Py_RETURN_NONE;
}

/* layer_norms(ptrs, numels, layers, n_layers, kind, out_ptr, with_max) -> None
 *
 * Tensor i (ptrs[i], numels[i] elements) belongs to layer layers[i] < n_layers. Writes the
 * fp32 array at out_ptr: [norms (k) | layer norm (L) | layer RMS (L)], and with with_max
 * also [layer max |x| (L) | layer non-finite (L)]: each tensor's L2 norm; per layer the
 * norm of its tensors together, that over sqrt(its element count) (0 for a layer without
 * any), the max |x| (0 without any, NaN with a NaN) and the number of its tensors whose max
 * |x| is not finite. */
static PyObject *py_layer_norms(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "layer_norms takes 7 arguments");
        return NULL;
    }
    Py_ssize_t L = PyLong_AsSsize_t(args[3]);
    long kind = PyLong_AsLong(args[4]);
    float *out = PyLong_AsVoidPtr(args[5]);
    int with_max = PyObject_IsTrue(args[6]);
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
        double nrm = sqrt(acc[2 * l]);
        lnorm[l] = (float)nrm;
        lrms[l] = (float)(nrm / sqrt(acc[2 * l + 1] > 1.0 ? acc[2 * l + 1] : 1.0));
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_RawFree(acc);
    Py_XDECREF(ptrs);
    Py_XDECREF(numels);
    Py_XDECREF(layers);
    return ret;
}

static PyMethodDef methods[] = {
    {"layer_norms", (PyCFunction)(void (*)(void))py_layer_norms, METH_FASTCALL,
     "layer_norms(ptrs, numels, layers, n_layers, kind, out_ptr, with_max) -> None"},
    {"act_row", (PyCFunction)(void (*)(void))py_act_row, METH_FASTCALL,
     "act_row(x_ptr, n, units, kind, bounded, c, r, slo, shi, out_ptr) -> bool"},
    {"sq_row", (PyCFunction)(void (*)(void))py_sq_row, METH_FASTCALL,
     "sq_row(x_ptr, n, kind, out_ptr) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gradwatch._kernels",
    "One-pass statistics of contiguous CPU tensors (see gradwatch/cpukernels.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
