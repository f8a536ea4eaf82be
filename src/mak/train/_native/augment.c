/* SimCLR augmentation of a uint8 batch on the CPU, every step of mak.augment.SimCLRAugment fused
 * per image (crop + flip, channel conversion, brightness, contrast, colour matrix, blur,
 * normalisation) in cache-resident buffers, images in parallel with OpenMP.
 *
 * The per-image parameters come packed as float32 rows (SimCLRAugment._pack):
 *   0 ax, 1 cx, 2 ay, 3 cy   crop in grid units: x = cx + ax * t, t = (j + 0.5) / S
 *   4 flip (> 0.5 flips), 5 brightness, 6 contrast,
 *   7..15 the 3x3 colour matrix (only when cout == 3),
 *   then nk blur taps (only when nk > 0; a delta means no blur for that image).
 * Sampling follows torch.nn.functional.grid_sample(bilinear, border, align_corners=False).
 * Built on first use by mak.native; mak falls back to the torch implementation without it. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float clamp01(float v) { /* the max/min instructions' operand order: no libm call */
    v = v > 0.0f ? v : 0.0f;
    return v < 1.0f ? v : 1.0f;
}

static inline int reflect_index(int i, int n) {
    if (i < 0) i = -i;
    if (i > n - 1) i = 2 * (n - 1) - i;
    return i;
}

static inline int clamp_index(int i, int n) { return i < 0 ? 0 : (i > n - 1 ? n - 1 : i); }

/* grid_sample's unnormalise + border clip + bilinear split for one axis; t[j] = (j + 0.5) / S */
static void axis_weights(float g0, float ga, int flip, const float *t, int S, int n, int *i0, int *i1, float *w) {
    for (int j = 0; j < S; j++) {
        float g = g0 + ga * (flip ? 1.0f - t[j] : t[j]);
        float x = ((g + 1.0f) * (float)n - 1.0f) * 0.5f;
        x = x > 0.0f ? x : 0.0f;
        x = x < (float)(n - 1) ? x : (float)(n - 1);
        int a = (int)x; /* x >= 0: truncation is floor */
        i0[j] = a;
        i1[j] = a + 1 < n ? a + 1 : n - 1; /* weight 0 when clipped */
        w[j] = x - (float)a;
    }
}

static void one_image(const uint8_t *img, int cin, int H, int W, const float *q, int cout, int S, int nk,
                      float mean, float inv_std, const float *t, float *out, float *work) {
    const int P = S * S;
    float *samp = work;             /* cin planes of S x S */
    float *x = samp + 3 * P;        /* cout planes */
    float *tmp = x + 3 * P;         /* blur scratch, one plane */
    float *hrows = tmp + P;         /* up to H input rows resampled to S columns */
    float *row = hrows + (size_t)H * S; /* S + 2 rad floats (a padded row of the blur) */
    float *wx = row + W + S + 2 * nk, *wy = wx + S;
    int *x0 = (int *)(wy + S), *x1 = x0 + S, *y0 = x1 + S, *y1 = y0 + S;

    axis_weights(q[1], q[0], q[4] > 0.5f, t, S, W, x0, x1, wx);
    axis_weights(q[3], q[2], 0, t, S, H, y0, y1, wy);
    /* bilinear crop, rows first: resample each input row the output reads (y0[0] .. y1[S-1],
       increasing) to S columns, then blend pairs of them per output row */
    const float scale = 1.0f / 255.0f;
    const int ylo = y0[0];
    for (int c = 0; c < cin; c++) {
        const uint8_t *plane = img + (size_t)c * H * W;
        float *dst = samp + c * P;
        int have = ylo - 1; /* hrows holds rows ylo .. have */
        for (int i = 0; i < S; i++) {
            while (have < y1[i]) {
                have++;
                const uint8_t *src = plane + (size_t)have * W;
                float *h = hrows + (size_t)(have - ylo) * S;
                for (int j = 0; j < S; j++)
                    h[j] = (1.0f - wx[j]) * ((float)src[x0[j]] * scale) + wx[j] * ((float)src[x1[j]] * scale);
            }
            const float *ra = hrows + (size_t)(y0[i] - ylo) * S, *rb = hrows + (size_t)(y1[i] - ylo) * S;
            const float b = wy[i], a = 1.0f - b;
            float *d = dst + i * S;
#pragma omp simd
            for (int j = 0; j < S; j++) d[j] = a * ra[j] + b * rb[j];
        }
    }
    /* channels */
    if (cin == cout) {
        memcpy(x, samp, sizeof(float) * (size_t)cout * P);
    } else if (cin == 3) { /* -> grey, ITU-R 601-2 luma */
        for (int p = 0; p < P; p++) x[p] = samp[p] * 0.299f + samp[P + p] * 0.587f + samp[2 * P + p] * 0.114f;
    } else { /* grey -> RGB */
        for (int c = 0; c < 3; c++) memcpy(x + c * P, samp, sizeof(float) * (size_t)P);
    }
    /* brightness, then contrast against the mean luma */
    const float br = q[5], ct = q[6];
    float m[3] = {0.0f, 0.0f, 0.0f};
    for (int c = 0; c < cout; c++) {
        float *xc = x + c * P;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int p = 0; p < P; p++) {
            float v = clamp01(xc[p] * br);
            xc[p] = v;
            s += v;
        }
        m[c] = s / (float)P;
    }
    const float mu = cout == 3 ? m[0] * 0.299f + m[1] * 0.587f + m[2] * 0.114f : m[0];
    const float off = (1.0f - ct) * mu;
#pragma omp simd
    for (int p = 0; p < cout * P; p++) x[p] = clamp01(off + x[p] * ct);
    if (cout == 3) { /* saturation + hue + grayscale as one matrix */
        const float *M = q + 7;
#pragma omp simd
        for (int p = 0; p < P; p++) {
            float r = x[p], g = x[P + p], b = x[2 * P + p];
            x[p] = clamp01(M[0] * r + M[1] * g + M[2] * b);
            x[P + p] = clamp01(M[3] * r + M[4] * g + M[5] * b);
            x[2 * P + p] = clamp01(M[6] * r + M[7] * g + M[8] * b);
        }
    }
    /* blur (separable, reflect padding; replicate when the image is smaller than the radius) and
       normalisation (x - mean) * inv_std */
    const int rad = nk / 2;
    const float *kern = q + (cout == 3 ? 16 : 7);
    const int blur = nk > 0 && kern[rad] != 1.0f;
    const float shift = mean * inv_std;
    float kv[64];
    if (blur)
        for (int t = 0; t < nk && t < 64; t++) kv[t] = kern[t] * inv_std;
    for (int c = 0; c < cout; c++) {
        float *xc = x + c * P, *oc = out + (size_t)c * P;
        if (!blur) {
#pragma omp simd
            for (int p = 0; p < P; p++) oc[p] = xc[p] * inv_std - shift;
            continue;
        }
        if (rad >= S) { /* tiny image: replicate padding, direct */
            for (int i = 0; i < S; i++)
                for (int j = 0; j < S; j++) {
                    float acc = 0.0f;
                    for (int tt = 0; tt < nk; tt++) acc += kern[tt] * xc[i * S + clamp_index(j + tt - rad, S)];
                    tmp[i * S + j] = acc;
                }
            for (int i = 0; i < S; i++)
                for (int j = 0; j < S; j++) {
                    float acc = -shift;
                    for (int tt = 0; tt < nk; tt++) acc += kv[tt] * tmp[clamp_index(i + tt - rad, S) * S + j];
                    oc[i * S + j] = acc;
                }
            continue;
        }
        /* rows: every tap as one pass over the whole plane (shifted by tt - rad), then the
           2 rad border columns of each row again with reflect padding */
#pragma omp simd
        for (int p = rad; p < P - rad; p++) tmp[p] = kern[0] * xc[p - rad];
        for (int tt = 1; tt < nk; tt++) {
            const float k = kern[tt];
            const float *src = xc + tt - rad;
#pragma omp simd
            for (int p = rad; p < P - rad; p++) tmp[p] += k * src[p];
        }
        for (int i = 0; i < S; i++)
            for (int e = 0; e < 2 * rad; e++) {
                const int j = e < rad ? e : S - 2 * rad + e;
                float acc = 0.0f;
                for (int tt = 0; tt < nk; tt++) acc += kern[tt] * xc[i * S + reflect_index(j + tt - rad, S)];
                tmp[i * S + j] = acc;
            }
        /* columns with the gain: interior rows as whole-plane passes, border rows with reflect */
        const int lo = rad * S, hi = (S - rad) * S;
#pragma omp simd
        for (int p = lo; p < hi; p++) oc[p] = kv[0] * tmp[p - rad * S] - shift;
        for (int tt = 1; tt < nk; tt++) {
            const float k = kv[tt];
            const float *src = tmp + (tt - rad) * S;
#pragma omp simd
            for (int p = lo; p < hi; p++) oc[p] += k * src[p];
        }
        for (int e = 0; e < 2 * rad; e++) {
            const int i = e < rad ? e : S - 2 * rad + e;
            float *o = oc + i * S;
            for (int j = 0; j < S; j++) o[j] = -shift;
            for (int tt = 0; tt < nk; tt++) {
                const float k = kv[tt];
                const float *src = tmp + reflect_index(i + tt - rad, S) * S;
                for (int j = 0; j < S; j++) o[j] += k * src[j];
            }
        }
    }
}

/* Returns 0, or -1 when scratch memory cannot be allocated. */
int mak_simclr_augment(const uint8_t *img, int B, int cin, int H, int W, const float *q, int qcols, int cout,
                       int S, int nk, float mean, float inv_std, float *out, int threads) {
    const size_t floats = (size_t)7 * S * S + (size_t)H * S + W + S + 2 * nk + 2 * S + 4 * S + 16;
    int failed = 0;
    if (threads < 1) threads = 1;
    float *t = (float *)malloc(sizeof(float) * (size_t)S);
    if (!t) return -1;
    for (int j = 0; j < S; j++) t[j] = ((float)j + 0.5f) / (float)S;
#pragma omp parallel num_threads(threads)
    {
        float *work = (float *)malloc(sizeof(float) * floats);
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            if (work)
                one_image(img + (size_t)b * cin * H * W, cin, H, W, q + (size_t)b * qcols, cout, S, nk, mean,
                          inv_std, t, out + (size_t)b * cout * S * S, work);
        }
        free(work);
    }
    free(t);
    return failed ? -1 : 0;
}

/* splitmix64 streams: out[i * m + j] = the (j+1)-th number of the stream seeded with mix(keys[i]),
 * 53 bits as a double in [0, 1) -- bit for bit what mak.augment.key_uniforms computes in numpy. */
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

void mak_key_uniforms(const int64_t *keys, int n, int m, double *out) {
    for (int i = 0; i < n; i++) {
        const uint64_t state = mix64((uint64_t)keys[i]);
        for (int j = 0; j < m; j++) {
            const uint64_t z = mix64(state + (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ULL);
            out[(size_t)i * m + j] = (double)(z >> 11) * 0x1.0p-53;
        }
    }
}
